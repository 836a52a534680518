"""Our Mamba (v1) backbone: parameter names and shapes identical to transformers' `MambaModel`.

Every projection is an ordinary `nn.Linear` called as a module, so peft LoRA adapters on in_proj, x_proj, dt_proj
and out_proj train on every path; the scan and the depthwise conv go through `kit.kernels`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from kit import kernels


@dataclass
class MambaSpec:
    """Shape and numerics of a Mamba stack; field names follow transformers' `MambaConfig`."""

    vocab_size: int = 4096
    hidden_size: int = 128
    num_hidden_layers: int = 4
    state_size: int = 16
    expand: int = 2
    conv_kernel: int = 4
    time_step_rank: int | str = "auto"
    use_bias: bool = False
    use_conv_bias: bool = True
    layer_norm_epsilon: float = 1e-5
    residual_in_fp32: bool = True
    pad_token_id: int | None = 0
    hidden_act: str = "silu"
    # Initialisation of a fresh model (ignored when weights are loaded).
    time_step_scale: float = 1.0
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_init_scheme: str = "random"
    time_step_floor: float = 1e-4
    initializer_range: float = 0.02
    rescale_prenorm_residual: bool = True

    def __post_init__(self) -> None:
        if self.time_step_rank == "auto":
            self.time_step_rank = math.ceil(self.hidden_size / 16)
        self.time_step_rank = int(self.time_step_rank)
        if self.hidden_act != "silu":
            raise ValueError(f"only hidden_act='silu' is supported, got {self.hidden_act!r}")

    @property
    def intermediate_size(self) -> int:
        return int(self.expand * self.hidden_size)

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> MambaSpec:
        """Read the fields we use from a transformers `MambaConfig` dict (config.json); others are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        spec = cls(**{k: v for k, v in config.items() if k in names})
        if "intermediate_size" in config and int(config["intermediate_size"]) != spec.intermediate_size:
            raise ValueError(
                f"intermediate_size {config['intermediate_size']} != expand * hidden_size {spec.intermediate_size}"
            )
        return spec

    def to_hf(self) -> dict[str, Any]:
        """A dict that `transformers.MambaConfig(**d)` accepts and that reproduces this stack."""
        return {"model_type": "mamba", **dataclasses.asdict(self), "intermediate_size": self.intermediate_size}


@dataclass
class MambaState:
    """Per-layer streaming state: the last conv_kernel-1 conv inputs (B, D, W-1) and the SSM state (B, D, N)."""

    conv: list[torch.Tensor] = field(default_factory=list)
    ssm: list[torch.Tensor] = field(default_factory=list)


@dataclass
class BackboneOutput:
    last_hidden_state: torch.Tensor
    state: MambaState | None = None


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class MambaMixer(nn.Module):
    """Selective SSM mixer: in_proj -> causal depthwise conv + SiLU -> x_proj -> dt_proj -> scan -> out_proj."""

    def __init__(self, spec: MambaSpec) -> None:
        super().__init__()
        inner, rank, n = spec.intermediate_size, spec.time_step_rank, spec.state_size
        self.spec = spec
        self.scan_impl = "auto"  # kit.kernels dispatch; set by `set_scan_impl`
        self.in_proj = nn.Linear(spec.hidden_size, 2 * inner, bias=spec.use_bias)
        # Kept as nn.Conv1d for the (D, 1, W) weight layout transformers uses; the forward calls kit.kernels.
        self.conv1d = nn.Conv1d(inner, inner, spec.conv_kernel, groups=inner, padding=spec.conv_kernel - 1,
                                bias=spec.use_conv_bias)
        self.x_proj = nn.Linear(inner, rank + 2 * n, bias=False)
        self.dt_proj = nn.Linear(rank, inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(inner, n))
        self.D = nn.Parameter(torch.empty(inner))
        self.out_proj = nn.Linear(inner, spec.hidden_size, bias=spec.use_bias)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """S4D-real A, unit D, and dt_proj so that softplus(bias) is log-uniform in [time_step_min, time_step_max]."""
        spec = self.spec
        inner, n = spec.intermediate_size, spec.state_size
        self.A_log.copy_(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).expand(inner, n))
        self.D.fill_(1.0)
        std = spec.time_step_rank**-0.5 * spec.time_step_scale
        if spec.time_step_init_scheme == "constant":
            self.dt_proj.weight.fill_(std)
        else:
            self.dt_proj.weight.uniform_(-std, std)
        lo, hi = math.log(spec.time_step_min), math.log(spec.time_step_max)
        dt = torch.exp(torch.rand(inner) * (hi - lo) + lo).clamp(min=spec.time_step_floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)

    def forward(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        conv_state: torch.Tensor | None = None,
        ssm_state: torch.Tensor | None = None,
        return_state: bool = False,
        with_output: bool = True,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """(output, conv state, ssm state); `with_output=False` stops after the scan (only the states wanted)."""
        spec = self.spec
        mask = None if attention_mask is None else attention_mask[:, :, None].to(hidden.dtype)
        if mask is not None:
            hidden = hidden * mask  # padded positions feed zeros, as transformers does
        # Split before transposing: the gradient of in_proj's output is then one cat of two time-major (B, L, D)
        # tensors, with no transposing cat and copy in the backward.
        x, z = (t.transpose(1, 2) for t in self.in_proj(hidden).chunk(2, dim=-1))  # (B, D, L) views each
        impl = kernels.resolve_impl(self.scan_impl, hidden.device)
        if impl != "cpu":
            # A compact gate: the scan saves z for backward, and a view would keep all of in_proj's output alive.
            # The fused CPU scan reads z time-major, i.e. straight from this view (a copy would cost the same memory).
            z = z.contiguous()

        conv = kernels.causal_conv1d(x, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu",
                                     initial_state=conv_state, return_final_state=return_state)
        x, new_conv_state = conv if return_state else (conv, None)
        if mask is not None:
            x = x * mask.transpose(1, 2)

        dt, b, c = torch.split(self.x_proj(x.transpose(1, 2)), [spec.time_step_rank, spec.state_size,
                                                                 spec.state_size], dim=-1)
        # dt_proj as a module call (bias included) so a LoRA adapter on it sits on the gradient path.
        delta = self.dt_proj(dt).transpose(1, 2)
        A = -torch.exp(self.A_log.float())
        result = kernels.selective_scan(
            x, delta, A, b.transpose(1, 2), c.transpose(1, 2), D=self.D.float(), z=z,
            delta_softplus=True, initial_state=ssm_state, return_last_state=return_state, impl=impl,
        )
        y, new_ssm_state = result if return_state else (result, None)
        if not with_output:
            return None, new_conv_state, new_ssm_state
        if not torch.is_autocast_enabled(y.device.type):  # under autocast the linear picks its own dtype
            y = y.to(self.out_proj.weight.dtype)
        out = self.out_proj(y.transpose(1, 2))
        return out, new_conv_state, new_ssm_state

    def step(self, hidden: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor) -> torch.Tensor:
        """One token per row (B, H) read after `conv_state` (B, D, W-1) and `ssm_state` (B, D, N): the mixer's output
        (B, H). The recurrence written out in a dozen small ops: for a single position the sequence kernels' launch and
        layout costs were most of the time (a task token stepped from a history's state, `KitModel.task_step`)."""
        spec = self.spec
        if self._fused_step(hidden):
            from kit.kernels.scan_cpu import mixer_step_cpu

            y = mixer_step_cpu(self.in_proj(hidden), conv_state.float(), self.conv1d.weight[:, 0].float(),
                               None if self.conv1d.bias is None else self.conv1d.bias.float(), self.x_proj, self.dt_proj,
                               -torch.exp(self.A_log.float()), self.D.float(), ssm_state.float(), spec.time_step_rank)
            return self.out_proj(y)
        x, z = self.in_proj(hidden).chunk(2, dim=-1)  # (B, D) each
        window = torch.cat([conv_state.to(x.dtype), x[:, :, None]], dim=-1)  # (B, D, W)
        x = (window * self.conv1d.weight[:, 0]).sum(-1)
        if self.conv1d.bias is not None:
            x = x + self.conv1d.bias
        x = F.silu(x)
        dt, b, c = torch.split(self.x_proj(x), [spec.time_step_rank, spec.state_size, spec.state_size], dim=-1)
        delta = F.softplus(self.dt_proj(dt).float())  # (B, D)
        A = -torch.exp(self.A_log.float())
        xf = x.float()
        # y = C.(exp(dA) h0 + dt x B) + D x: the new state itself is not needed, only its read-out.
        decayed = torch.exp(delta[:, :, None] * A) * ssm_state.float()
        y = torch.bmm(decayed, c.float()[:, :, None])[:, :, 0] + (delta * xf) * (b.float() * c.float()).sum(-1, keepdim=True)
        y = (y + self.D.float() * xf) * F.silu(z.float())
        return self.out_proj(y.to(self.out_proj.weight.dtype))


    def _fused_step(self, hidden: torch.Tensor) -> bool:
        """The fused CPU step kernels serve fp32 inference wherever the sequence pass uses the fused CPU scan."""
        if hidden.dtype != torch.float32 or torch.is_grad_enabled() or hidden.device.type != "cpu":
            return False
        if self.in_proj.weight.dtype != torch.float32 or kernels.resolve_impl(self.scan_impl, hidden.device) != "cpu":
            return False
        from kit.kernels.scan_cpu import extension_available

        return extension_available()


class MambaBlock(nn.Module):
    def __init__(self, spec: MambaSpec) -> None:
        super().__init__()
        self.residual_in_fp32 = spec.residual_in_fp32
        self.norm = RMSNorm(spec.hidden_size, eps=spec.layer_norm_epsilon)
        self.mixer = MambaMixer(spec)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None, **state: Any):
        residual = hidden.float() if self.residual_in_fp32 else hidden
        out, conv_state, ssm_state = self.mixer(self.norm(hidden.to(self.norm.weight.dtype)), attention_mask, **state)
        return residual + out, conv_state, ssm_state


