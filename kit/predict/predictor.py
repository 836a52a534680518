"""`Predictor`: a verified bundle that scores subjects' records, on exactly the path training and evaluation use.

    from kit import Predictor
    p = Predictor.load("clinical.kitbundle")
    for pred in p.predict("patient-bundle.json"):            # a FHIR Bundle: dict, JSON string or path
        print(pred.subject, pred.task, pred.probability, pred.decision)

Records -> events (the vertical's connector, in memory) -> the bundle's tokenizer (`Tokenizer.encode`, `windows`)
-> dataset rows (`kit.train.data.rows_from_frame`) -> the model's task heads (`kit.eval.scoring.row_logits`, under `task_logits`) -> the
bundle's calibration (`kit.eval.calibration.apply_task_calibration`) and threshold. Every step is the function the
dataset build and `kit evaluate` call, so a test-split sample gets the probability `kit evaluate` computed.
"""

from __future__ import annotations

import hashlib
import tempfile
import threading
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from kit import __version__
from kit.bundle import MANIFEST, Bundle, open_bundle
from kit.errors import KitError
from kit.events import BIRTH_CODE, DEATH_CODE, SUBJECT_SCHEMA, is_event_store, read_subjects, scan_events
from kit.predict.formats import BadInput, SubjectData, get_format

SUPERVISED = ("binary", "multiclass", "multilabel", "regression")
# Rows to predict carry no labels (the columns `make_row` reads, null).
_NO_LABELS = (pl.lit(None, dtype=pl.Float32).alias("label"), pl.lit(None, dtype=pl.List(pl.Float32)).alias("labels"),
              pl.lit(None, dtype=pl.List(pl.Float32)).alias("label_mask"), pl.lit(None, dtype=pl.Float32).alias("sample_weight"))
# Token types an explanation names (codes, values, static facts); structure tokens ([VS], intervals) say little alone.
_EXPLAINED_TYPES = (2, 6, 7)


@dataclass(frozen=True)
class Prediction:
    """One subject's prediction for one task at one time."""

    subject: str  # the source's subject key (a FHIR Patient id)
    subject_id: int
    task: str
    type: str  # binary | multiclass | multilabel | regression
    as_of: datetime  # UTC; only events strictly before it are read
    probability: float | None  # binary: calibrated probability of the outcome
    scores: dict[str, float] | None  # multiclass / multilabel: calibrated probability per class
    value: float | None  # regression
    decision: bool | None  # binary: probability >= threshold
    threshold: float | None
    bundle: str
    version: str
    description: str = ""
    top_events: tuple[dict[str, Any], ...] | None = None  # most influential input events, strongest first

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["as_of"] = self.as_of.replace(tzinfo=timezone.utc).isoformat().replace("+00:00", "Z")
        d["top_events"] = list(self.top_events) if self.top_events is not None else None
        return d


def _utc(t: Any, what: str = "as_of") -> datetime:
    if isinstance(t, str):
        try:
            t = datetime.fromisoformat(t.replace("Z", "+00:00"))
        except ValueError:
            raise BadInput(422, f"{what}: {t[:40]!r} is not an ISO 8601 date-time") from None
    if isinstance(t, np.datetime64):
        t = t.astype("datetime64[us]").astype(datetime)
    if not isinstance(t, datetime):
        raise BadInput(422, f"{what}: expected a datetime or an ISO 8601 string, got {type(t).__name__}")
    if t.tzinfo is not None:
        try:
            t = t.astimezone(timezone.utc).replace(tzinfo=None)
        except (OverflowError, ValueError):
            raise BadInput(422, f"{what}: {t.isoformat()} is out of range") from None
    return t


