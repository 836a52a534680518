"""Build the prompted multitask dataset: one row per (task, sample), Parquet shards per split and task, a manifest.

Layout of the output directory:
    manifest.json                         tasks, counts and prevalence per split, vocab size, mixing, config hash
    tokenizer.json                        the tokenizer fit on the train split (reuse it at prediction time)
    config.yaml                           the effective build config
    data/<split>/<task>/part-NNNNN.parquet  rows of one chunk of subjects

The vertical is found through `kit.registry.vertical(name)`; nothing here knows clinical terms.
Subjects are processed in chunks (`subjects_per_chunk`), so memory stays bounded however many subjects there are.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import yaml

from kit import registry
from kit.datasets.config import DatasetConfig
from kit.datasets.mixing import mixing_weights
from kit.datasets.splits import SPLITS, assign_splits
from kit.datasets.tasks import PreparedTask, TaskInfo
from kit.errors import KitError
from kit.events import DATA_DIR, read_codes, read_dataset_metadata, read_subjects, scan_events
from kit.fsutil import atomic_dir
from kit.tokenizer import Tokenizer, windows

FORMAT = "kit-prompted-multitask-dataset"
VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"

ROW_SCHEMA: dict[str, pl.DataType] = {
    "task": pl.String(),
    "subject_id": pl.Int64(),
    "prediction_time": pl.Datetime("us"),
    "split": pl.String(),
    "input_ids": pl.List(pl.Int32()),
    "token_time": pl.List(pl.Datetime("us")),
    "token_age": pl.List(pl.Float32()),
    "token_type": pl.List(pl.Int8()),
    "token_visit": pl.List(pl.Int32()),
    "n_tokens": pl.Int32(),
    "task_token_id": pl.Int32(),
    "prompt": pl.String(),
    "label": pl.Float32(),
    "labels": pl.List(pl.Float32()),
    "label_mask": pl.List(pl.Float32()),
    "target_ids": pl.List(pl.Int32()),
    "sample_weight": pl.Float32(),
}

COLUMN_DOCS = {
    "task": "task name",
    "subject_id": "event-store subject id",
    "prediction_time": "the moment the prediction is made; every input token is strictly before it",
    "split": "train / val / test by a deterministic hash of subject_id",
    "input_ids": "history tokens, oldest first, left-truncated to max_len ([CLS] and static tokens kept)",
    "token_time": "per-token timestamp",
    "token_age": "per-token age in years (-1 when birth is unknown)",
    "token_type": "per-token type id (tokenizer.json token_types)",
    "token_visit": "per-token visit number within the window (1 = first visit shown), 0 outside visits",
    "n_tokens": "length of input_ids",
    "task_token_id": "the task token; the model reads input_ids then this token and predicts at it",
    "prompt": "text form of the task prompt (for text-LM backbones)",
    "label": "binary 0/1, multiclass class index, regression value; null for multilabel and forecast",
    "labels": "multilabel 0/1 vector (classes in manifest order); null otherwise",
    "label_mask": "multilabel: 1 where the label is at risk (not diagnosed before the prediction time)",
    "target_ids": "forecast: the next tokens at or after the prediction time",
    "sample_weight": "per-sample loss weight",
}


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _chunks(ids: list[int], size: int) -> list[list[int]]:
    return [ids[i : i + size] for i in range(0, len(ids), size)]


def _plan_chunks(events_dir: Path, known: list[int], size: int) -> list[tuple[list[str], list[int]]]:
    """(shard files, subject ids) per chunk: chunks never cross a shard, so each reads one shard (streaming per
    subject shard). If a subject appears in two shards (not a valid event store, but cheap to survive), every chunk
    reads all shards instead."""
    shards = [str(p) for p in sorted((Path(events_dir) / DATA_DIR).glob("*.parquet"))]
    known_set = set(known)
    per_shard = []
    for shard in shards:
        sids = pl.scan_parquet(shard).select(pl.col("subject_id").unique()).collect().get_column("subject_id")
        per_shard.append(sorted(int(x) for x in sids if int(x) in known_set))
    if sum(len(p) for p in per_shard) != len({s for p in per_shard for s in p}):
        return [(shards, c) for c in _chunks(sorted(known_set), size)]
    return [([shard], c) for shard, sids in zip(shards, per_shard) for c in _chunks(sids, size)]


def _forecast_targets(tokens: pl.DataFrame, rows: pl.DataFrame, n: int) -> pl.DataFrame:
    """The first n tokens at or after each prediction time, from the same subject."""
    tok = tokens.with_row_index("_g").with_columns(pl.col("_g").cast(pl.Int64))
    last = tok.group_by("subject_id").agg(pl.col("_g").max().alias("_last"))
    r = (
        rows.with_row_index("_r")
        .sort("prediction_time")
        .join_asof(
            tok.select("subject_id", "time", "_g").sort("time"),
            left_on="prediction_time", right_on="time", by="subject_id",
            strategy="forward", allow_exact_matches=True, check_sortedness=False,
        )
        .join(last, on="subject_id", how="left")
        .sort("_r")
    )
    start = pl.col("_g")
    stop = pl.min_horizontal(pl.col("_g") + n, pl.col("_last") + 1)
    r = r.with_columns(pl.int_ranges(start.fill_null(0), stop.fill_null(0)).alias("_idx"))
    ids = tok.get_column("token_id")
    flat = r.select("_r", "_idx").explode("_idx").drop_nulls("_idx")
    flat = flat.with_columns(ids.gather(flat.get_column("_idx")).alias("t"))
    agg = flat.group_by("_r", maintain_order=True).agg(pl.col("t").alias("target_ids"))
    out = r.select("_r").join(agg, on="_r", how="left", maintain_order="left")
    return rows.with_columns(out.get_column("target_ids").cast(pl.List(pl.Int32)))


def _sample_weights(rows: pl.DataFrame, mode: str) -> pl.Expr:
    if mode == "inverse_subject_samples":
        return (1.0 / pl.len().over("subject_id")).cast(pl.Float32)
    return pl.lit(1.0, dtype=pl.Float32)


def _empty_counts() -> dict[str, Any]:
    return {"cohort": 0, "excluded": {}, "censored": 0, "samples": 0, "positives": 0, "subjects": 0, "class_counts": None,
            "at_risk": None}


def _add_counts(acc: dict[str, Any], labeled: pl.DataFrame, kept: pl.DataFrame, info: TaskInfo) -> None:
    acc["cohort"] += labeled.height
    for status, n in labeled.group_by("status").len().iter_rows():
        if status == "censored":
            acc["censored"] += n
        elif status.startswith("excluded:"):
            why = status.split(":", 1)[1]
            acc["excluded"][why] = acc["excluded"].get(why, 0) + n
    acc["samples"] += kept.height
    acc["subjects"] += kept.get_column("subject_id").n_unique() if kept.height else 0
    if info.type == "binary":
        acc["positives"] += int(kept.get_column("label").sum() or 0)
    elif info.type == "multiclass":
        k = len(info.classes or [])
        cc = acc["class_counts"] or [0] * k
        for idx, n in kept.group_by("label").len().iter_rows():
            if idx is not None and 0 <= int(idx) < k:
                cc[int(idx)] += n
        acc["class_counts"] = cc
    elif info.type == "multilabel":
        k = len(info.classes or [])
        cc = acc["class_counts"] or [0] * k
        ar = acc["at_risk"] or [0] * k
        if kept.height:
            lab = [sum(col) for col in zip(*kept.get_column("labels").to_list())]
            msk = [sum(col) for col in zip(*kept.get_column("label_mask").to_list())]
            cc = [a + int(b or 0) for a, b in zip(cc, lab)]
            ar = [a + int(b or 0) for a, b in zip(ar, msk)]
            acc["positives"] += int(kept.filter(pl.col("labels").list.sum() > 0).height)
        acc["class_counts"], acc["at_risk"] = cc, ar


def _finish_counts(acc: dict[str, Any], info: TaskInfo) -> dict[str, Any]:
    out = dict(acc)
    n = acc["samples"]
    if info.type == "binary":
        out["prevalence"] = acc["positives"] / n if n else None
    elif info.type == "multiclass" and acc["class_counts"]:
        out["class_prevalence"] = [c / n if n else None for c in acc["class_counts"]]
    elif info.type == "multilabel" and acc["class_counts"]:
        out["class_prevalence"] = [c / r if r else None for c, r in zip(acc["class_counts"], acc["at_risk"])]
        out["prevalence"] = acc["positives"] / n if n else None
    if info.type not in ("multiclass", "multilabel"):
        out.pop("class_counts", None)
        out.pop("at_risk", None)
    if info.type in ("forecast", "regression", "multiclass"):
        out.pop("positives", None)  # multiclass: class_counts says it
    return out


def _events_version(events_dir: Path) -> str | None:
    """The event store's own fingerprint (MEDS dataset_version), so a rebuild can tell when its input changed."""
    try:
        return read_dataset_metadata(events_dir).get("dataset_version")
    except KitError:
        return None


