"""Task-balanced multitask loss: each task's mean loss, then a weighted mean over the tasks in the batch.

A plain mean over all samples lets the largest task drown the small ones; averaging per task first gives
every task the same say, and `task_weights` lets a user tilt that on purpose.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

TaskType = Literal["binary", "multiclass", "multilabel", "regression"]


@dataclass(frozen=True)
class TaskTarget:
    """One task's slice of a batch: model outputs, targets and per-sample weights."""

    type: TaskType
    logits: torch.Tensor  # (n, K); K = 1 for binary and regression
    targets: torch.Tensor  # binary/multilabel: (n, K) float in {0, 1}; multiclass: (n,) long; regression: (n, 1)
    weight: torch.Tensor | None = None  # (n,) sample weights
    mask: torch.Tensor | None = None  # (n, K) for multilabel: 1 where the label is known (not censored)


def per_sample_loss(t: TaskTarget, focal_gamma: float = 0.0) -> torch.Tensor:
    """Loss per sample, shape (n,), in fp32."""
    logits = t.logits.float()
    if t.type in ("binary", "multilabel"):
        y = t.targets.float().reshape(logits.shape)
        loss = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
        if focal_gamma > 0:
            p = torch.sigmoid(logits)
            p_true = p * y + (1 - p) * (1 - y)
            loss = loss * (1 - p_true).pow(focal_gamma)
        if t.mask is not None:
            m = t.mask.float().reshape(logits.shape)
            return (loss * m).sum(-1) / m.sum(-1).clamp_min(1.0)
        return loss.mean(-1)
    if t.type == "multiclass":
        y = t.targets.long().reshape(-1)
        loss = F.cross_entropy(logits, y, reduction="none")
        if focal_gamma > 0:
            p_true = torch.softmax(logits, -1).gather(-1, y[:, None]).squeeze(-1)
            loss = loss * (1 - p_true).pow(focal_gamma)
        return loss
    if t.type == "regression":
        return F.mse_loss(logits.reshape(-1), t.targets.float().reshape(-1), reduction="none")
    raise ValueError(f"unknown task type {t.type!r}")


def task_loss(t: TaskTarget, focal_gamma: float = 0.0) -> torch.Tensor:
    """Weighted mean of one task's per-sample losses."""
    loss = per_sample_loss(t, focal_gamma)
    if t.weight is None:
        return loss.mean()
    w = t.weight.float().reshape(-1)
    return (loss * w).sum() / w.sum().clamp_min(1e-12)


def balanced_loss(
    tasks: dict[str, TaskTarget],
    task_weights: dict[str, float] | None = None,
    focal_gamma: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted mean over the tasks present in the batch of each task's mean loss.

    Returns the scalar loss and each task's loss as a float, for logging.
    """
    if not tasks:
        raise ValueError("balanced_loss needs at least one task in the batch")
    total, norm, parts = None, 0.0, {}
    for name, t in tasks.items():
        if t.logits.shape[0] == 0:
            continue
        w = 1.0 if task_weights is None else float(task_weights.get(name, 1.0))
        loss = task_loss(t, focal_gamma)
        parts[name] = float(loss.detach())
        total = loss * w if total is None else total + loss * w
        norm += w
    if total is None:
        raise ValueError("balanced_loss: every task in the batch is empty")
    return total / norm, parts