def subjects_from_events(events: pl.DataFrame) -> pl.DataFrame:
    """A subjects table for a bare MEDS event frame: birth and death from MEDS_BIRTH / MEDS_DEATH events."""
    ids = events.select(pl.col("subject_id").unique().sort())
    birth = events.filter(pl.col("code") == BIRTH_CODE).group_by("subject_id").agg(pl.col("time").min().alias("birth_time"))
    death = events.filter(pl.col("code") == DEATH_CODE).group_by("subject_id").agg(pl.col("time").min().alias("death_time"))
    return (ids.join(birth, on="subject_id", how="left").join(death, on="subject_id", how="left")
            .with_columns(pl.col("subject_id").cast(pl.String).alias("source_subject_id"), pl.lit(None, pl.String).alias("sex"))
            .select([pl.col(c).cast(t) for c, t in SUBJECT_SCHEMA.items()]))


class Predictor:
    """A loaded, verified bundle. Thread-safe: the model runs under a lock, everything else is per call."""

    def __init__(self, bundle: Bundle, model, tokenizer, device, *, batch_size: int = 64) -> None:
        self.bundle = bundle
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.batch_size = batch_size
        meta = bundle.tasks
        self.max_len = int(meta.get("max_len") or tokenizer.config.max_len)
        heads = {t.name for t in model.config.tasks}
        self.tasks = {n: t for n, t in meta.get("tasks", {}).items() if n in heads and t.get("type") in SUPERVISED}
        if not self.tasks:
            raise KitError(f"{bundle.source}: the bundle has no supervised task heads to predict with")
        self.calibration = bundle.calibration
        self._lock = threading.Lock()
        digest = hashlib.sha256((bundle.root / MANIFEST).read_bytes()).hexdigest()
        self.info = {
            "name": bundle.manifest.get("name") or f"kit-{bundle.vertical}",
            "version": digest[:12],
            "vertical": bundle.vertical,
            "kit_version": __version__,
            "bundle_kit_version": bundle.kit_version,
            "created": bundle.manifest.get("created"),
        }

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, path: Path | str, *, device: str = "auto", batch_size: int = 64, cache_dir: Path | None = None) -> Predictor:
        """Open and verify a bundle (directory or `.kitbundle`); a changed or foreign bundle is a KitError naming why."""
        from kit.tokenizer import Tokenizer
        from kit.train.finetune import resolve_device

        bundle = open_bundle(path, cache_dir=cache_dir)
        dev = resolve_device(device)
        # Parameters keep requires_grad as loaded: PyTorch's matmul picks its kernel by it (even under no_grad), and
        # evaluation scores a loaded model, so flipping it here would change last digits. Attributions ask autograd
        # for the inputs' gradient only, so no parameter gradient is computed either way.
        model = bundle.load_model().to(dev).eval()
        return cls(bundle, model, Tokenizer.load(bundle.path("tokenizer.json")), dev, batch_size=batch_size)

    def warm_up(self) -> None:
        """Score one synthetic history for every task (and attribute it), so the first real request does not pay for
        loading the compiled kernels and first-call allocations."""
        import kit.eval.calibration  # noqa: F401 - its scipy import (~0.6 s) would otherwise land on the first request
        from kit.eval.scoring import row_logits
        from kit.train.batching import Row

        n = 16
        rows = [Row(np.append(np.full(n, self.tokenizer.vocab_size - 1), int(t["task_token_id"])).astype(np.int64),
                    np.ones(n + 1, np.float32), np.full(n + 1, 50.0, np.float32), np.full(n + 1, 2, np.int64),
                    np.zeros(n + 1, np.int64), name, np.full(1, np.nan, np.float32), None, 1.0)
                for name, t in self.tasks.items()]
        with self._lock:
            row_logits(self.model, rows, self.device, batch_size=self.batch_size, bf16=False)
            self._attributions(rows[:1])

    @property
    def name(self) -> str:
        return self.info["name"]

    @property
    def version(self) -> str:
        return self.info["version"]

    def metadata(self) -> dict[str, Any]:
        """Model card, tasks (type, classes, calibration, threshold), test metrics and versions."""
        card = (self.bundle.root / "model_card.md").read_text() if self.bundle.has("model_card.md") else ""
        metrics = self.bundle.read_json("metrics.json", default={})
        tasks = {}
        for name, t in self.tasks.items():
            cal = (self.calibration.get("tasks") or {}).get(name, {})
            tasks[name] = {
                "type": t["type"], "description": t.get("description"), "prompt": t.get("prompt"),
                "classes": t.get("classes"),
                "calibration": {k: cal.get(k) for k in ("method", "temperature", "threshold", "threshold_rule") if k in cal},
                "test_metrics": {k: v.get("value") for k, v in ((metrics.get("tasks") or {}).get(name, {}).get("model") or {}).items()
                                 if isinstance(v, dict)},
            }
        return {**self.info, "tasks": tasks, "max_len": self.max_len, "model_card": card}

    # ------------------------------------------------------------------ inputs

    def subject_data(self, data: Any, *, subjects: pl.DataFrame | None = None) -> SubjectData:
        """Any accepted input as events + subjects: a SubjectData, a MEDS event frame, a document (dict/list or a JSON
        string) in the vertical's format, a JSON file, an event store, or raw files the vertical ingests."""
        if isinstance(data, SubjectData):
            return data
        if isinstance(data, pl.LazyFrame):
            data = data.collect()
        if isinstance(data, pl.DataFrame):
            from kit.events import conform_events

            events = conform_events(data).sort(["subject_id", "time"], nulls_last=False, maintain_order=True)
            return SubjectData(events=events, subjects=subjects if subjects is not None else subjects_from_events(events))
        if isinstance(data, (dict, list)):
            return get_format(self.bundle.vertical).parse(data)
        if isinstance(data, str) and data.lstrip()[:1] in ("{", "["):
            return get_format(self.bundle.vertical).parse(_loads(data.encode(), "the JSON string"))
        if isinstance(data, (str, Path)):
            return self._path_data(Path(data))
        raise KitError(f"cannot predict from a {type(data).__name__}; pass a FHIR Bundle (dict, JSON string or path), a list "
                       "of resources, a MEDS event frame or an event store")

    def _path_data(self, path: Path) -> SubjectData:
        if not path.exists():
            raise KitError(f"{path}: no such file or directory")
        if is_event_store(path):
            return SubjectData(events=scan_events(path).collect(), subjects=read_subjects(path))
        name = path.name.lower()
        if path.is_file() and name.endswith((".json", ".json.gz")):
            raw = path.read_bytes()
            if name.endswith(".gz"):
                import gzip

                raw = gzip.decompress(raw)
            try:
                return get_format(self.bundle.vertical).parse(_loads(raw, str(path)))
            except BadInput as err:
                raise KitError(f"{path}: {err}") from None
        with tempfile.TemporaryDirectory(prefix="kit-predict-") as tmp:
            store = ingest_to_store(self.bundle.vertical, [path], Path(tmp) / "events")
            return SubjectData(events=scan_events(store).collect(), subjects=read_subjects(store))

    def samples(self, sd: SubjectData, as_of: Any = None) -> pl.DataFrame:
        """(subject_id, prediction_time) rows: per subject at its last event (as_of=None), at one time for all, per
        subject key ({"patient-id": time}), or a frame of subject_id (or subject) and prediction_time (or as_of),
        several rows per subject allowed. Sorted by subject and time, except a frame, whose order is kept."""
        if as_of is None:
            # Each subject's last timed event, in numpy: polars' per-query cost was most of this for one patient.
            nat = np.iinfo(np.int64).min  # a null time (NaT), below every time
            sid = sd.events.get_column("subject_id").to_numpy()
            when = sd.events.get_column("time").to_numpy()
            subject, at = np.unique(sid, return_inverse=True)
            last = np.full(len(subject), nat, dtype=np.int64)
            np.maximum.at(last, at, when.view(np.int64))
            ids = sd.subjects.get_column("subject_id")
            keys = ids.to_numpy()
            pos = np.minimum(np.searchsorted(subject, keys), max(len(subject) - 1, 0))
            found = np.zeros(len(keys), dtype=bool)
            if len(subject):
                found = (subject[pos] == keys) & (last[pos] != nat)
            keys, last = keys[found], last[pos[found]]
            order = np.lexsort((last, keys))  # stable: sorted by subject and time, equal ids in the table's order
            return pl.DataFrame([pl.Series("subject_id", keys[order], dtype=ids.dtype),
                                 pl.Series("prediction_time", last[order].view(when.dtype))])
        keys = sd.subjects.select("subject_id", "source_subject_id")
        if isinstance(as_of, (pl.DataFrame, pl.LazyFrame)):
            f = as_of.lazy().collect()
            when = "prediction_time" if "prediction_time" in f.columns else "as_of"
            if "subject_id" not in f.columns:
                f = f.join(keys.rename({"source_subject_id": "subject"}), on="subject", how="inner")
            out = f.select(pl.col("subject_id").cast(pl.Int64), pl.col(when).cast(pl.Datetime("us")).alias("prediction_time"))
            return out.filter(pl.col("prediction_time").is_not_null())  # the caller's order (a dataset's, say)
        elif isinstance(as_of, dict):
            rows = []
            lookup = dict(zip(keys["source_subject_id"].to_list(), keys["subject_id"].to_list(), strict=True))
            for k, t in as_of.items():
                if str(k) not in lookup:
                    raise BadInput(422, f"as_of names subject {str(k)[:64]!r}, which is not in the input")
                rows.append((lookup[str(k)], _utc(t)))
            out = pl.DataFrame(rows, schema={"subject_id": pl.Int64, "prediction_time": pl.Datetime("us")}, orient="row")
        else:
            t = _utc(as_of)
            out = keys.select("subject_id", pl.lit(t, dtype=pl.Datetime("us")).alias("prediction_time"))
        return out.filter(pl.col("prediction_time").is_not_null()).sort("subject_id", "prediction_time", maintain_order=True)

    # ------------------------------------------------------------------ predicting

    def predict(self, data: Any, *, as_of: Any = None, tasks: list[str] | None = None, explain: bool = True,
                top_k: int = 5, subjects: pl.DataFrame | None = None) -> list[Prediction]:
        """Predictions per subject and task (subjects in subject_id order, then time, then the bundle's task order).

        `data`: a FHIR Bundle (dict, JSON string or path), a list of resources, a MEDS event frame (with `subjects`,
        or birth/death from MEDS_BIRTH/MEDS_DEATH events), an event store, or raw files the vertical ingests.
        `as_of`: the prediction time (default: each subject's last event; events at or after it are not read).
        `explain=False` skips the attribution (gradient x input over the history): a forward and backward pass
        over each task's row, most of a prediction's cost.
        """
        sd = self.subject_data(data, subjects=subjects)
        return self.predict_data(sd, as_of=as_of, tasks=tasks, explain=explain, top_k=top_k)

    def predict_data(self, sd: SubjectData, *, as_of: Any = None, tasks: list[str] | None = None, explain: bool = True,
                     top_k: int = 5) -> list[Prediction]:
        """`predict` on events and subjects already at hand."""
        from kit.eval.calibration import apply_task_calibration
        from kit.eval.scoring import row_logits
        from kit.tokenizer import windows
        from kit.train.data import rows_from_frame

        names = list(self.tasks) if tasks is None else tasks
        unknown = [n for n in names if n not in self.tasks]
        if unknown:
            raise KitError(f"unknown task(s) {unknown}; this bundle predicts: {', '.join(self.tasks)}")
        samples = self.samples(sd, as_of)
        if samples.height == 0 or sd.events.height == 0:
            return []
        tokens = self.tokenizer.encode(sd.events, sd.subjects, engine="in-memory")  # request-sized data
        win = windows(tokens, samples, self.max_len)
        if (win.get_column("n_tokens").to_numpy() == 0).any():  # a query less where every sample has history
            win = win.filter(pl.col("n_tokens") > 0)
        if win.height == 0:
            return []
        # Rows are built once (with the first task's token) and given each task's token: tasks differ only there.
        first = self.tasks[names[0]]
        frame = win.with_columns(pl.lit(int(first["task_token_id"]), dtype=pl.Int32).alias("task_token_id"), *_NO_LABELS)
        base, df = rows_from_frame(frame, names[0], first["type"], int(first["num_outputs"]))
        tokens_of = {n: np.int64(self.tasks[n]["task_token_id"]) for n in names}
        # Sample-major: a subject's tasks are scored together (they share one history pass).
        rows = [r if j == 0 else replace(r, input_ids=np.append(r.input_ids[:-1], tokens_of[name]), task=name)
                for r in base for j, name in enumerate(names)]
        with self._lock:
            logits = row_logits(self.model, rows, self.device, batch_size=self.batch_size, bf16=False)
            attrib = self._attributions(rows) if explain else None
        keys = dict(zip(sd.subjects["subject_id"].to_list(), sd.subjects["source_subject_id"].to_list(), strict=True))
        sources = _source_lookup(sd.events) if explain else {}
        entries = {n: (self.calibration.get("tasks") or {}).get(n) or {"type": self.tasks[n]["type"], "method": "none"}
                   for n in names}
        out: list[Prediction] = []
        for k, (sid, when) in enumerate(win.select("subject_id", "prediction_time").iter_rows()):
            for j, name in enumerate(names):
                r = k * len(names) + j
                p = apply_task_calibration(entries[name], logits[r][None])[0]
                top = _top_events(df, k, attrib[r], self.tokenizer, sources, top_k) if attrib is not None else None
                out.append(self._prediction(keys.get(sid, str(sid)), int(sid), when, name, self.tasks[name], p,
                                            entries[name], top))
        return out

    def _prediction(self, subject, sid, when, name, spec, p, entry, top) -> Prediction:
        kind = spec["type"]
        probability = scores = value = decision = threshold = None
        if kind == "binary":
            probability = float(p)
            if "threshold" in entry:
                threshold = float(entry["threshold"])
                decision = bool(probability >= threshold)
        elif kind in ("multiclass", "multilabel"):
            classes = spec.get("classes") or [str(k) for k in range(len(p))]
            scores = {str(c): float(v) for c, v in zip(classes, np.asarray(p).reshape(-1))}
        else:
            value = float(p)
        return Prediction(subject=subject, subject_id=sid, task=name, type=kind, as_of=when, probability=probability,
                          scores=scores, value=value, decision=decision, threshold=threshold, bundle=self.info["name"],
                          version=self.info["version"], description=spec.get("description") or "", top_events=top)

    def _attributions(self, rows) -> list[np.ndarray]:
        """Gradient x input on the token embeddings, per history token, for each row's predicted outcome's logit."""
        import torch

        from kit.train.batching import collate, model_inputs
        from kit.train.objectives import used_inputs

        emb = self.model.backbone.get_input_embeddings()
        held: dict[str, Any] = {}

        def hook(_module, _inputs, output):
            leaf = output.detach().requires_grad_(True)
            held["e"] = leaf
            return leaf

        handle = emb.register_forward_hook(hook)
        out: list[np.ndarray] = []
        try:
            # A few rows a pass: the backward holds every layer's activations, and 28 rows (4 patients batched by
            # the server) held ~0.5 GB per worker at once, which the allocator then kept.
            step = min(self.batch_size, _EXPLAIN_ROWS)
            for start in range(0, len(rows), step):
                part = rows[start:start + step]
                batch = collate(part)
                with torch.enable_grad():
                    res = self.model(**model_inputs(batch, self.device, used_inputs(self.model)), compute_lm_logits=False)
                    # binary/regression: the logit; multiclass/multilabel: the top class's logit
                    target = torch.stack([res.task_outputs[r.task][j].float().max() for j, r in enumerate(part)])
                    (grad,) = torch.autograd.grad(target.sum(), held["e"])
                score = (grad * held["e"]).sum(-1).detach().float().cpu().numpy()
                for j, r in enumerate(part):
                    out.append(score[j, : len(r.input_ids) - 1])  # the history, without the task token
        finally:
            handle.remove()
        return out


