"""Find verticals and connectors by entry point, so kit's core never imports one by name.

A third-party package adds a vertical by declaring, in its pyproject:
    [project.entry-points."kit.verticals"]
    mine = "my_package.vertical:vertical"
"""

from __future__ import annotations

from functools import cache
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from kit.errors import KitError

VERTICALS_GROUP = "kit.verticals"
CONNECTORS_GROUP = "kit.connectors"


@cache
def _entry_points(group: str) -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=group)}


def available(group: str) -> list[str]:
    return sorted(_entry_points(group))


def load(group: str, name: str) -> Any:
    eps = _entry_points(group)
    if name not in eps:
        kind = "vertical" if group == VERTICALS_GROUP else "connector"
        known = ", ".join(sorted(eps)) or "none installed"
        raise KitError(f"unknown {kind} '{name}'; available: {known}")
    return eps[name].load()


def vertical(name: str) -> Any:
    return load(VERTICALS_GROUP, name)


def connector(name: str) -> Any:
    return load(CONNECTORS_GROUP, name)
