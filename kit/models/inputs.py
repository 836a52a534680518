"""Optional per-token embeddings (time, age, token type, visit) summed into the token embeddings."""

from __future__ import annotations

import math

import torch
from torch import nn

from kit.errors import KitError
from kit.models.config import InputsConfig


class SinusoidalValueEmbedding(nn.Module):
    """A float per token (days, years) -> sin/cos at log-spaced periods (about 1 to 10^4 units) -> linear."""

    def __init__(self, hidden_size: int, num_frequencies: int = 16, max_period: float = 10_000.0) -> None:
        super().__init__()
        exponents = torch.arange(num_frequencies, dtype=torch.float32) / max(num_frequencies - 1, 1)
        self.register_buffer("frequencies", torch.exp(-math.log(max_period) * exponents), persistent=False)
        self.proj = nn.Linear(2 * num_frequencies, hidden_size)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        angles = torch.nan_to_num(values.float())[..., None] * self.frequencies
        features = torch.cat([angles.sin(), angles.cos()], dim=-1)
        return self.proj(features.to(self.proj.weight.dtype))


class InputEmbeddings(nn.Module):
    """Adds the configured optional embeddings; a configured one whose tensor is missing is an error, not a skip,
    so training and serving can never silently see different inputs."""

    def __init__(self, config: InputsConfig, hidden_size: int) -> None:
        super().__init__()
        self.config = config
        self.time = SinusoidalValueEmbedding(hidden_size, config.time_frequencies) if config.time else None
        self.age = SinusoidalValueEmbedding(hidden_size, config.time_frequencies) if config.age else None
        self.token_type = nn.Embedding(config.num_token_types, hidden_size) if config.num_token_types else None
        self.visit = nn.Embedding(config.max_visits, hidden_size) if config.max_visits else None
        for table in (self.token_type, self.visit):
            if table is not None:
                nn.init.normal_(table.weight, std=0.02)

    @property
    def required(self) -> list[str]:
        names = {"time": self.time, "age": self.age, "token_type_ids": self.token_type, "visit_ids": self.visit}
        return [name for name, module in names.items() if module is not None]

    def forward(
        self,
        embeds: torch.Tensor,
        time: torch.Tensor | None = None,
        age: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        visit_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        given = {"time": time, "age": age, "token_type_ids": token_type_ids, "visit_ids": visit_ids}
        missing = [name for name in self.required if given[name] is None]
        if missing:
            raise KitError(f"the model was built with {missing} embeddings but the batch has no such tensors",
                           hint="pass them from the tokenizer's output, or build the model without them")
        if self.time is not None:
            embeds = embeds + self.time(time).to(embeds.dtype)
        if self.age is not None:
            embeds = embeds + self.age(age).to(embeds.dtype)
        if self.token_type is not None:
            embeds = embeds + self.token_type(token_type_ids).to(embeds.dtype)
        if self.visit is not None:
            embeds = embeds + self.visit(visit_ids.clamp(0, self.visit.num_embeddings - 1)).to(embeds.dtype)
        return embeds
