"""Evaluation: task metrics with bootstrap intervals, and the count-feature baselines."""
