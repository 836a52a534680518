"""Clinical vertical: tasks, tokenizer and prompts over FHIR-derived events."""

vertical = None  # filled in by the clinical vertical issue
