"""Fine-tuning loop for DB detectors: Adam, warm-up + cosine, a fixed step budget, resumable checkpoints.

The loop knows nothing about where its loss comes from: `loss_fn(predicts, batch)` returns a dict with a `loss`
entry (plus any named terms to log). DB loss on labels is one such function; distillation from an unpruned
teacher is another, so recovery training plugs in without touching the loop.
"""
from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Protocol

import numpy as np
import paddle
from tqdm import tqdm

from train.errors import UserError
from train.locks import cpu_work
from train.schedule import warmup_cosine
from train.weights import strip_backup_keys

Batch = Mapping[str, paddle.Tensor]


class LossFn(Protocol):
    def __call__(self, predicts: Mapping[str, paddle.Tensor], batch: Batch) -> Mapping[str, paddle.Tensor]: ...


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the weights are no longer usable. A setting the user can change (the
    learning rate, the data), not a bug: a trial that diverges fails with this reason, not as a crash."""


@dataclass
class FinetuneSettings:
    """How long and how hard to fine-tune. `steps` is the whole budget, including warm-up."""

    steps: int = 200
    lr: float = 1e-3
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip_norm: float | None = 10.0
    log_every: int = 10
    save_every: int = 0  # 0: save only at the end

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"finetune steps must be >= 1, got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"finetune lr must be > 0, got {self.lr}")


@dataclass
class FinetuneResult:
    """What a fine-tune did: the per-step total loss (for curves) and the mean of every term over the last steps.
    `stopped`: `on_step` ended it after `steps` of the budget."""

    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    final_terms: dict[str, float] = field(default_factory=dict)
    stopped: bool = False

    def to_json(self) -> dict:
        return asdict(self)


def _checkpoint_paths(prefix: Path) -> tuple[Path, Path, Path]:
    return prefix.with_suffix(".pdparams"), prefix.with_suffix(".pdopt"), prefix.with_suffix(".json")


def save_weights(model: paddle.nn.Layer, path: Path) -> None:
    """Write the model's state dict as a PaddleOCR-style `.pdparams`, atomically and without `*_backup` buffers."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    paddle.save(strip_backup_keys(model.state_dict()), str(tmp))
    os.replace(tmp, path)


def save_train_state(prefix: Path, model: paddle.nn.Layer, optimizer: paddle.optimizer.Optimizer, step: int,
                     losses: list[float]) -> None:
    """Weights, optimizer (with its LR schedule) and progress, so an interrupted fine-tune resumes where it was.

    The `.json` file is written last: it is the marker that the other two are complete.
    """
    weights, opt, meta = _checkpoint_paths(prefix)
    save_weights(model, weights)
    tmp = opt.with_name(opt.name + ".tmp")
    paddle.save(optimizer.state_dict(), str(tmp))
    os.replace(tmp, opt)
    tmp = meta.with_name(meta.name + ".tmp")
    tmp.write_text(json.dumps({"step": step, "losses": losses}))
    os.replace(tmp, meta)


def _load_train_state(prefix: Path, model: paddle.nn.Layer,
                      optimizer: paddle.optimizer.Optimizer) -> tuple[int, list[float]]:
    from train.weights import load_checkpoint

    weights, opt, meta = _checkpoint_paths(prefix)
    progress = json.loads(meta.read_text())
    load_checkpoint(model, weights)
    with warnings.catch_warnings():
        # paddle's LinearWarmup stores its inner schedule under an extra key and then warns that the key is unused;
        # it does restore it (LinearWarmup.set_state_dict).
        warnings.filterwarnings("ignore", message="There are some unused values in state_dict")
        optimizer.set_state_dict(paddle.load(str(opt)))
    return int(progress["step"]), list(progress["losses"])


