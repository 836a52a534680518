"""Backbones (Mamba, Transformer) behind one interface, with LM and task heads."""

from kit.models.checkpoint import from_pretrained, load_backbone, save_pretrained
from kit.models.config import SIZE_PRESETS, BackboneConfig, InputsConfig, ModelConfig, TaskSpec
from kit.models.lora import DEFAULT_TARGETS, apply_lora, lora_parameters, merge_lora
from kit.models.mamba import MambaBackbone, MambaSpec, MambaState
from kit.models.model import KitModel, ModelOutput, build_backbone, build_model

__all__ = [
    "SIZE_PRESETS",
    "BackboneConfig",
    "DEFAULT_TARGETS",
    "InputsConfig",
    "KitModel",
    "MambaBackbone",
    "MambaSpec",
    "MambaState",
    "ModelConfig",
    "ModelOutput",
    "TaskSpec",
    "apply_lora",
    "build_backbone",
    "build_model",
    "from_pretrained",
    "load_backbone",
    "lora_parameters",
    "merge_lora",
    "save_pretrained",
]
