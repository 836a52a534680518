"""Task mixing weights with a temperature, as in multitask instruction tuning.

p_t is proportional to (w_t * n_t) ** (1 / T): T = 1 samples tasks in proportion to their (weighted) size,
larger T flattens toward uniform so small tasks are seen more often, T -> infinity is uniform.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field


class MixingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(2.0, ge=1.0, description="1 = proportional to size; larger = flatter.")
    weights: dict[str, float] = Field(default_factory=dict, description="Per-task multipliers (default 1).")
    max_samples: int | None = Field(None, ge=1, description="Cap a task's size before mixing (T5-style).")


def mixing_weights(sizes: dict[str, int], config: MixingConfig) -> dict[str, float]:
    """Sampling probability per task from its train-split size; tasks with no samples get 0."""
    raw = {}
    for task, n in sizes.items():
        n_eff = min(n, config.max_samples) if config.max_samples else n
        w = config.weights.get(task, 1.0) * n_eff
        raw[task] = math.pow(w, 1.0 / config.temperature) if w > 0 else 0.0
    total = sum(raw.values())
    return {t: (v / total if total > 0 else 0.0) for t, v in raw.items()}
