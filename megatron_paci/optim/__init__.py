"""Optimizer, LR schedule, gradient clipping."""