_EXPLAIN_ROWS = 8  # rows per attribution pass (forward and backward over whole rows)


def relax_gc() -> None:
    """For a process that parses many large documents (a server, a batch job): a FHIR Bundle of a megabyte decodes into
    hundreds of thousands of small dicts and lists, and at CPython's default thresholds the cyclic collector ran every
    few hundred of them, about half of the decoding time (bench/serve.py). Decoded JSON holds no reference cycles, so
    refcounting frees it; collections are made rarer, and the objects alive now (the model, modules) are frozen out
    of them. The threshold is above what a /predict/batch call of 10 patients keeps alive at once (~170k containers):
    at 100k, collections walking the live documents were 16% of decoding them (server CPU 40 -> 37.5 ms a patient)."""
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(1_000_000, 50, 100)


def _loads(raw: bytes, what: str) -> Any:
    from kit.predict.formats import decode_json

    return decode_json(raw, what)


def _code_of(token: str) -> str:
    if "#Q" in token:
        return token.rsplit("#Q", 1)[0]
    return token.split("=", 1)[0] if "=" in token else token


def _source_lookup(events: pl.DataFrame) -> dict[tuple, str]:
    """(subject_id, time in us or None, code) -> "Type/id" of the record it came from (first one wins)."""
    none = np.iinfo(np.int64).min  # NaT: a null time
    times = events.get_column("time").to_numpy().astype("datetime64[us]").view(np.int64).tolist()
    columns = (events.get_column(c).to_list() for c in ("subject_id", "code", "source_type", "source_id"))
    out: dict[tuple, str] = {}
    for t, sid, code, stype, srcid in zip(times, *columns):
        if stype and srcid:
            out.setdefault((sid, None if t == none else t, code), f"{stype}/{srcid}")
    return out


