"""LiNeS post-training scaling: shrink the finetuning update of shallow layers more than deep ones.

    theta = theta_base + lambda(name) * (theta_finetuned - theta_base)
    lambda = alpha + beta * depth / (layers - 1)   for parameters of backbone layer `depth`
    lambda = alpha                                for embeddings, final norms and the LM head

Parameters the base model does not have (the task heads created at finetuning) keep their finetuned values: there is
no base to scale them toward. The interpolation is torch.lerp, which is exact at lambda 0 and 1.

`search_lines` scales a finetuned model over an (alpha, beta) grid and scores each point on the validation split:
the task score (mean primary metric) and forgetting (next-event loss increase over the base weights). The chosen
point is the least forgetting among points whose task score is within `lines.max_score_drop` of the best.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_index(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def num_layers(state: dict[str, torch.Tensor]) -> int:
    idx = [i for i in (layer_index(k) for k in state) if i is not None]
    return max(idx) + 1 if idx else 0


def lines_lambda(name: str, n_layers: int, alpha: float, beta: float) -> float:
    depth = layer_index(name)
    if depth is None or n_layers <= 1:
        return alpha
    return alpha + beta * depth / (n_layers - 1)


def lines_scale(base: dict[str, torch.Tensor], finetuned: dict[str, torch.Tensor], alpha: float, beta: float) -> dict[str, torch.Tensor]:
    """The LiNeS-scaled state dict of a finetuned model against its base (both state dicts, same architecture)."""
    n = num_layers(finetuned)
    out = {}
    for name, ft in finetuned.items():
        b = base.get(name)
        if b is None or b.shape != ft.shape or not ft.is_floating_point():
            out[name] = ft.clone()
            continue
        out[name] = torch.lerp(b.to(ft.dtype), ft, lines_lambda(name, n, alpha, beta))
    return out


# ---------------------------------------------------------------- weights finetuning starts from


def tied_aliases(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """alias -> first name, for state-dict entries that are the same tensor (a tied LM head and its embedding)."""
    seen: dict[tuple, str] = {}
    out: dict[str, str] = {}
    for name, t in state.items():
        if t.numel() == 0:
            continue
        key = (t.device.type, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if key in seen:
            out[name] = seen[key]
        else:
            seen[key] = name
    return out


def model_state(model, *, heads: bool = True) -> dict[str, torch.Tensor]:
    """A detached CPU copy of a model's state dict, each tied tensor once; without the task heads if `heads` is False."""
    state = model.state_dict()
    aliases = tied_aliases(state)
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in state.items()
            if k not in aliases and (heads or not k.startswith("task_heads."))}


def start_state(model) -> dict[str, torch.Tensor]:
    """The base of a LiNeS scaling: every weight of the model finetuning starts from, except its new task heads."""
    return model_state(model, heads=False)


def save_state(state: dict[str, torch.Tensor], path: Path) -> Path:
    """A state dict as safetensors, written atomically."""
    from safetensors.torch import save

    from kit.fsutil import atomic_file

    with atomic_file(path, "wb") as fh:
        fh.write(save(state, metadata={"format": "pt"}))
    return Path(path)


def load_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from kit.errors import KitError

    try:
        return load_file(str(path))
    except Exception as err:  # a truncated or foreign file: name it
        raise KitError(f"{path}: cannot read safetensors ({err})") from err


def apply_lines(model, base: dict[str, torch.Tensor], finetuned: dict[str, torch.Tensor], alpha: float, beta: float) -> None:
    """Load the LiNeS-scaled weights into `model` (same architecture as `finetuned`), keeping tied tensors tied."""
    full = model.state_dict()
    aliases = tied_aliases(full)
    scaled = lines_scale(base, {k: v for k, v in finetuned.items() if k not in aliases}, alpha, beta)
    for alias, name in aliases.items():
        scaled[alias] = scaled[name]
    model.load_state_dict(scaled, strict=True)


# ---------------------------------------------------------------- search on validation


def lines_grid(alphas: list[float], betas: list[float], max_scale: float = 1.0) -> list[tuple[float, float]]:
    """Grid points with alpha + beta <= max_scale; the unscaled finetuned model (1, 0) is always one of them."""
    points = {(float(a), float(b)) for a in alphas for b in betas if a + b <= max_scale + 1e-9}
    points.add((1.0, 0.0))
    return sorted(points)


def choose_point(curve: list[dict[str, Any]], max_score_drop: float) -> int:
    """Index of the least-forgetting point among those within `max_score_drop` of the best task score."""
    scored = [i for i, p in enumerate(curve) if not math.isnan(p["task_score"])]
    if not scored:  # no task score on validation: keep the finetuned model
        return next((i for i, p in enumerate(curve) if (p["alpha"], p["beta"]) == (1.0, 0.0)), len(curve) - 1)
    best = max(curve[i]["task_score"] for i in scored)
    ok = [i for i in scored if curve[i]["task_score"] >= best - max_score_drop - 1e-12]

    def key(i: int):
        f = curve[i]["forgetting"]
        return (math.inf if f is None or math.isnan(f) else f, -curve[i]["task_score"], -curve[i]["alpha"] - curve[i]["beta"])

    return min(ok, key=key)


def search_lines(model, base: dict[str, torch.Tensor], finetuned: dict[str, torch.Tensor], ds, tasks, device, config,
                 progress=None) -> dict[str, Any]:
    """Score every grid point on validation, leave `model` at the chosen point, and return the curve and choice."""
    from kit.eval.scoring import next_event_metrics
    from kit.train.finetune import _pick, pretraining_rows, validation_score

    lc = config.lines
    points = lines_grid(lc.alphas, lc.betas, lc.max_scale)
    rows = _pick(pretraining_rows(ds, "val"), config.max_eval_rows, config.seed)

    def loss() -> float:
        return next_event_metrics(model, rows, device, bf16=config.bf16)["loss"] if rows else float("nan")

    apply_lines(model, base, finetuned, 0.0, 0.0)
    base_loss = loss()
    curve = []
    for i, (a, b) in enumerate(points):
        apply_lines(model, base, finetuned, a, b)
        score, per_task = validation_score(model, ds, tasks, device, config)
        after = loss()
        curve.append({"alpha": a, "beta": b, "task_score": score, "per_task": per_task, "next_event_loss": after,
                      "forgetting": after - base_loss})
        if progress is not None:
            progress(i + 1, len(points), {"loss": after, "eval": {"score": score}})
    chosen = choose_point(curve, lc.max_score_drop)
    apply_lines(model, base, finetuned, curve[chosen]["alpha"], curve[chosen]["beta"])
    return {
        "alpha": curve[chosen]["alpha"], "beta": curve[chosen]["beta"], "chosen": chosen, "split": "val",
        "rule": f"least forgetting among points within {lc.max_score_drop:g} of the best validation task score",
        "task_score": "mean primary metric over the finetuned tasks (validation subsample)",
        "forgetting": "next-event loss increase over the base weights on validation sequences",
        "rows": len(rows), "base_next_event_loss": base_loss, "curve": curve,
    }


__all__ = ["apply_lines", "choose_point", "layer_index", "lines_grid", "lines_lambda", "lines_scale", "load_state",
           "model_state", "num_layers", "save_state", "search_lines", "start_state", "tied_aliases"]
