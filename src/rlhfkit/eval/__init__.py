"""Evaluation (SPEC 9): win rate with confidence intervals, KL, length bias, RM/judge accuracy."""
