"""The hybrid Dice + cross-entropy loss MedCondDiff trains its x̂_0 prediction with.

Sparse labels: pixels holding :data:`IGNORE_INDEX` (voxels nobody verified; nnU-Net's ``ignore``
label) add nothing to either term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Label value of unverified pixels in training crops (uint8, far above any class count used here).
IGNORE_INDEX = 255


def soft_dice_loss(logits: torch.Tensor, labels: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - mean soft Dice over the foreground classes (background is excluded: it is easy and huge).

    Ignored pixels are left out of both the prediction and the target sums."""
    probabilities = logits.float().softmax(dim=1)
    labels = labels.long()
    known = labels != IGNORE_INDEX
    target = F.one_hot(labels.where(known, 0), logits.shape[1]).permute(0, 3, 1, 2).float()
    if not bool(known.all()):
        weight = known[:, None].float()
        probabilities, target = probabilities * weight, target * weight
    dims = (0, 2, 3)  # batch Dice: a slice without a class does not yield a 0/0 term
    intersection = (probabilities * target).sum(dims)
    total = probabilities.sum(dims) + target.sum(dims)
    dice = (2 * intersection + smooth) / (total + smooth)
    return 1 - dice[1:].mean()


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the pixels that are not ignored; 0 (with a gradient path) when all are."""
    labels = labels.long()
    known = int((labels != IGNORE_INDEX).sum())
    if known == 0:
        # F.cross_entropy's mean over no pixel is NaN; an all-ignored batch must simply teach nothing.
        return logits.float().sum() * 0.0
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum") / known


def hybrid_loss(logits: torch.Tensor, labels: torch.Tensor, dice_weight: float = 1.0, ce_weight: float = 1.0
                ) -> dict[str, torch.Tensor]:
    dice = soft_dice_loss(logits, labels)
    ce = masked_cross_entropy(logits, labels)
    return {"loss": dice_weight * dice + ce_weight * ce, "dice_loss": dice.detach(), "ce": ce.detach()}


#: How ignored pixels of a sparse label enter the clean mask x_0 that training noises: "prediction"
#: (the model's own arg-max x̂_0 from pure noise, i.e. its guess from the image alone) or "background".
IGNORE_FILLS = ("prediction", "background")


def fill_ignored(labels: torch.Tensor, how: str, predict) -> torch.Tensor:
    """``labels`` with every :data:`IGNORE_INDEX` pixel given a class, for the diffusion target only
    (the loss still ignores them). ``predict()`` returns a label map of the same shape; it is called
    only when ``how`` is "prediction" and some pixel is ignored, since it costs a forward pass."""
    if how not in IGNORE_FILLS:
        raise ValueError(f"ignore_fill must be one of {IGNORE_FILLS}, not {how!r}")
    labels = labels.long()
    ignored = labels == IGNORE_INDEX
    if not bool(ignored.any()):
        return labels
    fill = predict().to(labels.device).long() if how == "prediction" else torch.zeros_like(labels)
    return torch.where(ignored, fill, labels)
