"""Clinical vertical: tasks, tokenizer and prompts over FHIR-derived events.

Found by kit's core through the `kit.verticals` entry point `clinical = "verticals.clinical:vertical"`.
"""

from verticals.clinical.vertical import ClinicalVertical, vertical

__all__ = ["ClinicalVertical", "vertical"]
