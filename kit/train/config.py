"""Training configuration: pydantic models loaded from YAML, with `--set key.path=value` overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from kit.configfile import load_model_config


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(_Section):
    backbone: Literal["mamba", "transformer"] = "mamba"
    size: Literal["tiny", "small", "base"] = "tiny"
    time_embeddings: bool = Field(True, description="Embed days since the previous token.")
    age_embeddings: bool = Field(True, description="Embed age in years.")
    type_embeddings: bool = Field(True, description="Embed the token type (code, value, visit, task...).")
    visit_embeddings: int = Field(64, ge=0, description="Visit-number embedding table size (0 = off).")


class LoraSection(_Section):
    enabled: bool = False
    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | None = Field(None, description="Default: the backbone's projections.")


class OptimSection(_Section):
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(20, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    grad_clip: float = Field(1.0, gt=0)
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    batch_size: int = Field(16, ge=1)


class PretrainSection(_Section):
    steps: int = Field(150, ge=0, description="Next-event pretraining steps (0 = skip).")
    optim: OptimSection = Field(default_factory=lambda: OptimSection(lr=2e-3))


class FinetuneSection(_Section):
    steps: int = Field(300, ge=1)
    optim: OptimSection = Field(default_factory=OptimSection)
    eval_every: int = Field(50, ge=1)
    patience: int = Field(4, ge=0, description="Evaluations without improvement before stopping (0 = never stop).")
    min_val_positives: int = Field(
        10, ge=0, description="A task counts toward the validation score (early stopping, best checkpoint) only with at "
        "least this many positive and negative validation rows (classification): an AUROC over a few positives is noise.")
    checkpoint_every: int = Field(50, ge=1)
    keep_forecasting: float = Field(0.0, ge=0, description="Weight of the next-event loss mixed in against forgetting.")
    task_weights: dict[str, float] = Field(default_factory=dict, description="Per-task loss weights (default 1).")
    focal_gamma: float = Field(0.0, ge=0, description="Focal-loss exponent for classification tasks (0 = off).")
    tasks: list[str] | None = Field(None, description="Tasks to finetune on (default: every supervised task).")
    hold_out_tasks: list[str] = Field(
        default_factory=list,
        description="Tasks left out of finetuning; a frozen-feature probe measures them before and after (forgetting).")


class CalibrationSection(_Section):
    method: Literal["temperature", "isotonic", "none"] = Field(
        "temperature", description="Per-task calibration fit on the validation split (isotonic: binary tasks only).")
    threshold: Literal["max_f1", "sensitivity"] = Field("max_f1", description="How each binary task's decision threshold is chosen on validation.")
    target_sensitivity: float = Field(0.8, gt=0, le=1, description="With threshold=sensitivity: the sensitivity to reach.")


class LinesSection(_Section):
    enabled: bool = Field(False, description="Search LiNeS scaling of the finetuning update after finetuning (--lines).")
    alphas: list[float] = Field([0.0, 0.25, 0.5, 0.75, 1.0], description="Grid of alpha (the shallowest layer's scale).")
    betas: list[float] = Field([0.0, 0.25, 0.5, 0.75, 1.0], description="Grid of beta (added with depth).")
    max_scale: float = Field(1.0, gt=0, description="Keep grid points with alpha + beta <= this (1: never extrapolate).")
    max_score_drop: float = Field(
        0.01, ge=0, description="Choose the least forgetting among points within this of the best validation score.")
    store_base: bool = Field(
        True, description="Keep the weights finetuning started from in the bundle (lines/), so `kit lines` can rescale.")


class TrainConfig(_Section):
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    bf16: bool = Field(True, description="bf16 autocast on GPU (ignored on CPU).")
    model: ModelSection = Field(default_factory=ModelSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    pretrain: PretrainSection = Field(default_factory=PretrainSection)
    finetune: FinetuneSection = Field(default_factory=FinetuneSection)
    eval_batch_size: int = Field(64, ge=1)
    max_eval_rows: int = Field(1000, ge=1, description="Validation rows per task scored at each evaluation (fixed subsample).")
    n_bootstrap: int = Field(500, ge=0, description="Bootstrap resamples for the 95% intervals.")
    calibration: CalibrationSection = Field(default_factory=CalibrationSection)
    lines: LinesSection = Field(default_factory=LinesSection)


def load_train_config(path: Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    """Config from an optional YAML file, then `key.path=value` overrides (values parsed as YAML)."""
    return load_model_config(TrainConfig, path, overrides, example="finetune.steps=500")
