"""The hybrid Dice + cross-entropy loss MedCondDiff trains its x̂_0 prediction with."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_dice_loss(logits: torch.Tensor, labels: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - mean soft Dice over the foreground classes (background is excluded: it is easy and huge)."""
    probabilities = logits.float().softmax(dim=1)
    target = F.one_hot(labels.long(), logits.shape[1]).permute(0, 3, 1, 2).float()
    dims = (0, 2, 3)  # batch Dice: a slice without a class does not yield a 0/0 term
    intersection = (probabilities * target).sum(dims)
    total = probabilities.sum(dims) + target.sum(dims)
    dice = (2 * intersection + smooth) / (total + smooth)
    return 1 - dice[1:].mean()


def hybrid_loss(logits: torch.Tensor, labels: torch.Tensor, dice_weight: float = 1.0, ce_weight: float = 1.0
                ) -> dict[str, torch.Tensor]:
    dice = soft_dice_loss(logits, labels)
    ce = F.cross_entropy(logits.float(), labels.long())
    return {"loss": dice_weight * dice + ce_weight * ce, "dice_loss": dice.detach(), "ce": ce.detach()}
