"""`kit finetune` end to end: raw records or an event store or a dataset in, a trained and evaluated bundle out.

Every stage writes into the workdir and records a stamp of what it was built from, so a second run with the same
inputs reuses it, and a changed input or config rebuilds that stage and the ones after it:

    <workdir>/events/      event store (when --data is raw records)
    <workdir>/dataset/     prompted multitask dataset
    <workdir>/pretrain/    next-event pretraining run (checkpoints, metrics.jsonl, model/)
    <workdir>/finetune/    multitask finetuning run (checkpoints, metrics.jsonl, model/, initial.safetensors)
    <workdir>/bundle/      the bundle; packed as <workdir>/<vertical>.kitbundle
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from kit import registry
from kit.errors import KitError
from kit.events import is_event_store
from kit.train import distributed
from kit.train.checkpoint import list_checkpoints
from kit.train.config import TrainConfig

STAMP = ".kit-stage.json"
Say = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fingerprint_paths(paths: list[Path]) -> str:
    """Identity of input files: relative names, sizes and modification times (not contents: exports are large)."""
    items = []
    for root in paths:
        root = Path(root)
        if not root.exists():
            raise KitError(f"{root}: no such file or directory")
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            st = f.stat()
            items.append((str(f.resolve()), st.st_size, int(st.st_mtime)))
    if not items:
        raise KitError(f"no files found under {', '.join(map(str, paths))}")
    return _sha(items)


def stage_done(directory: Path, key: str) -> bool:
    stamp = Path(directory) / STAMP
    if not stamp.exists():
        return False
    try:
        return json.loads(stamp.read_text()).get("key") == key
    except json.JSONDecodeError:
        return False


def mark_done(directory: Path, key: str, **info: Any) -> None:
    (Path(directory) / STAMP).write_text(json.dumps({"key": key, "finished": datetime.now().isoformat(), **info}))


def _sibling_with(workdir: Path, stage: str, key: str) -> Path | None:
    """An earlier workdir beside this one whose `stage` was built from the same inputs."""
    parent = workdir.parent
    if not parent.is_dir():
        return None
    for other in sorted(parent.iterdir(), reverse=True):
        cand = other / stage
        if other != workdir and cand.is_dir() and not cand.is_symlink() and stage_done(cand, key):
            return cand
    return None


def _reuse_or_build(workdir: Path, stage: str, key: str, build: Callable[[Path], None], say: Say) -> Path:
    target = workdir / stage
    if stage_done(target, key):
        say(f"[dim]{stage}: reusing {target}[/]")
        return target.resolve()
    sibling = _sibling_with(workdir, stage, key)
    if sibling is not None:
        say(f"[dim]{stage}: reusing {sibling} (same inputs)[/]")
        if target.is_symlink() or target.exists():
            target.unlink() if target.is_symlink() else None
        if not target.exists():
            target.symlink_to(os.path.relpath(sibling, workdir))
        return sibling
    if target.is_symlink():
        target.unlink()
    build(target)
    mark_done(target, key)
    return target


@dataclass
class FinetuneRequest:
    vertical: str
    data: list[Path]
    workdir: Path
    config: TrainConfig
    dataset_overrides: list[str] = field(default_factory=list)
    base_model: Path | None = None
    resume: bool = False
    pretrain_only: bool = False


def default_workdir(vertical: str) -> Path:
    return Path("kit-runs") / f"{vertical}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _classify(data: list[Path]) -> str:
    if len(data) == 1 and (Path(data[0]) / "manifest.json").exists():
        return "dataset"
    if len(data) == 1 and is_event_store(data[0]):
        return "events"
    return "raw"


def prepare_dataset(req: FinetuneRequest, say: Say) -> Path:
    """Events and dataset stages; returns the dataset directory."""
    from kit.datasets.build import build_dataset
    from kit.datasets.config import load_config

    vertical = registry.vertical(req.vertical)  # fails early, listing the verticals, for a wrong name
    kind = _classify(req.data)
    if kind == "dataset":
        return Path(req.data[0])
    if kind == "raw":
        if not hasattr(vertical, "ingest"):
            raise KitError(f"vertical '{req.vertical}' cannot read raw records; ingest them first and pass the event store")
        key = _sha({"inputs": fingerprint_paths(req.data)})
        events = _reuse_or_build(req.workdir, "events", key, lambda out: vertical.ingest(req.data, out, show_progress=True), say)
    else:
        events = Path(req.data[0])
        key = _sha({"events": fingerprint_paths([events / "data"])})
    ds_config = load_config(None, req.dataset_overrides)
    ds_key = _sha({"events": key, "config": ds_config.model_dump(mode="json"), "vertical": req.vertical})

    def build(out: Path) -> None:
        say(f"building the {req.vertical} dataset -> {out}")
        build_dataset(req.vertical, events, out, ds_config)

    return _reuse_or_build(req.workdir, "dataset", ds_key, build, say)


def check_resume(run_dir: Path, key: str, resume: bool) -> bool:
    """Whether to continue from the checkpoints in run_dir.

    An interrupted run of the same config continues only with --resume (so nobody resumes by accident); a run made
    with another config, or a finished one, is stale and the stage starts clean.
    """
    ckpts = list_checkpoints(run_dir)
    stamp = run_dir / "run_key.txt"
    same_config = stamp.exists() and stamp.read_text().strip() == key
    if not ckpts or not same_config or stage_done(run_dir, key):
        if resume and ckpts and not same_config:
            raise KitError(f"{run_dir}: --resume with a different config than the interrupted run; use another --workdir")
        return False
    if not resume:
        raise KitError(
            f"{run_dir} holds an unfinished run (last checkpoint {ckpts[-1].name})",
            hint="pass --resume to continue it, or choose another --workdir",
        )
    return True


def train_config_yaml(config: TrainConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def elapsed(t0: float) -> str:
    return f"{time.perf_counter() - t0:.0f}s"


@dataclass
class FinetuneResult:
    workdir: Path
    bundle_dir: Path | None
    bundle_file: Path | None
    metrics: dict[str, Any]


def _train_stage(run_dir: Path, key: str, resume: bool, train: Callable[[], Any], say: Say, label: str):
    """Run (or reuse) a training stage whose final model is saved under run_dir/model."""
    from kit.models import KitModel

    model_dir = run_dir / "model"
    if stage_done(run_dir, key) and model_dir.exists():
        say(f"[dim]{label}: reusing {model_dir}[/]")
        return KitModel.from_pretrained(model_dir)
    continuing = check_resume(run_dir, key, resume)
    if distributed.current().is_main:
        if not continuing and run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)  # a stale or differently configured run: start clean
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "run_key.txt").write_text(key)
    distributed.barrier()
    model = train()
    if distributed.current().is_main:
        model.save_pretrained(model_dir)
        mark_done(run_dir, key)
    distributed.barrier()
    return model


def _keep_tokenizer(model_dir: Path, dataset_dir: Path) -> None:
    """A saved model reads the dataset tokenizer's ids: keep the tokenizer beside it, so `--base-model` can match
    another dataset's vocabulary to it by token (kit/train/base_vocab.py)."""
    import shutil

    target = model_dir / "tokenizer.json"
    if distributed.current().is_main and model_dir.is_dir() and not target.exists():
        shutil.copyfile(dataset_dir / "tokenizer.json", target)


