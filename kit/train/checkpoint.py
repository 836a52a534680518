"""Checkpoints as safetensors + JSON (never pickle), written atomically and verified by hash on load.

A checkpoint directory holds:
    model.safetensors       trainable state of the model
    optimizer.safetensors   optimizer tensors (AdamW moments, step counts), flattened
    state.json              step, metrics, optimizer param groups, scheduler state, file hashes
    rng.safetensors         torch CPU (and CUDA) RNG state, so dropout continues identically on resume
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kit.errors import KitError
from kit.fsutil import atomic_dir

CKPT_PATTERN = re.compile(r"^step-(\d{8})$")
FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors")


@dataclass
class TrainState:
    step: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    run_dir: Path,
    *,
    model_state: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    state: TrainState,
    keep: int = 2,
) -> Path:
    """Write `run_dir/checkpoints/step-XXXXXXXX` atomically and prune all but the newest `keep`."""
    ckpt_root = Path(run_dir) / "checkpoints"
    target = ckpt_root / f"step-{state.step:08d}"
    opt_tensors, opt_meta = _flatten_optimizer(optimizer)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"cuda{i}"] = s
    with atomic_dir(target) as tmp:
        save_file({k: v.detach().cpu().clone() for k, v in model_state.items()}, str(tmp / "model.safetensors"))
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        save_file(rng, str(tmp / "rng.safetensors"))
        meta = {
            "step": state.step,
            "best_metric": state.best_metric,
            "best_step": state.best_step,
            "bad_evals": state.bad_evals,
            "extra": state.extra,
            "optimizer": opt_meta,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "sha256": {f: _sha256(tmp / f) for f in FILES},
        }
        (tmp / "state.json").write_text(json.dumps(meta, indent=1, default=str))
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and CKPT_PATTERN.match(p.name))


@dataclass
class LoadedCheckpoint:
    path: Path
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict
    scheduler_state: dict | None
    rng: dict[str, torch.Tensor]
    state: TrainState


def load_checkpoint(path: Path) -> LoadedCheckpoint:
    """Load and verify a checkpoint; a missing, truncated or altered file is a KitError naming it."""
    path = Path(path)
    state_file = path / "state.json"
    try:
        meta = json.loads(state_file.read_text())
    except FileNotFoundError:
        raise KitError(f"{state_file}: checkpoint is incomplete (state.json missing)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise KitError(f"{state_file}: checkpoint state is corrupt ({exc})") from None
    for name, digest in meta.get("sha256", {}).items():
        f = path / name
        if not f.exists():
            raise KitError(f"{f}: checkpoint file missing")
        if _sha256(f) != digest:
            raise KitError(f"{f}: checkpoint file is corrupt (SHA-256 does not match state.json)")
    try:
        model_state = load_file(str(path / "model.safetensors"))
        opt_tensors = load_file(str(path / "optimizer.safetensors"))
        rng = load_file(str(path / "rng.safetensors"))
    except (SafetensorError, OSError) as exc:
        raise KitError(f"{path}: cannot read checkpoint ({exc})") from None
    st = TrainState(
        step=meta["step"],
        best_metric=meta.get("best_metric"),
        best_step=meta.get("best_step"),
        bad_evals=meta.get("bad_evals", 0),
        extra=meta.get("extra", {}),
    )
    return LoadedCheckpoint(
        path=path,
        model_state=model_state,
        optimizer_state=_unflatten_optimizer(opt_tensors, meta["optimizer"]),
        scheduler_state=meta.get("scheduler"),
        rng=rng,
        state=st,
    )


def restore_rng(rng: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available():
        states = [rng[k] for k in sorted(rng) if k.startswith("cuda")]
        if states:
            torch.cuda.set_rng_state_all(states)
