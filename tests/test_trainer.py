"""The fine-tuning loop on a tiny real model and tiny rendered data: it learns, resumes exactly, stops on NaN."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import paddle
import pytest

from train.data.dataset import build_split, endless_batches
from train.data.synthetic import SyntheticSpec, ensure_synthetic_dataset, label_path
from train.loss import DBLoss
from train.models.zoo import det_mv3_db
from train.schedule import warmup_cosine
from train.trainer import FinetuneSettings, TrainingDiverged, finetune

TINY = SyntheticSpec(n_train=4, n_eval=1, width_range=(96, 128), height_range=(96, 128), lines_range=(1, 2),
                     font_size_range=(16, 24))


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    return ensure_synthetic_dataset(tmp_path_factory.mktemp("data") / "tiny", TINY, progress=False)


def _batches(root: Path, crop: int = 64):
    dataset = build_split(root, label_path(root, "train"), "train", crop_size=crop, seed=3)
    return endless_batches(dataset, batch_size=2)


def _fresh_model() -> paddle.nn.Layer:
    paddle.seed(7)
    np.random.seed(7)
    return det_mv3_db()


def _state(model: paddle.nn.Layer) -> dict[str, np.ndarray]:
    return {k: v.numpy().copy() for k, v in model.state_dict().items()}


def test_loss_falls_on_a_repeated_batch(tiny_root: Path):
    batch = next(_batches(tiny_root))
    model = _fresh_model()
    result = finetune(model, iter([batch] * 30), DBLoss(), FinetuneSettings(steps=30, lr=2e-3, warmup_steps=2),
                      progress=False)
    assert len(result.losses) == 30
    assert np.mean(result.losses[-5:]) < 0.8 * np.mean(result.losses[:5])
    assert set(result.final_terms) == {"loss", "loss_shrink_maps", "loss_threshold_maps", "loss_binary_maps"}


def test_interrupted_run_resumes_to_the_same_weights(tiny_root: Path, tmp_path: Path):
    settings = FinetuneSettings(steps=4, lr=1e-3, warmup_steps=1, save_every=2)
    straight = _fresh_model()
    finetune(straight, _batches(tiny_root), DBLoss(), settings, checkpoint_prefix=tmp_path / "a" / "last",
             progress=False)

    class Killed(Exception):
        pass

    def kill_at_step_3(step: int, terms: dict[str, float]) -> None:
        if step == 3:
            raise Killed

    interrupted = _fresh_model()
    with pytest.raises(Killed):
        finetune(interrupted, _batches(tiny_root), DBLoss(), settings, checkpoint_prefix=tmp_path / "b" / "last",
                 on_step=kill_at_step_3, progress=False)
    resumed = _fresh_model()  # a new process would start from the initial weights again
    result = finetune(resumed, _batches(tiny_root), DBLoss(), settings, checkpoint_prefix=tmp_path / "b" / "last",
                      progress=False)

    assert len(result.losses) == 4
    expected, got = _state(straight), _state(resumed)
    assert expected.keys() == got.keys()
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=0, atol=1e-6, err_msg=key)


def test_on_step_may_evaluate_the_model_and_stop_the_run(tiny_root: Path):
    """A search trial's rung: on_step puts the model in eval mode to score it; training goes on in train mode
    until on_step returns true, and the run then ends there (fewer steps than the budget, model in eval mode)."""
    seen: list[tuple[int, bool]] = []

    def rung(step: int, terms: dict[str, float]) -> bool:
        seen.append((step, model.training))
        model.eval()  # what scoring the model does
        return step == 3

    model = _fresh_model()
    result = finetune(model, _batches(tiny_root), DBLoss(), FinetuneSettings(steps=6, warmup_steps=1),
                      on_step=rung, progress=False)
    assert seen == [(1, True), (2, True), (3, True)]
    assert result.stopped and result.steps == 3 and len(result.losses) == 3 and not model.training
    finished = finetune(_fresh_model(), _batches(tiny_root), DBLoss(), FinetuneSettings(steps=2, warmup_steps=1),
                        on_step=lambda step, terms: None, progress=False)
    assert not finished.stopped and finished.steps == 2


def test_nan_loss_stops_with_training_diverged(tiny_root: Path):
    def nan_loss(predicts, batch):
        return {"loss": predicts["maps"].mean() * float("nan")}

    with pytest.raises(TrainingDiverged, match="step 1"):
        finetune(_fresh_model(), _batches(tiny_root), nan_loss, FinetuneSettings(steps=3), progress=False)


def test_warmup_then_cosine_schedule():
    scheduler = warmup_cosine(base_lr=1.0, total_steps=10, warmup_steps=4)
    lrs = []
    for _ in range(10):
        lrs.append(scheduler())
        scheduler.step()
    assert lrs[0] == 0.0 and lrs[2] == pytest.approx(0.5) and lrs[4] == pytest.approx(1.0)
    assert all(a > b for a, b in zip(lrs[4:], lrs[5:]))  # cosine decay after warm-up


def test_settings_reject_empty_budget():
    with pytest.raises(ValueError, match="steps"):
        FinetuneSettings(steps=0)
