"""Model scores for dataset rows: probabilities per task, in row order. Shared by evaluation and the Predictor."""

from __future__ import annotations

import numpy as np
import torch

from kit.train.batching import Row, collate, collate_histories, collate_last_tokens, model_inputs
from kit.train.objectives import autocast, next_event_loss, used_inputs


def scores_from_outputs(kind: str, raw: torch.Tensor) -> np.ndarray:
    raw = raw.float()
    if kind in ("binary", "multilabel"):
        p = torch.sigmoid(raw)
        return (p[:, 0] if kind == "binary" else p).cpu().numpy()
    if kind == "multiclass":
        return torch.softmax(raw, -1).cpu().numpy()
    return raw[:, 0].cpu().numpy()


@torch.no_grad()
def row_logits(model, rows: list[Row], device, *, batch_size: int = 64, bf16: bool = True,
               task: str | None = None) -> list[torch.Tensor]:
    """Each row's task head output (its logits, (K,) fp32 on CPU): the head of `task`, or of each row's own task, so
    rows of several tasks can share a batch (the Predictor scores all of a subject's tasks in one pass).

    With a recurrent backbone each distinct history is read once and every row's task token is stepped from its state
    (a subject's tasks share one history pass); rows are otherwise scored whole."""
    if any(m.training for m in model.modules()):  # eval() itself walks every module: ~1 ms a call on a small CPU
        model.eval()
    if getattr(model, "streams_state", False):
        return _stepped_logits(model, rows, device, batch_size=batch_size, bf16=bf16, task=task)
    return _whole_row_logits(model, rows, device, batch_size=batch_size, bf16=bf16, task=task)


def _whole_row_logits(model, rows: list[Row], device, *, batch_size: int, bf16: bool, task: str | None) -> list[torch.Tensor]:
    out_rows: list[torch.Tensor] = []
    for i in range(0, len(rows), batch_size):
        part = rows[i : i + batch_size]
        batch = collate(part)
        with autocast(torch.device(device), bf16):
            out = model(**model_inputs(batch, device, used_inputs(model)), compute_lm_logits=False)
        names = [task or r.task for r in part]
        heads = {t: out.task_outputs[t].float().cpu() for t in set(names)}
        out_rows.extend(heads[t][j] for j, t in enumerate(names))
    return out_rows


# CPU GEMMs pick their kernel by the row count, and kernels round differently: evaluation and the Predictor batch
# differently yet must agree exactly, so no model call's row count depends on the company a row keeps. A history is
# read with histories of its own length only, padded to at least _MIN_ROWS positions; task tokens are always stepped
# _STEP_ROWS at a time (a short chunk is filled with repeats).
_MIN_ROWS = 8
_STEP_ROWS = 32
_STATE_WINDOW = 16  # history batches whose states are held at once


def _history_key(r: Row) -> bytes:
    return b"".join(a[:-1].tobytes() for a in (r.input_ids, r.time, r.age, r.token_type, r.visit))


@torch.no_grad()  # scoring only: the fused CPU step (MambaMixer.step) serves no-grad calls
def _stepped_logits(model, rows: list[Row], device, *, batch_size: int, bf16: bool, task: str | None) -> list[torch.Tensor]:
    from kit.models.mamba import MambaState

    used = set(used_inputs(model))
    members: dict[bytes, list[int]] = {}
    for i, r in enumerate(rows):
        members.setdefault(_history_key(r), []).append(i)
    batches = _history_batches(model, [(max(_MIN_ROWS, len(rows[m[0]].input_ids) - 1), m) for m in members.values()],
                               batch_size)
    out: list[torch.Tensor | None] = [None] * len(rows)
    dev = torch.device(device)

    def inputs(batch: dict) -> dict:
        if "attention_mask" in batch and bool(batch["attention_mask"].all()):
            batch = {**batch, "attention_mask": None}  # no padding: masking by ones would only cost time
        return {k: None if v is None else v.to(dev) for k, v in batch.items() if k in ("input_ids", "attention_mask") or k in used}

    # Task tokens are stepped in full batches across history batches (many lengths make many small history
    # batches); a window of history batches bounds the states held at once.
    for w in range(0, len(batches), _STATE_WINDOW):
        window = batches[w:w + _STATE_WINDOW]
        states, todo = [], []
        for part in window:
            with autocast(dev, bf16):
                states.append(model.history_state(**inputs(collate_histories([rows[m[0]] for m in part], min_len=_MIN_ROWS))))
            base = sum(len(p) for p in window[:len(states) - 1])
            todo += [(i, base + g) for g, m in enumerate(part) for i in m]
        state = MambaState(conv=[torch.cat(layer) for layer in zip(*(st.conv for st in states))],
                           ssm=[torch.cat(layer) for layer in zip(*(st.ssm for st in states))])
        for s in range(0, len(todo), _STEP_ROWS):
            chunk = todo[s:s + _STEP_ROWS]
            chunk = chunk + [chunk[-1]] * (_STEP_ROWS - len(chunk))  # repeated rows are computed and dropped
            index = torch.tensor([g for _, g in chunk], device=dev)
            step_state = MambaState(conv=[c[index] for c in state.conv], ssm=[h[index] for h in state.ssm])
            with autocast(dev, bf16):
                heads = model.task_step(step_state, **inputs(collate_last_tokens([rows[i] for i, _ in chunk])))
            for k, (i, _) in enumerate(chunk):
                if out[i] is None:
                    out[i] = heads[task or rows[i].task][k].float().cpu()
    return out


