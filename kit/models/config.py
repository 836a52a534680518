"""Model configuration as plain dataclasses (kit.models must import without pydantic on the GPU machine)."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from kit.errors import KitError

BackboneKind = Literal["mamba", "transformer"]
TaskType = Literal["binary", "multiclass", "multilabel", "regression"]

# hidden size, layers, attention heads (transformer only). "tiny" is about 1M parameters with a 4k vocabulary.
SIZE_PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 128, "num_layers": 4, "num_attention_heads": 4},
    "small": {"hidden_size": 384, "num_layers": 6, "num_attention_heads": 6},
    "base": {"hidden_size": 768, "num_layers": 8, "num_attention_heads": 12},
}


@dataclass
class BackboneConfig:
    """Which backbone and how big. `overrides` holds any further transformers MambaConfig / LlamaConfig fields."""

    kind: BackboneKind = "mamba"
    size: str | None = "tiny"  # None: hidden_size and num_layers given explicitly
    vocab_size: int = 4096
    pad_token_id: int = 0
    hidden_size: int | None = None  # None: from the size preset
    num_layers: int | None = None
    overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in ("mamba", "transformer"):
            raise KitError(f"backbone kind must be 'mamba' or 'transformer', got {self.kind!r}")
        if self.size is None:
            if not (self.hidden_size and self.num_layers):
                raise KitError("backbone: give a size preset or both hidden_size and num_layers")
            return
        if self.size not in SIZE_PRESETS:
            raise KitError(f"backbone size must be one of {sorted(SIZE_PRESETS)}, got {self.size!r}")
        preset = SIZE_PRESETS[self.size]
        self.hidden_size = self.hidden_size or preset["hidden_size"]
        self.num_layers = self.num_layers or preset["num_layers"]

    def hf_fields(self) -> dict[str, Any]:
        """The transformers config fields (MambaConfig or LlamaConfig names) that build this backbone."""
        if self.kind == "mamba":
            base = {"num_hidden_layers": self.num_layers}
        else:
            heads = self.overrides.get("num_attention_heads", _attention_heads(self.hidden_size, self.size))
            base = {
                "num_hidden_layers": self.num_layers,
                "num_attention_heads": heads,
                "num_key_value_heads": heads,
                "intermediate_size": matched_llama_intermediate_size(self.hidden_size),
                "max_position_embeddings": 32768,
                "tie_word_embeddings": False,
            }
        return {
            **base,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "pad_token_id": self.pad_token_id,
            **self.overrides,
        }


def _attention_heads(hidden_size: int, size: str | None) -> int:
    preset = SIZE_PRESETS.get(size or "")
    if preset and hidden_size == preset["hidden_size"]:
        return preset["num_attention_heads"]
    return max(1, hidden_size // 64)


def matched_llama_intermediate_size(
    hidden_size: int, state_size: int = 16, expand: int = 2, conv_kernel: int = 4
) -> int:
    """Llama MLP width giving a layer the parameter count of a Mamba layer of the same hidden size ("same size")."""
    inner, rank = expand * hidden_size, -(-hidden_size // 16)
    mamba_layer = (
        hidden_size  # norm
        + hidden_size * 2 * inner  # in_proj
        + inner * (conv_kernel + 1)  # conv1d
        + inner * (rank + 2 * state_size)  # x_proj
        + (rank + 1) * inner  # dt_proj
        + inner * (state_size + 1)  # A_log, D
        + inner * hidden_size  # out_proj
    )
    attention_and_norms = 4 * hidden_size * hidden_size + 2 * hidden_size
    return max(32, round((mamba_layer - attention_and_norms) / (3 * hidden_size) / 32) * 32)


@dataclass
class InputsConfig:
    """Optional per-token embeddings summed into the token embeddings (the tokenizer supplies the tensors)."""

    time: bool = False  # float `time` (days): sinusoidal features -> linear
    age: bool = False  # float `age` (years): sinusoidal features -> linear
    num_token_types: int = 0  # `token_type_ids` embedding table size; 0 = off
    max_visits: int = 0  # `visit_ids` embedding table size (ids clamp to the last row); 0 = off
    time_frequencies: int = 16


@dataclass
class TaskSpec:
    """A task read at its task token: binary -> 1 logit, multiclass -> K, multilabel -> K, regression -> 1."""

    name: str
    type: TaskType
    num_outputs: int = 1

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]*", self.name):
            raise KitError(f"task name {self.name!r} must be letters, digits, '_' or '-' (it names a head)")
        if self.type in ("binary", "regression") and self.num_outputs != 1:
            raise KitError(f"task {self.name!r}: a {self.type} task has 1 output, got num_outputs={self.num_outputs}")
        if self.type == "multiclass" and self.num_outputs < 2:
            raise KitError(f"task {self.name!r}: multiclass needs num_outputs >= 2, got {self.num_outputs}")
        if self.type == "multilabel" and self.num_outputs < 1:
            raise KitError(f"task {self.name!r}: multilabel needs num_outputs >= 1, got {self.num_outputs}")
        if self.type not in ("binary", "multiclass", "multilabel", "regression"):
            raise KitError(f"task {self.name!r}: unknown type {self.type!r}")


@dataclass
class ModelConfig:
    """Everything needed to rebuild a KitModel; saved as config.json next to model.safetensors."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    inputs: InputsConfig = field(default_factory=InputsConfig)
    tasks: list[TaskSpec] = field(default_factory=list)
    lm_head: bool = True
    tie_lm_head: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.backbone, dict):
            self.backbone = BackboneConfig(**self.backbone)
        if isinstance(self.inputs, dict):
            self.inputs = InputsConfig(**self.inputs)
        self.tasks = [TaskSpec(**t) if isinstance(t, dict) else t for t in self.tasks]
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise KitError(f"task names must be unique, got {names}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
