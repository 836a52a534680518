"""One model interface over both backbones: inputs -> backbone -> LM head and task heads."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from kit.models.config import BackboneConfig, InputsConfig, ModelConfig, TaskSpec
from kit.models.heads import TaskHeads, gather_positions, last_token_positions
from kit.models.inputs import InputEmbeddings
from kit.models.mamba import MambaBackbone, MambaSpec, MambaState
from kit.models.transformer import build_llama


@dataclass
class ModelOutput:
    hidden_states: torch.Tensor  # (B, L, H), after the final norm
    lm_logits: torch.Tensor | None = None  # (B, L, V) next-event logits
    task_outputs: dict[str, torch.Tensor] = field(default_factory=dict)  # task -> (B, num_outputs)
    task_hidden: torch.Tensor | None = None  # (B, H) hidden state at each row's task token


def build_backbone(config: BackboneConfig) -> nn.Module:
    """A fresh backbone: our MambaBackbone, or transformers' LlamaModel with SDPA."""
    if config.kind == "mamba":
        return MambaBackbone(MambaSpec.from_hf(config.hf_fields()))
    return build_llama(config.hf_fields())


class KitModel(nn.Module):
    def __init__(self, config: ModelConfig, backbone: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config
        hidden = config.backbone.hidden_size
        self.backbone = backbone if backbone is not None else build_backbone(config.backbone)
        self.inputs = InputEmbeddings(config.inputs, hidden)
        self.lm_head = nn.Linear(hidden, config.backbone.vocab_size, bias=False) if config.lm_head else None
        if self.lm_head is not None and config.tie_lm_head:
            self.lm_head.weight = self.backbone.get_input_embeddings().weight
        self.task_heads = TaskHeads(config.tasks, hidden)

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each backbone layer in backward instead of storing its activations (long sequences)."""
        if isinstance(self.backbone, MambaBackbone):
            self.backbone.gradient_checkpointing = enabled
        elif hasattr(self.backbone, "activation_checkpointing_enable"):  # transformers >= 5
            if enabled:
                self.backbone.activation_checkpointing_enable({"use_reentrant": False})
            else:
                self.backbone.activation_checkpointing_disable()
        elif enabled:
            self.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.backbone.gradient_checkpointing_disable()

    @property
    def tasks(self) -> list[TaskSpec]:
        return list(self.config.tasks)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        time: torch.Tensor | None = None,
        age: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        visit_ids: torch.Tensor | None = None,
        task_positions: torch.Tensor | None = None,
        compute_lm_logits: bool = True,
        **_unused: torch.Tensor,
    ) -> ModelOutput:
        """Extra batch keys (labels, ids) are accepted and ignored so a collated batch can be passed as **batch.

        Task heads read `task_positions` (B,), defaulting to each row's last real token.
        """
        embeds = self._embed(input_ids, time, age, token_type_ids, visit_ids)
        hidden = self.backbone(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
        out = ModelOutput(hidden_states=hidden)
        if compute_lm_logits and self.lm_head is not None:
            out.lm_logits = self.lm_head(hidden.to(self.lm_head.weight.dtype))
        if self.config.tasks:
            if task_positions is None:
                task_positions = last_token_positions(input_ids, attention_mask)
            out.task_hidden = gather_positions(hidden, task_positions)
            out.task_outputs = self.task_heads(out.task_hidden)
        return out

    def _embed(self, input_ids, time, age, token_type_ids, visit_ids) -> torch.Tensor:
        embeds = self.backbone.get_input_embeddings()(input_ids)
        return self.inputs(embeds, time=time, age=age, token_type_ids=token_type_ids, visit_ids=visit_ids)

    @property
    def streams_state(self) -> bool:
        """Whether the backbone carries a recurrent state, so a history can be read once and each task token stepped
        from it (`history_state`, `task_step`) instead of re-reading the history per task."""
        return isinstance(self.backbone, MambaBackbone)

    def history_state(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, time=None, age=None,
                      token_type_ids=None, visit_ids=None) -> MambaState:
        """The backbone's state after each row's last token, for LEFT-padded histories (B, L). Padded positions feed
        zeros, which leave a zero state zero: each row's state is the one its unpadded history gives (with an in_proj
        bias, the bias of padded positions reaches the first real tokens' conv, as in transformers' Mamba)."""
        if not self.streams_state:
            raise TypeError("history_state needs a recurrent (Mamba) backbone")
        embeds = self._embed(input_ids, time, age, token_type_ids, visit_ids)
        return self.backbone.final_state(embeds, attention_mask)

    def task_step(self, state: MambaState, input_ids: torch.Tensor, *, time=None, age=None, token_type_ids=None,
                  visit_ids=None) -> dict[str, torch.Tensor]:
        """Task heads' outputs for one token per row (B, 1), read after `state` (from `history_state`)."""
        embeds = self._embed(input_ids, time, age, token_type_ids, visit_ids)
        return self.task_heads(self.backbone.step(embeds[:, -1], state))

    def save_pretrained(self, directory: str | Path) -> Path:
        from kit.models.checkpoint import save_pretrained

        return save_pretrained(self, directory)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        *,
        tasks: list[TaskSpec] | None = None,
        inputs: InputsConfig | None = None,
    ) -> KitModel:
        from kit.models.checkpoint import from_pretrained

        return from_pretrained(directory, tasks=tasks, inputs=inputs)


def build_model(config: ModelConfig) -> KitModel:
    return KitModel(config)