def run_finetune(req: FinetuneRequest, say: Say, progress_factory: Callable[[str, int], Any]) -> FinetuneResult:
    """All stages; `progress_factory(label, total)` returns a callback(step, total, record)."""
    from kit.models import KitModel
    from kit.train.data import load_dataset
    from kit.train.finetune import INITIAL_WEIGHTS, finetune, pretrain, training_tasks
    from kit.train.finish import finish_bundle
    from kit.train.lines import load_state, start_state

    t0 = time.perf_counter()
    dist_info = distributed.init_from_env()
    if not dist_info.is_main:
        say = _quiet  # one rank speaks and writes
        progress_factory = lambda label, total: None  # noqa: E731
    cfg = req.config
    if dist_info.is_main:
        req.workdir.mkdir(parents=True, exist_ok=True)
        (req.workdir / "train_config.yaml").write_text(train_config_yaml(cfg))
        dataset_dir = prepare_dataset(req, say)
    distributed.barrier()
    if not dist_info.is_main:
        dataset_dir = prepare_dataset(req, say)  # built by rank 0: found by its stamp
    say(f"loading dataset {dataset_dir}")
    ds = load_dataset(dataset_dir)
    ds_key = ds.manifest.get("config_hash", "")
    training_tasks(ds, cfg)  # a wrong --hold-out-task / --single-task fails before any training

    base: Any = req.base_model
    if base is None and cfg.pretrain.steps > 0:
        pre_key = _sha({"dataset": ds_key, "seed": cfg.seed, "model": cfg.model.model_dump(), "pretrain": cfg.pretrain.model_dump()})
        base = _train_stage(
            req.workdir / "pretrain", pre_key, req.resume,
            lambda: pretrain(ds, cfg, req.workdir / "pretrain", progress=progress_factory("pretrain", cfg.pretrain.steps)),
            say, "pretrain",
        )
        _keep_tokenizer(req.workdir / "pretrain" / "model", dataset_dir)
    if req.pretrain_only:
        return FinetuneResult(req.workdir, None, None, {})
    # LiNeS settings act after training: changing them reuses the finetuned model.
    ft_key = _sha({"dataset": ds_key, "config": cfg.model_dump(mode="json", exclude={"lines"}), "base": str(req.base_model)})
    model = _train_stage(
        req.workdir / "finetune", ft_key, req.resume,
        lambda: finetune(ds, cfg, req.workdir / "finetune", base=base, progress=progress_factory("finetune", cfg.finetune.steps),
                         say=say),
        say, "finetune",
    )
    _keep_tokenizer(req.workdir / "finetune" / "model", dataset_dir)
    if not dist_info.is_main:
        return FinetuneResult(req.workdir, None, None, {})
    initial = req.workdir / "finetune" / INITIAL_WEIGHTS
    start = load_state(initial) if initial.is_file() else (start_state(base) if isinstance(base, KitModel) else None)
    info = {"vertical": req.vertical, "backbone": cfg.model.backbone, "size": cfg.model.size, "lora": cfg.lora.enabled,
            "dataset": str(dataset_dir)}
    done = finish_bundle(vertical=req.vertical, model=model, ds=ds, dataset_dir=dataset_dir, cfg=cfg, start=start,
                         pretrained=base is not None, target_dir=req.workdir / "bundle",
                         packed=req.workdir / f"{req.vertical}.kitbundle", work=req.workdir, info=info, t0=t0,
                         say=say)
    return FinetuneResult(req.workdir, done.bundle_dir, done.bundle_file, done.metrics)
