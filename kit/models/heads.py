"""Task heads: one linear layer per task, reading the hidden state at that row's task token."""

from __future__ import annotations

import torch
from torch import nn

from kit.models.config import TaskSpec


class TaskHeads(nn.Module):
    def __init__(self, tasks: list[TaskSpec], hidden_size: int) -> None:
        super().__init__()
        self.tasks = {t.name: t for t in tasks}
        self.heads = nn.ModuleDict({t.name: nn.Linear(hidden_size, t.num_outputs) for t in tasks})

    def forward(self, task_hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        """task_hidden (B, H) -> {task: (B, num_outputs)} raw outputs (logits, or the value for regression)."""
        return {name: head(task_hidden.to(head.weight.dtype)) for name, head in self.heads.items()}


def gather_positions(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """hidden (B, L, H), positions (B,) -> (B, H)."""
    index = positions.long().view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])
    return hidden.gather(1, index).squeeze(1)


def last_token_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Index of each row's last real token (left or right padding), or the last position without a mask."""
    if attention_mask is None:
        return torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, dtype=torch.long, device=input_ids.device)
    steps = torch.arange(1, input_ids.shape[1] + 1, device=input_ids.device)
    return ((attention_mask != 0).long() * steps).argmax(dim=1)
