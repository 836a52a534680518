"""The Transformer backbone: transformers' LlamaModel with PyTorch SDPA attention."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import LlamaConfig, LlamaModel

# Fields of a LlamaConfig dict that describe the run, not the architecture; dropped when we keep one.
_RUNTIME_FIELDS = {"architectures", "transformers_version", "torch_dtype", "dtype", "_name_or_path", "model_type",
                   "attn_implementation", "_attn_implementation", "use_cache", "output_hidden_states",
                   "output_attentions", "return_dict"}


def llama_config(fields: dict[str, Any]) -> LlamaConfig:
    """A LlamaConfig that uses SDPA attention and no KV cache by default (training)."""
    from transformers import LlamaConfig

    clean = {k: v for k, v in fields.items() if k not in _RUNTIME_FIELDS}
    return LlamaConfig(**clean, attn_implementation="sdpa", use_cache=False)


def build_llama(fields: dict[str, Any]) -> LlamaModel:
    # Imported on use: transformers' modeling code imports triton, which must not happen before a test or a user
    # has chosen TRITON_INTERPRET, and it keeps `import kit.models` light.
    from transformers import LlamaModel

    return LlamaModel(llama_config(fields))


def llama_architecture(config: dict[str, Any]) -> dict[str, Any]:
    """The architectural fields of a Llama config.json (what `build_llama` needs to rebuild it)."""
    return {k: v for k, v in config.items() if k not in _RUNTIME_FIELDS and not k.startswith("_")}