def _history_batches(model, histories: list[tuple[int, list[int]]], batch_size: int) -> list[list[list[int]]]:
    """Histories (length, rows) grouped into passes. Left padding leaves a state exactly as it was when the model's
    in_proj has no bias (padded positions feed zeros and keep the state zero; tests check it bit for bit), so
    histories within a quarter of the longest one's length share a pass: each pass costs ~10 ms of fixed overhead on
    a CPU besides its tokens, and a batch of patients of assorted lengths took one pass each. With a bias, padding
    would reach the state: only equal lengths share."""
    pads = all(getattr(layer.mixer.in_proj, "bias", None) is None for layer in model.backbone.layers)
    batches: list[list[list[int]]] = []
    longest = 0
    for n, m in sorted(histories, key=lambda h: -h[0]):
        if batches and len(batches[-1]) < batch_size and (n == longest or (pads and 4 * n >= 3 * longest)):
            batches[-1].append(m)
        else:
            batches.append([m])
            longest = n
    return batches


def task_logits(model, rows: list[Row], task: str, device, *, batch_size: int = 64, bf16: bool = True) -> torch.Tensor:
    """Raw head outputs (logits) for one task's rows, (n, K), fp32 on CPU."""
    if not rows:
        return torch.zeros(0, model.task_heads.heads[task].out_features)
    return torch.stack(row_logits(model, rows, device, batch_size=batch_size, bf16=bf16, task=task))


def targets_array(kind: str, rows: list[Row]) -> np.ndarray:
    if not rows:
        return np.zeros(0)
    y = np.stack([r.target for r in rows])
    return y[:, 0].astype(int if kind in ("binary", "multiclass") else float) if kind != "multilabel" else y


@torch.no_grad()
def next_event_metrics(model, rows: list[Row], device, *, batch_size: int = 32, k: int = 10, bf16: bool = True) -> dict[str, float]:
    """Next-event loss, perplexity and top-k accuracy over history positions."""
    from kit.train.batching import TASK_TOKEN_TYPE

    model.eval()
    total_loss, total_n, hits = 0.0, 0, 0
    for i in range(0, len(rows), batch_size):
        batch = collate(rows[i : i + batch_size])
        with autocast(torch.device(device), bf16):
            out = model(**model_inputs(batch, device, used_inputs(model)), compute_lm_logits=True)
        keep = ((batch["attention_mask"][:, 1:] != 0) & (batch["token_type_ids"][:, 1:] != TASK_TOKEN_TYPE)).to(device)
        n = int(keep.sum())
        if n == 0:
            continue
        logits = out.lm_logits[:, :-1][keep].float()
        target = batch["input_ids"][:, 1:].to(device)[keep]
        total_loss += float(next_event_loss(out.lm_logits, batch)) * n
        topk = logits.topk(min(k, logits.shape[-1]), dim=-1).indices
        hits += int((topk == target[:, None]).any(-1).sum())
        total_n += n
    if total_n == 0:
        return {"loss": float("nan"), "perplexity": float("nan"), f"top{k}_accuracy": float("nan"), "positions": 0}
    mean = total_loss / total_n
    return {"loss": mean, "perplexity": float(np.exp(mean)), f"top{k}_accuracy": hits / total_n, "positions": total_n}
