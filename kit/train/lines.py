"""LiNeS post-training scaling: shrink the finetuning update of shallow layers more than deep ones.

    theta = theta_base + lambda(name) * (theta_finetuned - theta_base)
    lambda = alpha + beta * depth / (layers - 1)   for parameters of backbone layer `depth`
    lambda = alpha                                for embeddings, final norms and the LM head

Parameters the base model does not have (the task heads created at finetuning) keep their finetuned values: there is
no base to scale them toward. The interpolation is torch.lerp, which is exact at lambda 0 and 1.
"""

from __future__ import annotations

import re

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


__all__ = ["layer_index", "lines_lambda", "lines_scale", "num_layers"]
