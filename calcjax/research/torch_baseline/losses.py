"""The bootstrap-IoU loss in PyTorch, the twin of ``calcjax.model.losses`` (logits NCHW, labels (B, H, W))."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from calcjax.model.losses import IOU_CLASSES, num_hardest


def bootstrap_iou_loss(
    logits, labels, *, rho: float, k_min: int, lam: float, smooth: float = 1.0, iou_classes: str = "present"
):
    b, k, h, w = logits.shape
    ce = F.cross_entropy(logits.float(), labels.long(), reduction="none").reshape(b, h * w)
    bce = torch.topk(ce, num_hardest(h * w, rho, k_min), dim=1).values.mean()
    p = torch.softmax(logits.float(), dim=1)[:, 1:]
    y = F.one_hot(labels.long(), k).permute(0, 3, 1, 2).float()[:, 1:]
    inter = (p * y).sum(dim=(0, 2, 3))
    union = (p + y - p * y).sum(dim=(0, 2, 3))
    gap = 1.0 - (inter + smooth) / (union + smooth)
    if iou_classes == "all":
        return bce + lam * gap.mean()
    if iou_classes not in IOU_CLASSES:
        raise ValueError(f"iou_classes must be one of {IOU_CLASSES}, got {iou_classes!r}")
    present = (y.sum(dim=(0, 2, 3)) > 0).float()
    return bce + lam * (present * gap).sum() / present.sum().clamp(min=1.0)
