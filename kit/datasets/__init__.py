"""Vertical-agnostic dataset machinery: splits, task mixing, and the prompted multitask dataset writer."""
