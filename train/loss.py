"""DB (Differentiable Binarization) training loss, numerically the same as PaddleOCR's ``DBLoss``.

PaddleOCR's configs (det_mv3_db, PP-OCRv3, PP-OCRv4 mobile) all set ``main_loss_type: DiceLoss``. ``DBLoss`` hands
that to ``BalanceLoss``, which then computes a *scalar* Dice loss over the shrink map and runs its hard-negative
mining on that scalar broadcast to every pixel. The "OHEM" therefore selects nothing: the shrink term is just
``dice * (P + N) / (P + N + eps)`` with P positive pixels and N = min(negatives, 3P). We reproduce that
computation as it is, because checkpoints and loss curves are only comparable when the loss is the same.
``main_loss_type='BCELoss'`` (what the DB paper and older PaddleOCR versions of ``DBLoss`` allow) runs the same
mining on a per-pixel binary cross-entropy, where it does select the hardest negatives.
"""

from __future__ import annotations

import paddle
import paddle.nn.functional as F

from train.errors import ConfigError

MAIN_LOSS_TYPES = ("DiceLoss", "BCELoss")

# PaddleOCR's DBLoss does not pass its `eps` on to BalanceLoss, so the shrink term always uses this default.
_BALANCE_EPS = 1e-6


def dice_loss(pred: paddle.Tensor, gt: paddle.Tensor, mask: paddle.Tensor, eps: float) -> paddle.Tensor:
    """1 - 2|P∩G| / (|P| + |G|) over the masked pixels of the whole batch; 1 when the mask is empty."""
    intersection = (pred * gt * mask).sum()
    union = (pred * mask).sum() + (gt * mask).sum() + eps
    return 1 - 2.0 * intersection / union


def mask_l1_loss(pred: paddle.Tensor, gt: paddle.Tensor, mask: paddle.Tensor, eps: float) -> paddle.Tensor:
    """Mean absolute error over the masked pixels of the whole batch; 0 when the mask is empty."""
    return ((pred - gt).abs() * mask).sum() / (mask.sum() + eps)


def balanced_loss(
    loss: paddle.Tensor, gt: paddle.Tensor, mask: paddle.Tensor, negative_ratio: float, eps: float
) -> paddle.Tensor:
    """Average `loss` over all positive pixels and the N hardest negatives, N = min(#negatives, ratio * #positives).

    `loss` is either per pixel (same shape as `gt`) or a scalar that PaddleOCR broadcasts to every pixel. The counts
    are truncated to integers exactly as PaddleOCR does. Without positives the result is 0 (and has zero gradient),
    which keeps batches of text-free crops finite.
    """
    positive = gt * mask
    negative = (1 - gt) * mask
    positive_count = int(positive.sum().item())
    negative_count = int(min(negative.sum().item(), positive_count * negative_ratio))
    positive_loss = (positive * loss).sum()
    if negative_count == 0:
        return positive_loss / (positive_count + eps)
    negative_loss = (negative * loss).flatten()
    hardest, _ = paddle.topk(negative_loss, k=negative_count)
    return (positive_loss + hardest.sum()) / (positive_count + negative_count + eps)


class DBLoss(paddle.nn.Layer):
    """alpha * balanced shrink loss + beta * masked L1 on the threshold map + Dice on the approximate binary map.

    `predicts['maps']` is the train-mode head output [B, 3, H, W] (shrink, threshold, binary probabilities);
    `batch` holds `shrink_map`, `shrink_mask`, `threshold_map` and `threshold_mask`, each [B, H, W].
    """

    def __init__(
        self,
        balance_loss: bool = True,
        main_loss_type: str = "DiceLoss",
        alpha: float = 5,
        beta: float = 10,
        ohem_ratio: float = 3,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if main_loss_type not in MAIN_LOSS_TYPES:
            raise ConfigError(f"loss.main_loss_type={main_loss_type!r}: expected one of {list(MAIN_LOSS_TYPES)}")
        if main_loss_type == "BCELoss" and not balance_loss:
            # PaddleOCR would return the unreduced per-pixel map here, which cannot be trained on.
            raise ConfigError("loss.balance_loss=False needs loss.main_loss_type='DiceLoss' (BCELoss is per pixel)")
        self.balance_loss = balance_loss
        self.main_loss_type = main_loss_type
        self.alpha = alpha
        self.beta = beta
        self.ohem_ratio = ohem_ratio
        self.eps = eps

    def forward(self, predicts: dict[str, paddle.Tensor], batch: dict[str, paddle.Tensor]) -> dict[str, paddle.Tensor]:
        maps = predicts["maps"]
        assert maps.ndim == 4 and maps.shape[1] == 3, f"expected train-mode maps [B,3,H,W], got {maps.shape}"
        shrink_map, shrink_mask = batch["shrink_map"], batch["shrink_mask"]
        assert list(shrink_map.shape) == [maps.shape[0], *maps.shape[2:]], (
            f"label maps {shrink_map.shape} do not match predicted maps {maps.shape}"
        )
        loss_shrink = self.alpha * self._shrink_loss(maps[:, 0], shrink_map, shrink_mask)
        loss_threshold = self.beta * mask_l1_loss(
            maps[:, 1], batch["threshold_map"], batch["threshold_mask"], self.eps
        )
        loss_binary = dice_loss(maps[:, 2], shrink_map, shrink_mask, self.eps)
        return {
            "loss": loss_shrink + loss_threshold + loss_binary,
            "loss_shrink_maps": loss_shrink,
            "loss_threshold_maps": loss_threshold,
            "loss_binary_maps": loss_binary,
        }

    def _shrink_loss(self, pred: paddle.Tensor, gt: paddle.Tensor, mask: paddle.Tensor) -> paddle.Tensor:
        if self.main_loss_type == "DiceLoss":
            loss = dice_loss(pred, gt, mask, _BALANCE_EPS)
        else:
            loss = F.binary_cross_entropy(pred, gt, reduction="none")
        if not self.balance_loss:
            return loss
        return balanced_loss(loss, gt, mask, self.ohem_ratio, _BALANCE_EPS)
