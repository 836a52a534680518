"""Dataset rows -> model tensors. Training, evaluation and the Predictor all go through here (no train/serve skew).

A row is read as: history tokens, then the task token; the model predicts at the task token. Per-token features:
`time` = days since the previous token (the task token: days from the last history token to the prediction time),
`age` = years, `token_type_ids`, `visit_ids`. Deltas rather than times relative to the prediction time, so a
next-event objective over the history never learns where the window ends.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

TASK_TOKEN_TYPE = 8  # kit.tokenizer.TOKEN_TYPES["task"]; kept literal so kit.train imports without polars
_US_PER_DAY = 86400 * 1e6


@dataclass
class Row:
    """One sample as arrays, ready to collate."""

    input_ids: np.ndarray  # (n,) int64, task token appended for task rows
    time: np.ndarray  # (n,) float32 days since previous token
    age: np.ndarray  # (n,) float32 years
    token_type: np.ndarray  # (n,) int64
    visit: np.ndarray  # (n,) int64
    task: str
    target: np.ndarray  # (K,) float32 labels (class index for multiclass as a 1-vector)
    mask: np.ndarray | None  # (K,) multilabel at-risk mask
    weight: float


def _deltas_days(times_us: np.ndarray, end_us: int | None) -> np.ndarray:
    t = times_us.astype(np.int64)
    d = np.zeros(len(t) + (1 if end_us is not None else 0), dtype=np.float64)
    if len(t) > 1:
        d[1 : len(t)] = np.diff(t) / _US_PER_DAY
    if end_us is not None and len(t):
        d[len(t)] = (end_us - t[-1]) / _US_PER_DAY
    return np.clip(d, 0, None).astype(np.float32)


def make_row(rec: dict, task: str, task_type: str, num_outputs: int, *, with_task_token: bool = True) -> Row:
    """Build a Row from one dataset record (a dict with the dataset's ROW_SCHEMA columns)."""
    ids = np.asarray(rec["input_ids"], dtype=np.int64)
    times = np.asarray([t.timestamp() * 1e6 if hasattr(t, "timestamp") else t for t in rec["token_time"]], dtype=np.float64)
    pred = rec["prediction_time"]
    pred_us = int(pred.timestamp() * 1e6) if hasattr(pred, "timestamp") else int(pred)
    age = np.asarray(rec["token_age"], dtype=np.float32)
    ttype = np.asarray(rec["token_type"], dtype=np.int64)
    visit = np.asarray(rec["token_visit"], dtype=np.int64)
    if with_task_token:
        ids = np.append(ids, int(rec["task_token_id"]))
        last_age = float(age[-1]) if len(age) else -1.0
        age_at_pred = last_age + (pred_us - times[-1]) / (_US_PER_DAY * 365.25) if len(age) and last_age >= 0 else -1.0
        age = np.append(age, np.float32(age_at_pred))
        ttype = np.append(ttype, TASK_TOKEN_TYPE)
        visit = np.append(visit, 0)
        time = _deltas_days(times, pred_us)
    else:
        time = _deltas_days(times, None)
    if task_type == "multilabel":
        target = np.asarray(rec["labels"], dtype=np.float32)
        mask = np.asarray(rec["label_mask"], dtype=np.float32) if rec.get("label_mask") is not None else None
    elif task_type in ("binary", "multiclass", "regression"):
        label = rec.get("label")
        target = np.asarray([np.nan if label is None else label], dtype=np.float32)
        mask = None
    else:  # forecast / pretraining rows carry no label
        target, mask = np.zeros(0, np.float32), None
    weight = rec.get("sample_weight")
    return Row(ids, time, age.astype(np.float32), ttype, visit, task, target, mask, 1.0 if weight is None else float(weight))


def collate(rows: list[Row], pad_id: int = 0) -> dict[str, torch.Tensor | list[str]]:
    """Right-pad a list of rows; `task_positions` is each row's last real token (the task token)."""
    n = max(len(r.input_ids) for r in rows)
    b = len(rows)
    input_ids = np.full((b, n), pad_id, dtype=np.int64)
    attention = np.zeros((b, n), dtype=np.int64)
    time = np.zeros((b, n), dtype=np.float32)
    age = np.zeros((b, n), dtype=np.float32)
    ttype = np.zeros((b, n), dtype=np.int64)
    visit = np.zeros((b, n), dtype=np.int64)
    for i, r in enumerate(rows):
        k = len(r.input_ids)
        input_ids[i, :k] = r.input_ids
        attention[i, :k] = 1
        time[i, :k] = r.time
        age[i, :k] = r.age
        ttype[i, :k] = r.token_type
        visit[i, :k] = r.visit
    return {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention),
        "time": torch.from_numpy(time),
        "age": torch.from_numpy(age),
        "token_type_ids": torch.from_numpy(ttype),
        "visit_ids": torch.from_numpy(visit),
        "task_positions": torch.from_numpy(attention.sum(1) - 1),
        "tasks": [r.task for r in rows],
    }


def collate_histories(rows: list[Row], *, min_len: int = 1, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """LEFT-pad each row's history (the row without its last token, the task token) to a common length of at least
    `min_len`, so every row's history ends at the last position, where a recurrent backbone's state is read."""
    n = max(min_len, max(len(r.input_ids) - 1 for r in rows))
    b = len(rows)
    out = {"input_ids": np.full((b, n), pad_id, dtype=np.int64), "attention_mask": np.zeros((b, n), dtype=np.int64),
           "time": np.zeros((b, n), dtype=np.float32), "age": np.zeros((b, n), dtype=np.float32),
           "token_type_ids": np.zeros((b, n), dtype=np.int64), "visit_ids": np.zeros((b, n), dtype=np.int64)}
    for i, r in enumerate(rows):
        k = len(r.input_ids) - 1
        if k <= 0:
            continue
        out["input_ids"][i, n - k:] = r.input_ids[:-1]
        out["attention_mask"][i, n - k:] = 1
        out["time"][i, n - k:] = r.time[:-1]
        out["age"][i, n - k:] = r.age[:-1]
        out["token_type_ids"][i, n - k:] = r.token_type[:-1]
        out["visit_ids"][i, n - k:] = r.visit[:-1]
    return {k: torch.from_numpy(v) for k, v in out.items()}


def collate_last_tokens(rows: list[Row]) -> dict[str, torch.Tensor]:
    """Each row's last token (the task token) as a (B, 1) batch."""
    return {
        "input_ids": torch.from_numpy(np.array([[r.input_ids[-1]] for r in rows], dtype=np.int64)),
        "time": torch.from_numpy(np.array([[r.time[-1]] for r in rows], dtype=np.float32)),
        "age": torch.from_numpy(np.array([[r.age[-1]] for r in rows], dtype=np.float32)),
        "token_type_ids": torch.from_numpy(np.array([[r.token_type[-1]] for r in rows], dtype=np.int64)),
        "visit_ids": torch.from_numpy(np.array([[r.visit[-1]] for r in rows], dtype=np.int64)),
    }


def model_inputs(batch: dict, device: torch.device | str, used: list[str]) -> dict[str, torch.Tensor]:
    """The tensors a KitModel forward takes, on `device`; `used` names the optional feature tensors it was built with."""
    keys = ["input_ids", "attention_mask", "task_positions", *used]
    return {k: batch[k].to(device) for k in keys}