def _tokenizer_config(config: DatasetConfig, vertical: Any):
    """The build's tokenizer config, dropping the codes the vertical declares as targets (`target_code_prefixes`,
    e.g. finance `LABEL/`) whatever the user's drop list says: a target must never be an input."""
    targets = [p for p in getattr(vertical, "target_code_prefixes", ()) if p not in config.tokenizer.drop_code_prefixes]
    if not targets:
        return config.tokenizer
    return config.tokenizer.model_copy(update={"drop_code_prefixes": [*config.tokenizer.drop_code_prefixes, *targets]})


def is_up_to_date(out_dir: Path | str, events_dir: Path | str, vertical_name: str, config: DatasetConfig) -> bool:
    """True when `out_dir` holds a dataset built from this event store version with this config and these task specs."""
    try:
        m = read_manifest(out_dir)
    except KitError:
        return False
    vertical = registry.vertical(vertical_name)
    specs = vertical.load_tasks(config.tasks, config.task_files)
    spec_hash = _sha([s.model_dump(mode="json") if hasattr(s, "model_dump") else s for s in specs])
    return (
        m.get("vertical") == vertical_name
        and m.get("events_version") == _events_version(Path(events_dir))
        and m.get("events_dir") == str(Path(events_dir).resolve())
        and m.get("config_hash") == _sha({"config": config.model_dump(mode="json"), "tasks": spec_hash})
    )