def _top_events(df: pl.DataFrame, i: int, score: np.ndarray, tokenizer, sources: dict, k: int) -> tuple[dict[str, Any], ...]:
    ids = df["input_ids"][i].to_list()
    times = df["token_time"][i].to_list()  # epoch microseconds (rows_from_frame)
    types = df["token_type"][i].to_list()
    sid = int(df["subject_id"][i])
    keep = [j for j in range(min(len(ids), len(score))) if types[j] in _EXPLAINED_TYPES]
    keep.sort(key=lambda j: -abs(float(score[j])))
    out = []
    for j in keep[:k]:
        token = tokenizer.vocab[ids[j]] if 0 <= ids[j] < tokenizer.vocab_size else "[UNK]"
        t = times[j]
        code = _code_of(token)
        src = sources.get((sid, t, code)) or (sources.get((sid, None, code)) if types[j] == 2 else None)
        when = datetime.fromtimestamp(t / 1e6, tz=timezone.utc).replace(tzinfo=None).isoformat() if t is not None else None
        out.append({"token": token, "time": when, "weight": round(float(score[j]), 6), "source": src})
    return tuple(out)


def ingest_to_store(vertical_name: str, paths: list[Path], out: Path, *, show_progress: bool = False) -> Path:
    """Raw records to an event store through the vertical's own ingest (the path training data took)."""
    from kit import registry

    vertical = registry.vertical(vertical_name)
    if not hasattr(vertical, "ingest"):
        raise KitError(f"the {vertical_name} vertical cannot read raw records; pass an event store or a MEDS event frame")
    vertical.ingest(paths, out, show_progress=show_progress)
    return out
