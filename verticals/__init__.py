"""Verticals define prediction tasks, tokenizers and prompts over the event store."""