class MambaBackbone(nn.Module):
    """Embeddings, a stack of Mamba blocks and a final RMSNorm (state-dict compatible with transformers' MambaModel)."""

    def __init__(self, spec: MambaSpec) -> None:
        super().__init__()
        self.spec = spec
        self.embeddings = nn.Embedding(spec.vocab_size, spec.hidden_size, padding_idx=None)
        self.layers = nn.ModuleList(MambaBlock(spec) for _ in range(spec.num_hidden_layers))
        self.norm_f = RMSNorm(spec.hidden_size, eps=spec.layer_norm_epsilon)
        self.gradient_checkpointing = False
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        nn.init.normal_(self.embeddings.weight, std=self.spec.initializer_range)
        if self.spec.rescale_prenorm_residual:
            # GPT-2 style: keep the residual stream's variance from growing with depth.
            for layer in self.layers:
                layer.mixer.out_proj.weight /= math.sqrt(self.spec.num_hidden_layers)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings

    def set_scan_impl(self, impl: str) -> None:
        """Force a kit.kernels selective-scan implementation ("auto", "reference", "chunked", "triton", ...)."""
        for layer in self.layers:
            layer.mixer.scan_impl = impl

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        state: MambaState | None = None,
        return_state: bool = False,
    ) -> BackboneOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        hidden = self.embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        new_state = MambaState() if return_state else None
        for i, layer in enumerate(self.layers):
            layer_state = {"return_state": return_state}
            if state is not None:
                layer_state.update(conv_state=state.conv[i], ssm_state=state.ssm[i])
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # Keep only each layer's input; recompute the layer in backward (long sequences).
                hidden, conv_state, ssm_state = checkpoint(layer, hidden, attention_mask, use_reentrant=False,
                                                           **layer_state)
            else:
                hidden, conv_state, ssm_state = layer(hidden, attention_mask, **layer_state)
            if new_state is not None:
                new_state.conv.append(conv_state)
                new_state.ssm.append(ssm_state)
        return BackboneOutput(last_hidden_state=self.norm_f(hidden), state=new_state)

    def final_state(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None) -> MambaState:
        """The state `forward(..., return_state=True)` ends in, without what only the output needs: the last layer's
        out_proj and residual and the final norm (a history pass read for its state wasted them)."""
        hidden, state, last = inputs_embeds, MambaState(), len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            if i < last:
                hidden, conv_state, ssm_state = layer(hidden, attention_mask, return_state=True)
            else:
                _, conv_state, ssm_state = layer.mixer(layer.norm(hidden.to(layer.norm.weight.dtype)), attention_mask,
                                                       return_state=True, with_output=False)
            state.conv.append(conv_state)
            state.ssm.append(ssm_state)
        return state

    def step(self, hidden: torch.Tensor, state: MambaState) -> torch.Tensor:
        """The final hidden state (B, H) for one input embedding per row (B, H) read after `state`; the state itself
        is left as it was (a task token is read, never appended)."""
        for i, layer in enumerate(self.layers):
            residual = hidden.float() if layer.residual_in_fp32 else hidden
            out = layer.mixer.step(layer.norm(hidden.to(layer.norm.weight.dtype)), state.conv[i], state.ssm[i])
            hidden = residual + out
        return self.norm_f(hidden)
