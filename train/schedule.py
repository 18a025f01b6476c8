"""Learning-rate schedule used by fine-tuning: linear warm-up, then cosine decay to zero over the step budget.

Brief fine-tunes (tens to hundreds of steps) start from trained weights; a warm-up keeps the first Adam steps from
wrecking them before the moment estimates settle.
"""
from __future__ import annotations

import paddle


def warmup_cosine(base_lr: float, total_steps: int, warmup_steps: int) -> paddle.optimizer.lr.LRScheduler:
    """A per-step scheduler: `warmup_steps` linear from 0 to `base_lr`, cosine to 0 over the remaining steps."""
    warmup_steps = max(0, min(warmup_steps, total_steps - 1))
    cosine = paddle.optimizer.lr.CosineAnnealingDecay(learning_rate=base_lr, T_max=max(1, total_steps - warmup_steps))
    if warmup_steps == 0:
        return cosine
    return paddle.optimizer.lr.LinearWarmup(
        learning_rate=cosine, warmup_steps=warmup_steps, start_lr=0.0, end_lr=base_lr
    )
