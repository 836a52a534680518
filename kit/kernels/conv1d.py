"""Causal depthwise conv1d, as the Mamba block uses it before the scan.

PyTorch (F.conv1d) everywhere; on CPU, when the compiled CPU scan is selected (see ``kit.kernels.dispatch``), a
fused time-major C++ version from the same extension (training path: no streaming state).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
):
    """out[b, d, t] = bias[d] + sum_k weight[d, k] * x[b, d, t - (W - 1) + k], optionally SiLU.

    x (batch, dim, length), weight (dim, width). ``initial_state`` (batch, dim, width - 1) holds the inputs
    that came before x (streaming); the final state is the last width - 1 inputs, for the next call.
    """
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    if x.dim() != 3:
        raise ValueError(f"x must be (batch, dim, length), got shape {tuple(x.shape)}")
    batch, dim, _ = x.shape
    if weight.dim() != 2 or weight.shape[0] != dim:
        raise ValueError(f"weight must be (dim={dim}, width), got {tuple(weight.shape)}")
    width = weight.shape[1]
    if initial_state is not None and tuple(initial_state.shape) != (batch, dim, width - 1):
        raise ValueError(f"initial_state must be {(batch, dim, width - 1)}, got {tuple(initial_state.shape)}")
    fused = _fused_cpu(x)
    padded = None
    if initial_state is None and return_final_state and fused and x.shape[-1] >= width - 1:
        # The final state is x's own last inputs: no padded copy of the whole sequence just to slice them.
        from kit.kernels.scan_cpu import causal_conv1d_cpu

        out = causal_conv1d_cpu(x, weight, bias, activation is not None)
        return out, x[..., x.shape[-1] - (width - 1):].contiguous()
    if initial_state is not None or return_final_state or not fused:  # x after what came before: the state, or zeros
        padded = F.pad(x, (width - 1, 0)) if initial_state is None else torch.cat([initial_state.to(x.dtype), x], dim=-1)
    if fused:
        from kit.kernels.scan_cpu import causal_conv1d_cpu

        if initial_state is None:
            out = causal_conv1d_cpu(x, weight, bias, activation is not None)
        else:  # streaming too: oneDNN's depthwise conv took ~0.3 ms a call on a streaming step's few positions
            out = causal_conv1d_cpu(padded, weight, bias, activation is not None)[..., width - 1:]
    else:
        out = F.conv1d(padded, weight.to(x.dtype).unsqueeze(1), None if bias is None else bias.to(x.dtype), groups=dim)
        if activation is not None:
            out = F.silu(out)
    if return_final_state:
        return out, padded[..., padded.shape[-1] - (width - 1):]
    return out


def _fused_cpu(x: torch.Tensor) -> bool:
    """The compiled CPU conv (time-major, SiLU fused) whenever the compiled CPU scan is the selected scan."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return False
    from kit.kernels.dispatch import resolve_impl

    return resolve_impl("auto", x.device) == "cpu"
