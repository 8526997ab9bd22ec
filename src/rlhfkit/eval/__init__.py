"""Evaluation (docs/concepts.md: Evaluation): win rate with confidence intervals, KL, length bias, RM/judge accuracy."""
