"""Losses from batches: next-event (forecasting) and the task-balanced multitask loss."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from kit.train.batching import TASK_TOKEN_TYPE, Row, collate, model_inputs
from kit.train.loss import TaskTarget, balanced_loss


def used_inputs(model) -> list[str]:
    """The optional per-token feature tensors the model was built with (DDP-wrapped or not)."""
    return list(getattr(model, "module", model).inputs.required)


def autocast(device: torch.device, bf16: bool):
    if torch.device(device).type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def next_event_loss(lm_logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Mean next-token cross-entropy over real history positions (never predicting a pad or a task token)."""
    ids = batch["input_ids"].to(lm_logits.device)
    keep = (batch["attention_mask"][:, 1:] != 0) & (batch["token_type_ids"][:, 1:] != TASK_TOKEN_TYPE)
    keep = keep.to(lm_logits.device)
    logits = lm_logits[:, :-1][keep]
    if logits.numel() == 0:
        return lm_logits.sum() * 0.0
    return F.cross_entropy(logits.float(), ids[:, 1:][keep])


def task_targets(out, batch: dict, rows: list[Row], types: dict[str, str], device) -> dict[str, TaskTarget]:
    by_task: dict[str, list[int]] = {}
    for i, name in enumerate(batch["tasks"]):
        by_task.setdefault(name, []).append(i)
    targets = {}
    for name, idx in by_task.items():
        kind = types[name]
        sel = torch.tensor(idx, device=device)
        y = torch.stack([torch.from_numpy(rows[i].target) for i in idx]).to(device)
        if kind == "multiclass":
            y = y[:, 0].long()
        mask = None
        if kind == "multilabel" and rows[idx[0]].mask is not None:
            mask = torch.stack([torch.from_numpy(rows[i].mask) for i in idx]).to(device)
        weight = torch.tensor([rows[i].weight for i in idx], dtype=torch.float32, device=device)
        targets[name] = TaskTarget(kind, out.task_outputs[name].index_select(0, sel), y, weight, mask)
    return targets


def multitask_loss(
    model,
    rows: list[Row],
    types: dict[str, str],
    device: torch.device,
    *,
    task_weights: dict[str, float] | None = None,
    focal_gamma: float = 0.0,
    keep_forecasting: float = 0.0,
    bf16: bool = True,
) -> tuple[torch.Tensor, dict[str, float]]:
    batch = collate(rows)
    with autocast(device, bf16):
        out = model(**model_inputs(batch, device, used_inputs(model)), compute_lm_logits=keep_forecasting > 0)
    loss, parts = balanced_loss(task_targets(out, batch, rows, types, device), task_weights, focal_gamma)
    # Heads of tasks absent from this batch get an exact-zero term, so DDP sees every output reach the loss.
    loss = loss + sum(o.float().sum() * 0.0 for o in out.task_outputs.values())
    if keep_forecasting > 0:
        lm = next_event_loss(out.lm_logits, batch)
        parts["forecasting"] = float(lm.detach())
        loss = loss + keep_forecasting * lm
    return loss, parts


def pretrain_loss(model, rows: list[Row], device: torch.device, *, bf16: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
    batch = collate(rows)
    with autocast(device, bf16):
        out = model(**model_inputs(batch, device, used_inputs(model)), compute_lm_logits=True)
    loss = next_event_loss(out.lm_logits, batch)
    return loss, {"next_event": float(loss.detach())}
