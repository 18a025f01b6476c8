"""DBLoss against a numpy computation of each term, plus the properties training relies on."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")

import numpy as np  # noqa: E402
import paddle  # noqa: E402
import pytest  # noqa: E402

from train.errors import ConfigError  # noqa: E402
from train.loss import DBLoss  # noqa: E402

EPS = 1e-6


def tiny_batch(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """1x8x8 labels: a 3x4 text block (12 positives), an ignored pixel inside it and two ignored corners."""
    shrink_map = np.zeros((1, 8, 8), np.float32)
    shrink_map[0, 2:5, 2:6] = 1
    shrink_mask = np.ones((1, 8, 8), np.float32)
    shrink_mask[0, 3, 3] = 0
    shrink_mask[0, 0, 0] = shrink_mask[0, 7, 7] = 0
    threshold_map = rng.uniform(0.3, 0.7, (1, 8, 8)).astype(np.float32)
    threshold_mask = np.zeros((1, 8, 8), np.float32)
    threshold_mask[0, 1:6, 1:7] = 1
    return {
        "shrink_map": shrink_map,
        "shrink_mask": shrink_mask,
        "threshold_map": threshold_map,
        "threshold_mask": threshold_mask,
    }


def to_paddle(arrays: dict[str, np.ndarray]) -> dict[str, paddle.Tensor]:
    return {k: paddle.to_tensor(v) for k, v in arrays.items()}


def numpy_dice(pred, gt, mask):
    return 1 - 2 * (pred * gt * mask).sum() / ((pred * mask).sum() + (gt * mask).sum() + EPS)


def numpy_terms(maps: np.ndarray, b: dict[str, np.ndarray], main_loss_type: str) -> dict[str, float]:
    shrink, threshold, binary = maps[:, 0].astype(np.float64), maps[:, 1], maps[:, 2]
    gt, mask = b["shrink_map"], b["shrink_mask"]
    positive, negative = gt * mask, (1 - gt) * mask
    n_pos = int(positive.sum())
    n_neg = int(min(negative.sum(), 3 * n_pos))
    if main_loss_type == "DiceLoss":
        # PaddleOCR's configs: a scalar Dice broadcast to every pixel before the negative mining.
        per_pixel = np.full(gt.shape, numpy_dice(shrink, gt, mask))
    else:
        per_pixel = -(gt * np.log(shrink) + (1 - gt) * np.log(1 - shrink))
    hardest = np.sort((negative * per_pixel).ravel())[::-1][:n_neg]
    shrink_term = ((positive * per_pixel).sum() + hardest.sum()) / (n_pos + n_neg + EPS)
    l1 = (np.abs(threshold - b["threshold_map"]) * b["threshold_mask"]).sum() / (b["threshold_mask"].sum() + EPS)
    return {
        "loss_shrink_maps": 5 * shrink_term,
        "loss_threshold_maps": 10 * l1,
        "loss_binary_maps": numpy_dice(binary, gt, mask),
    }


@pytest.mark.parametrize("main_loss_type", ["DiceLoss", "BCELoss"])
def test_terms_match_a_numpy_computation(main_loss_type):
    rng = np.random.default_rng(0)
    batch = tiny_batch(rng)
    maps = rng.uniform(0.05, 0.95, (1, 3, 8, 8)).astype(np.float32)
    # 61 masked pixels, 12 positives - 1 ignored = 11: N = min(50 negatives, 3 * 11) = 33 hardest negatives.
    expected = numpy_terms(maps, batch, main_loss_type)
    losses = DBLoss(main_loss_type=main_loss_type)({"maps": paddle.to_tensor(maps)}, to_paddle(batch))
    for key, value in expected.items():
        assert float(losses[key]) == pytest.approx(value, rel=1e-5), key
    assert float(losses["loss"]) == pytest.approx(sum(expected.values()), rel=1e-5)
    assert set(losses) == {"loss", "loss_shrink_maps", "loss_threshold_maps", "loss_binary_maps"}


def test_dice_shrink_term_is_plain_dice_and_unbalanced_option():
    # With the scalar Dice the mining only rescales by (P+N)/(P+N+eps): the term is alpha * dice.
    rng = np.random.default_rng(1)
    batch = tiny_batch(rng)
    maps = rng.uniform(0.05, 0.95, (1, 3, 8, 8)).astype(np.float32)
    dice = numpy_dice(maps[:, 0].astype(np.float64), batch["shrink_map"], batch["shrink_mask"])
    for balance in (True, False):
        losses = DBLoss(balance_loss=balance)({"maps": paddle.to_tensor(maps)}, to_paddle(batch))
        assert float(losses["loss_shrink_maps"]) == pytest.approx(5 * dice, rel=1e-5)


def test_perfect_prediction_beats_a_random_one():
    rng = np.random.default_rng(2)
    batch = tiny_batch(rng)
    perfect = np.stack([batch["shrink_map"], batch["threshold_map"], batch["shrink_map"]], axis=1)
    random = rng.uniform(0.05, 0.95, perfect.shape).astype(np.float32)
    loss = DBLoss()
    perfect_loss = float(loss({"maps": paddle.to_tensor(perfect)}, to_paddle(batch))["loss"])
    random_loss = float(loss({"maps": paddle.to_tensor(random)}, to_paddle(batch))["loss"])
    assert perfect_loss < 1e-5 < random_loss


@pytest.mark.parametrize("main_loss_type", ["DiceLoss", "BCELoss"])
def test_empty_masks_give_finite_loss_and_gradient(main_loss_type):
    zeros = np.zeros((2, 8, 8), np.float32)
    batch = {"shrink_map": zeros, "shrink_mask": zeros, "threshold_map": zeros, "threshold_mask": zeros}
    maps = paddle.to_tensor(np.full((2, 3, 8, 8), 0.5, np.float32), stop_gradient=False)
    losses = DBLoss(main_loss_type=main_loss_type)({"maps": maps}, to_paddle(batch))
    losses["loss"].backward()
    assert all(np.isfinite(float(v)) for v in losses.values())
    assert np.isfinite(maps.grad.numpy()).all()


def test_text_free_crop_with_valid_mask_is_finite():
    # No text but a full mask: no positives, so the shrink term is 0; the binary Dice is 1 - 0 = 1.
    zeros, ones = np.zeros((1, 8, 8), np.float32), np.ones((1, 8, 8), np.float32)
    batch = {"shrink_map": zeros, "shrink_mask": ones, "threshold_map": zeros, "threshold_mask": ones}
    maps = paddle.to_tensor(np.full((1, 3, 8, 8), 0.2, np.float32))
    losses = DBLoss()({"maps": maps}, to_paddle(batch))
    assert float(losses["loss_shrink_maps"]) == 0.0
    assert float(losses["loss_binary_maps"]) == pytest.approx(1.0)
    assert float(losses["loss_threshold_maps"]) == pytest.approx(10 * 0.2, rel=1e-5)


@pytest.mark.parametrize("main_loss_type", ["DiceLoss", "BCELoss"])
def test_gradient_reaches_all_three_maps(main_loss_type):
    rng = np.random.default_rng(3)
    batch = tiny_batch(rng)
    logits = paddle.to_tensor(rng.normal(size=(1, 3, 8, 8)).astype(np.float32), stop_gradient=False)
    losses = DBLoss(main_loss_type=main_loss_type)({"maps": paddle.nn.functional.sigmoid(logits)}, to_paddle(batch))
    losses["loss"].backward()
    grad = logits.grad.numpy()
    assert np.isfinite(grad).all()
    assert all(np.abs(grad[0, c]).sum() > 0 for c in range(3))


def test_bad_configuration_raises():
    with pytest.raises(ConfigError):
        DBLoss(main_loss_type="Focal")
    with pytest.raises(ConfigError):
        DBLoss(main_loss_type="BCELoss", balance_loss=False)
