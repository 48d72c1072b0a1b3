"""Helpers shared across the framework: matplotlib figures (loss curves, pipeline timelines)."""
