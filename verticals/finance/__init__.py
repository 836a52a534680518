"""Finance vertical: tasks, labelers and a text corpus reader over finance events (docs/finance-event-store.md).

Found by kit's core through the `kit.verticals` entry point `finance = "verticals.finance:vertical"`.
"""

from verticals.finance.vertical import FinanceVertical, vertical

__all__ = ["FinanceVertical", "vertical"]