def finetune(
    model: paddle.nn.Layer,
    batches: Iterator[Batch],
    loss_fn: LossFn,
    settings: FinetuneSettings,
    checkpoint_prefix: Path | None = None,
    on_step: Callable[[int, dict[str, float]], bool | None] | None = None,
    progress: bool = True,
) -> FinetuneResult:
    """Train `model` in place for `settings.steps` steps on `batches` (an endless iterator).

    If `checkpoint_prefix` is given, the state is saved there every `save_every` steps and at the end, and a
    state already there (from an interrupted run of the same budget) is resumed instead of starting over; the
    batches the interrupted run consumed are drawn again and dropped, so a resumed run sees the same data as an
    uninterrupted one.
    `on_step(step, terms)` receives every step's loss terms as floats (for MLflow and the like); a true return
    value stops the fine-tune after that step (a search trial that lost at a rung), state saved as at the end.
    It may evaluate the model: training goes on in train mode.
    Raises `TrainingDiverged` on a non-finite loss.
    """
    # Adam names its moment accumulators from a process-wide counter ("..._moment1_3"), and restoring an optimizer
    # state matches by those names: a fresh name scope makes them the same in every run and process.
    with paddle.utils.unique_name.guard():
        return _finetune(model, batches, loss_fn, settings, checkpoint_prefix, on_step, progress)


def _finetune(
    model: paddle.nn.Layer,
    batches: Iterator[Batch],
    loss_fn: LossFn,
    settings: FinetuneSettings,
    checkpoint_prefix: Path | None,
    on_step: Callable[[int, dict[str, float]], bool | None] | None,
    progress: bool,
) -> FinetuneResult:
    scheduler = warmup_cosine(settings.lr, settings.steps, settings.warmup_steps)
    clip = paddle.nn.ClipGradByGlobalNorm(settings.grad_clip_norm) if settings.grad_clip_norm else None
    decay = paddle.regularizer.L2Decay(settings.weight_decay) if settings.weight_decay else None
    trainable = [p for p in model.parameters() if not p.stop_gradient]
    optimizer = paddle.optimizer.Adam(learning_rate=scheduler, parameters=trainable, grad_clip=clip,
                                      weight_decay=decay)

    start, losses, stopped = 0, [], False
    if checkpoint_prefix is not None and _checkpoint_paths(checkpoint_prefix)[2].exists():
        start, losses = _load_train_state(checkpoint_prefix, model, optimizer)
        for _ in range(start):
            next(batches)
    started = time.perf_counter()
    model.train()
    recent: dict[str, list[float]] = {}
    bar = tqdm(total=settings.steps, initial=start, desc="fine-tune", unit="step", disable=not progress,
               dynamic_ncols=True)
    for step in range(start, settings.steps):
        batch = next(batches)
        with cpu_work():  # pauses while another worker of the host times a model
            terms = loss_fn(model(batch["image"]), batch)
            loss = terms["loss"]
            value = float(loss)
            if not math.isfinite(value):
                bar.close()
                raise TrainingDiverged(f"loss is {value} at step {step + 1}; lower finetune.lr or check the data")
            loss.backward()
            optimizer.step()
            optimizer.clear_grad()
            scheduler.step()

        floats = {name: float(t) for name, t in terms.items()}
        losses.append(value)
        for name, v in floats.items():
            recent.setdefault(name, []).append(v)
            del recent[name][: -settings.log_every]
        if on_step is not None:
            stopped = bool(on_step(step + 1, floats))
            model.train()  # on_step may have evaluated the model (eval mode)
        bar.update(1)
        if (step + 1) % settings.log_every == 0 or step + 1 == settings.steps:
            bar.set_postfix(loss=f"{np.mean(recent['loss']):.4f}", lr=f"{optimizer.get_lr():.2e}")
        if checkpoint_prefix is not None and settings.save_every and (step + 1) % settings.save_every == 0:
            save_train_state(checkpoint_prefix, model, optimizer, step + 1, losses)
        if stopped:
            break
    bar.close()
    if checkpoint_prefix is not None:
        save_train_state(checkpoint_prefix, model, optimizer, len(losses), losses)
    model.eval()
    return FinetuneResult(
        steps=len(losses),
        seconds=time.perf_counter() - started,
        losses=losses,
        final_terms={name: float(np.mean(v)) for name, v in recent.items()},
        stopped=stopped,
    )
