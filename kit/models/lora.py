"""LoRA through peft on either backbone; task heads stay fully trainable."""

from __future__ import annotations

from torch import nn

from kit.errors import KitError
from kit.models.model import KitModel

DEFAULT_TARGETS = {
    "mamba": ["in_proj", "x_proj", "dt_proj", "out_proj"],
    "transformer": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def apply_lora(
    model: KitModel,
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    target_modules: list[str] | None = None,
    trainable_modules: tuple[str, ...] = ("task_heads",),
):
    """Wrap `model` in a peft LoRA model: only adapters and `trainable_modules` (the task heads) train.

    Returns the peft model; its forward takes the same arguments as KitModel.forward.
    """
    from peft import LoraConfig, get_peft_model

    if not isinstance(model, KitModel):
        raise KitError(f"apply_lora needs a KitModel, got {type(model).__name__}")
    targets = list(target_modules or DEFAULT_TARGETS[model.config.backbone.kind])
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as err:  # peft: none of the target modules exist in this backbone
        linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.backbone.named_modules()
                         if isinstance(m, nn.Linear)})
        raise KitError(f"LoRA target modules {targets} do not fit the {model.config.backbone.kind} backbone ({err})",
                       hint=f"its linear layers are named {linear}") from err
    for name, param in model.named_parameters():
        if name.split(".")[0] in trainable_modules:
            param.requires_grad_(True)
    return peft_model


def merge_lora(peft_model) -> KitModel:
    """Fold the adapters into the base weights and return the plain KitModel (ready for save_pretrained)."""
    merged = peft_model.merge_and_unload()
    if not isinstance(merged, KitModel):
        raise KitError(f"merge_lora expected a LoRA-wrapped KitModel, got {type(merged).__name__}")
    return merged


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if "lora_" in name}
