"""Local HF-style directories: config.json + model.safetensors. Never pickle, never the hub."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from kit.errors import KitError
from kit.fsutil import atomic_dir
from kit.models.config import BackboneConfig, InputsConfig, ModelConfig, TaskSpec
from kit.models.mamba import MambaBackbone, MambaSpec
from kit.models.model import KitModel
from kit.models.transformer import build_llama, llama_architecture

log = logging.getLogger(__name__)

KIT_MODEL_TYPE = "kit"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
# Prefixes of the transformers *ForCausalLM wrappers around the backbone.
_HF_BACKBONE_PREFIXES = ("backbone.", "model.")


def read_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.is_file():
        raise KitError(f"{directory}: no config.json; expected a kit model or a transformers model directory")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise KitError(f"{path}: not valid JSON ({err})") from err


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of model.safetensors, or of the shards its index lists. Pickled weights are refused."""
    single, index = directory / WEIGHTS, directory / WEIGHTS_INDEX
    if single.is_file():
        files = [single]
    elif index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [directory / name for name in shards]
    else:
        pickled = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt")]
        hint = f"found {pickled}: pickled weights are never loaded; re-save with safetensors" if pickled else None
        raise KitError(f"{directory}: no {WEIGHTS} (or {WEIGHTS_INDEX})", hint=hint)
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                for key in handle.keys():
                    tensors[key] = handle.get_tensor(key)
        except Exception as err:  # a truncated or foreign file: name it
            raise KitError(f"{file}: cannot read safetensors ({err})") from err
    return tensors


def backbone_config_from_hf(config: dict[str, Any]) -> BackboneConfig:
    """Our BackboneConfig for a transformers MambaConfig / LlamaConfig dict."""
    model_type = config.get("model_type")
    if model_type == "mamba":
        fields = MambaSpec.from_hf(config).to_hf()
        fields.pop("model_type")
        fields.pop("intermediate_size")
        kind = "mamba"
    elif model_type == "llama":
        fields = llama_architecture(config)
        kind = "transformer"
    else:
        raise KitError(f"unsupported model_type {model_type!r}: expected 'kit', 'mamba' or 'llama'")
    return BackboneConfig(
        kind=kind,
        size=None,
        vocab_size=fields.pop("vocab_size"),
        pad_token_id=fields.pop("pad_token_id", 0),
        hidden_size=fields.pop("hidden_size"),
        num_layers=fields.pop("num_hidden_layers"),
        overrides=fields,
    )


def _backbone_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Backbone tensors of a transformers checkpoint, with any *ForCausalLM prefix removed."""
    state = {}
    for key, value in tensors.items():
        if key.startswith("lm_head."):
            continue
        for prefix in _HF_BACKBONE_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        state[key.replace("embedding.weight", "embeddings.weight") if key == "embedding.weight" else key] = value
    return state


def _load_strict(module: nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [f"{k}: {tuple(state[k].shape)} != {tuple(own[k].shape)}" for k in own
             if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise KitError(
            f"{where}: weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"shape mismatch {wrong[:5]}"
        )
    module.load_state_dict(state, strict=True)


def load_backbone(directory: str | Path) -> nn.Module:
    """A transformers MambaModel/MambaForCausalLM directory -> our MambaBackbone; a Llama one -> LlamaModel (SDPA)."""
    directory = Path(directory)
    config = read_config(directory)
    if config.get("model_type") == KIT_MODEL_TYPE:
        return from_pretrained(directory).backbone
    backbone_config = backbone_config_from_hf(config)
    if backbone_config.kind == "mamba":
        backbone: nn.Module = MambaBackbone(MambaSpec.from_hf(backbone_config.hf_fields()))
    else:
        backbone = build_llama(backbone_config.hf_fields())
    _load_strict(backbone, _backbone_state(read_weights(directory)), directory)
    return backbone.eval()


def save_pretrained(model: KitModel, directory: str | Path) -> Path:
    """Write config.json and model.safetensors atomically; a tied LM head is stored once (as the embedding)."""
    if not isinstance(model, KitModel):
        raise KitError(
            f"save_pretrained needs a KitModel, got {type(model).__name__}",
            hint="for a LoRA model call kit.models.merge_lora(model) first",
        )
    directory = Path(directory)
    state = model.state_dict()
    if model.lm_head is not None and model.config.tie_lm_head:
        state.pop("lm_head.weight")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    config = {"model_type": KIT_MODEL_TYPE, "format_version": FORMAT_VERSION, **model.config.to_dict()}
    with atomic_dir(directory) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return directory


def from_pretrained(
    directory: str | Path,
    *,
    tasks: list[TaskSpec] | None = None,
    inputs: InputsConfig | None = None,
) -> KitModel:
    """Load a kit model directory, or start one from a transformers Mamba/Llama directory (fresh heads).

    `tasks` / `inputs` replace the saved ones: heads and input embeddings that still fit are loaded, new ones start
    fresh (they are logged). The backbone and LM head must always load completely.
    """
    directory = Path(directory)
    raw = read_config(directory)
    tensors = read_weights(directory)
    if raw.get("model_type") == KIT_MODEL_TYPE:
        if raw.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
            raise KitError(f"{directory}: format_version {raw['format_version']} is newer than this kit supports")
        config = ModelConfig.from_dict(raw)
    else:
        config = ModelConfig(
            backbone=backbone_config_from_hf(raw),
            tie_lm_head=bool(raw.get("tie_word_embeddings", raw.get("model_type") == "mamba")),
        )
        hf_tensors = tensors
        tensors = {f"backbone.{k}": v for k, v in _backbone_state(hf_tensors).items()}
        if not config.tie_lm_head and "lm_head.weight" in hf_tensors:
            tensors["lm_head.weight"] = hf_tensors["lm_head.weight"]
    if tasks is not None:
        config.tasks = list(tasks)
    if inputs is not None:
        config.inputs = inputs
    config.__post_init__()
    model = KitModel(config)
    _load_into(model, tensors, directory)
    return model.eval()


def _load_into(model: KitModel, tensors: dict[str, torch.Tensor], where: Path) -> None:
    own = model.state_dict()
    if model.lm_head is not None and model.config.tie_lm_head:
        own.pop("lm_head.weight")
    optional = ("task_heads.", "inputs.")
    usable = {k: v for k, v in tensors.items() if k in own and v.shape == own[k].shape}
    required_missing = sorted(k for k in own if k not in usable and not k.startswith(optional))
    if model.lm_head is not None and not model.config.tie_lm_head and "lm_head.weight" in required_missing:
        # A transformers backbone-only directory has no LM head: it starts fresh, like the task heads.
        required_missing.remove("lm_head.weight")
        log.info("%s: no lm_head.weight; the LM head starts fresh", where)
    if required_missing:
        mismatched = [f"{k}: {tuple(tensors[k].shape)} != {tuple(own[k].shape)}" for k in required_missing
                      if k in tensors]
        raise KitError(f"{where}: checkpoint lacks or mis-shapes backbone weights: "
                       f"{mismatched[:5] or required_missing[:5]}")
    fresh = sorted(k for k in own if k not in usable)
    if fresh:
        log.info("%s: fresh (not in the checkpoint): %s", where, ", ".join(fresh))
    model.load_state_dict(usable, strict=False)
