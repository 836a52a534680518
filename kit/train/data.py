"""A built dataset in memory as Rows per (split, task), and the deterministic task-mixing batch sampler."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from kit.datasets.build import read_manifest, scan_rows
from kit.errors import KitError
from kit.models import TaskSpec
from kit.train.batching import Row, make_row

SUPERVISED = ("binary", "multiclass", "multilabel", "regression")


@dataclass
class TaskRows:
    name: str
    type: str
    num_outputs: int
    rows: list[Row]
    subject_ids: np.ndarray
    prediction_times: np.ndarray


@dataclass
class LoadedDataset:
    root: Path
    manifest: dict
    splits: dict[str, dict[str, TaskRows]]  # split -> task -> rows

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    def supervised_tasks(self, only: list[str] | None = None) -> list[TaskSpec]:
        specs = []
        for name, t in self.manifest["tasks"].items():
            if t["type"] not in SUPERVISED or (only is not None and name not in only):
                continue
            specs.append(TaskSpec(name=name, type=t["type"], num_outputs=int(t["num_outputs"])))
        if only is not None:
            unknown = sorted(set(only) - {s.name for s in specs})
            if unknown:
                raise KitError(f"unknown or unsupervised task(s) {unknown}; supervised tasks: "
                               f"{sorted(n for n, t in self.manifest['tasks'].items() if t['type'] in SUPERVISED)}")
        return specs

    def forecast_task(self) -> str | None:
        return next((n for n, t in self.manifest["tasks"].items() if t["type"] == "forecast"), None)


# The list columns a Row is built from, and the dtype make_row converts each to (an array of it passes through).
_TIMES = pl.List(pl.Datetime("us"))
_LIST_DTYPES = {"input_ids": np.int64, "token_time": None, "token_age": np.float32, "token_type": np.int64,
                "token_visit": np.int64}


def rows_from_frame(df: pl.DataFrame | pl.LazyFrame, name: str, kind: str, num_outputs: int) -> tuple[list[Row], pl.DataFrame]:
    """Rows of one task from dataset-schema records; the dataset loader and the Predictor both read rows this way."""
    df = df.collect() if isinstance(df, pl.LazyFrame) else df
    # Times as int64 microseconds up front: converting datetimes token by token in Python dominated load time.
    epoch = (pl.col("token_time").cast(pl.List(pl.Int64)) if df.get_column("token_time").dtype == _TIMES
             else pl.col("token_time").list.eval(pl.element().dt.epoch("us")))
    df = df.with_columns(epoch, pl.col("prediction_time").dt.epoch("us").alias("_pred_us"))
    with_token = kind in SUPERVISED
    lists = [(c, _flat(df.get_column(c)), dtype) for c, dtype in _LIST_DTYPES.items()]
    if any(flat is None for _, flat, _ in lists):  # a null list or token: make_row sees what iter_rows gives
        rows = [make_row({**rec, "prediction_time": rec["_pred_us"]}, name, kind, num_outputs,
                         with_task_token=with_token) for rec in df.iter_rows(named=True)]
        return rows, df
    # Token lists sliced from the flat Arrow buffers as fresh arrays of make_row's dtypes (the times as Python ints,
    # as iter_rows gives them), the other fields column by column: iter_rows built a Python object per token.
    lists = [(c, off.tolist(), values, dtype) for c, (off, values), dtype in lists]
    names = [c for c in df.columns if c not in _LIST_DTYPES]
    rows = []
    for i, scalars in enumerate(zip(*(df.get_column(c).to_list() for c in names))):
        rec = dict(zip(names, scalars))
        for c, off, values, dtype in lists:
            part = values[off[i]:off[i + 1]]
            rec[c] = part.tolist() if dtype is None else part.astype(dtype)
        rec["prediction_time"] = rec["_pred_us"]
        rows.append(make_row(rec, name, kind, num_outputs, with_task_token=with_token))
    return rows, df


def _flat(column: pl.Series) -> tuple[np.ndarray, np.ndarray] | None:
    """A list column's offsets and flat values as numpy; None where a list or an element is null."""
    arr = column.to_arrow()
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if arr.null_count or arr.values.null_count:
        return None
    return arr.offsets.to_numpy(), arr.values.to_numpy(zero_copy_only=False)


def _task_rows(root: Path, split: str, name: str, info: dict) -> TaskRows:
    kind = info["type"]
    rows, df = rows_from_frame(scan_rows(root, split, name), name, kind, int(info["num_outputs"]))
    return TaskRows(
        name=name,
        type=kind,
        num_outputs=int(info["num_outputs"]),
        rows=rows,
        subject_ids=df.get_column("subject_id").to_numpy(),
        prediction_times=df.get_column("prediction_time").to_numpy(),
    )


def load_dataset(root: Path | str, splits: tuple[str, ...] = ("train", "val", "test")) -> LoadedDataset:
    root = Path(root)
    manifest = read_manifest(root)
    out = {s: {name: _task_rows(root, s, name, info) for name, info in manifest["tasks"].items()} for s in splits}
    return LoadedDataset(root=root, manifest=manifest, splits=out)


def mixing_probabilities(ds: LoadedDataset, tasks: list[str]) -> dict[str, float]:
    """The dataset's sampling weights restricted to `tasks` with train rows, renormalized."""
    raw = {t: float(ds.manifest["tasks"][t].get("sampling_weight", 1.0)) for t in tasks if ds.splits["train"][t].rows}
    total = sum(raw.values())
    if total <= 0:
        raise KitError(f"no train samples for any of the tasks {tasks}: nothing to finetune on")
    return {t: w / total for t, w in raw.items()}


def sample_batch(
    train: dict[str, TaskRows], probs: dict[str, float], batch_size: int, *, seed: int, step: int, micro: int = 0
) -> list[Row]:
    """A batch that mixes tasks by `probs`; a pure function of (seed, step, micro), so resuming needs no sampler state."""
    rng = np.random.default_rng([seed, step, micro])
    names = sorted(probs)
    p = np.array([probs[n] for n in names])
    picks = rng.choice(len(names), size=batch_size, p=p / p.sum())
    rows = []
    for k in picks:
        pool = train[names[k]].rows
        rows.append(pool[int(rng.integers(len(pool)))])
    return rows
