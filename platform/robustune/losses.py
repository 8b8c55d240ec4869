"""Losses shared by several defenses.

Label smoothing, one convention for every defense: `label_smoothing = s` puts 1 - s on the true class and
spreads s evenly over the C - 1 other classes (the convention of the LAS-AT, FGSM-SDI, FGSM-PGI and ATLD
authors' code, whose "factor" f is 1 - s). s = 0 is plain cross-entropy. Note that torch's
`F.cross_entropy(label_smoothing=s)` differs: it spreads s over all C classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def smoothed_targets(y: Tensor, num_classes: int, smoothing: float) -> Tensor:
    """(B, C) soft targets: 1 - s on the label, s / (C - 1) on every other class."""
    targets = torch.full((len(y), num_classes), smoothing / (num_classes - 1), device=y.device)
    targets.scatter_(1, y[:, None], 1.0 - smoothing)
    return targets


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy against soft targets."""
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def smoothed_cross_entropy(logits: Tensor, y: Tensor, smoothing: float) -> Tensor:
    """Mean cross-entropy with the label smoothing above; exactly F.cross_entropy when s = 0."""
    if smoothing == 0:
        return F.cross_entropy(logits, y)
    return soft_cross_entropy(logits, smoothed_targets(y, logits.shape[1], smoothing).to(logits.dtype))