def build_dataset(
    vertical_name: str,
    events_dir: Path | str,
    out_dir: Path | str,
    config: DatasetConfig,
    *,
    on_chunk: Callable[[int, int], None] | None = None,
    on_stage: Callable[[str], None] | None = None,
    tokenizer_file: Path | str | None = None,
    task_classes: dict[str, list[str]] | None = None,
) -> dict[str, Any]:
    """Build the dataset and return its manifest. `on_stage(text)` and `on_chunk(done, total)` report progress.

    `tokenizer_file` and `task_classes` reuse a bundle's tokenizer and task classes instead of fitting them on this
    population's train split (`kit evaluate` on another population: token ids and heads must mean the same).
    """
    stage = on_stage or (lambda _text: None)
    events_dir, out_dir = Path(events_dir), Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / MANIFEST).exists())):
        raise KitError(
            f"{out_dir}: exists and is not a dataset written by `kit dataset build`; refusing to replace it",
            hint="choose a new --out directory (an existing dataset there is replaced atomically)",
        )
    vertical = registry.vertical(vertical_name)
    specs = vertical.load_tasks(config.tasks, config.task_files)
    subjects = read_subjects(events_dir)
    if subjects.height == 0:
        raise KitError(f"{events_dir}: the event store has no subjects")
    events = scan_events(events_dir)
    ids = sorted(subjects.get_column("subject_id").to_list())
    # Subjects with events but no subject row have no birth, sex or death: their labels would be wrong, so they are
    # left out, and counted in the manifest.
    without_row = (
        events.select(pl.col("subject_id").unique())
        .join(subjects.lazy().select("subject_id"), on="subject_id", how="anti")
        .select(pl.len())
        .collect()
        .item()
    )
    split_table = assign_splits(ids, config.splits)
    train_ids = split_table.filter(pl.col("split") == "train").get_column("subject_id")
    if train_ids.len() == 0:
        raise KitError(f"{events_dir}: no subject falls in the train split ({subjects.height} subjects); add subjects or raise splits.train")
    train_events = events.filter(pl.col("subject_id").is_in(train_ids.implode()))
    dataset_end = events.select(pl.col("time").max()).collect().item()
    try:
        codes = read_codes(events_dir)
    except KitError:
        codes = pl.DataFrame(schema={"code": pl.String, "description": pl.String})
    context = {"follow_up": config.follow_up.model_dump(), "dataset_end": dataset_end, "codes": codes,
               "task_classes": task_classes or {}}
    stage(f"fitting tasks and tokenizer on the train split ({train_ids.len():,} subjects)")
    tasks: list[PreparedTask] = vertical.prepare(specs, train_events, context)
    infos = [t.info for t in tasks]
    if tokenizer_file is not None:
        tokenizer = Tokenizer.load(tokenizer_file)
    else:
        tokenizer = Tokenizer.fit(train_events, _tokenizer_config(config, vertical), extra_tokens=[i.task_token for i in infos])
    max_len = config.tokenizer.max_len

    counts = {i.name: {s: _empty_counts() for s in SPLITS} for i in infos}
    files: dict[str, dict[str, list[str]]] = {i.name: {s: [] for s in SPLITS} for i in infos}
    stage("labeling and tokenizing subject chunks")
    chunks = _plan_chunks(events_dir, ids, config.subjects_per_chunk)
    with atomic_dir(out_dir) as tmp:
        tokenizer.save(tmp / TOKENIZER)
        (tmp / "config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=True))
        for ci, (shard_files, chunk) in enumerate(chunks):
            chunk_series = pl.Series(chunk, dtype=pl.Int64)
            ev = pl.scan_parquet(shard_files).filter(pl.col("subject_id").is_in(chunk_series.implode())).collect()
            subj = subjects.filter(pl.col("subject_id").is_in(chunk_series.implode()))
            split_of = split_table.filter(pl.col("subject_id").is_in(chunk_series.implode()))
            tokens = tokenizer.encode(ev, subj)
            shared: dict = {}
            for task, info in zip(tasks, infos):
                labeled = task.label(ev, subj, shared).join(split_of, on="subject_id", how="left", maintain_order="left")
                labeled = labeled.with_row_index("_lr")
                rows = windows(tokens, labeled.filter(pl.col("status") == "ok"), max_len)
                no_hist = rows.filter(pl.col("n_tokens") == 0).get_column("_lr")
                if no_hist.len():
                    labeled = labeled.with_columns(
                        pl.when(pl.col("_lr").is_in(no_hist.implode()))
                        .then(pl.lit("excluded:no_history"))
                        .otherwise(pl.col("status"))
                        .alias("status")
                    )
                rows = rows.filter(pl.col("n_tokens") > 0)
                if info.type == "forecast" and rows.height:
                    rows = _forecast_targets(tokens, rows, info.forecast_events or 16)
                rows = rows.with_columns(
                    pl.lit(info.name).alias("task"),
                    pl.lit(tokenizer.id_of(info.task_token), dtype=pl.Int32).alias("task_token_id"),
                    pl.lit(info.prompt).alias("prompt"),
                    _sample_weights(rows, info.sample_weight).alias("sample_weight"),
                )
                for col, dtype in ROW_SCHEMA.items():
                    if col not in rows.columns:
                        rows = rows.with_columns(pl.lit(None, dtype=dtype).alias(col))
                rows = rows.select([pl.col(c).cast(t) for c, t in ROW_SCHEMA.items()]).sort("subject_id", "prediction_time", maintain_order=True)
                for split in SPLITS:
                    part_lab = labeled.filter(pl.col("split") == split)
                    part = rows.filter(pl.col("split") == split)
                    _add_counts(counts[info.name][split], part_lab, part, info)
                    if part.height:
                        rel = f"data/{split}/{info.name}/part-{ci:05d}.parquet"
                        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                        part.write_parquet(tmp / rel, compression="zstd", statistics=True)
                        files[info.name][split].append(rel)
            if on_chunk:
                on_chunk(ci + 1, len(chunks))

        final = {name: {s: _finish_counts(c, next(i for i in infos if i.name == name)) for s, c in per.items()} for name, per in counts.items()}
        train_sizes = {name: final[name]["train"]["samples"] for name in final}
        weights = mixing_weights(train_sizes, config.mixing)
        spec_hash = _sha([i.spec for i in infos])
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "vertical": vertical_name,
            "events_dir": str(events_dir.resolve()),
            "events_version": _events_version(events_dir),
            "config_hash": _sha({"config": config.model_dump(mode="json"), "tasks": spec_hash}),
            "config": config.model_dump(mode="json"),
            "tokenizer": TOKENIZER,
            "vocab_size": tokenizer.vocab_size,
            "max_len": max_len,
            "prompt": {
                "position": "end",
                "about": "the model reads input_ids, then task_token_id, and predicts at the task token",
            },
            "columns": COLUMN_DOCS,
            "subjects": {s: int(split_table.filter(pl.col("split") == s).height) for s in SPLITS},
            "subjects_left_out": {"no_subject_record": int(without_row)},
            "follow_up": config.follow_up.model_dump(mode="json"),
            "dataset_end": dataset_end.isoformat() if dataset_end else None,
            "mixing": {"temperature": config.mixing.temperature, "weights": weights},
            "tasks": {
                i.name: {
                    "type": i.type,
                    "metric": i.metric,
                    "description": i.description,
                    "prompt": i.prompt,
                    "task_token": i.task_token,
                    "task_token_id": tokenizer.id_of(i.task_token),
                    "classes": i.classes,
                    "class_descriptions": i.class_descriptions,
                    "num_outputs": (len(i.classes) if i.classes else (tokenizer.vocab_size if i.type == "forecast" else 1)),
                    "sample_weight": i.sample_weight,
                    "baselines": list(i.baselines),
                    "sampling_weight": weights[i.name],
                    "spec": i.spec,
                    "counts": final[i.name],
                    "files": files[i.name],
                }
                for i in infos
            },
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def read_manifest(path: Path | str) -> dict[str, Any]:
    p = Path(path)
    f = p / MANIFEST if p.is_dir() else p
    if not f.exists():
        raise KitError(f"{p}: no {MANIFEST}; is this a dataset written by `kit dataset build`?")
    try:
        m = json.loads(f.read_text())
    except json.JSONDecodeError as exc:
        raise KitError(f"{f}: not valid JSON ({exc})") from None
    if m.get("format") != FORMAT:
        raise KitError(f"{f}: not a kit dataset manifest (format {m.get('format')!r})")
    return m


def scan_rows(dataset_dir: Path | str, split: str, task: str | None = None) -> pl.LazyFrame:
    """Rows of one split (optionally one task) of a built dataset, lazily."""
    root = Path(dataset_dir)
    m = read_manifest(root)
    names = [task] if task else list(m["tasks"])
    paths = [str(root / f) for t in names for f in m["tasks"][t]["files"][split]]
    if not paths:
        return pl.LazyFrame(schema=ROW_SCHEMA)
    return pl.scan_parquet(paths)

