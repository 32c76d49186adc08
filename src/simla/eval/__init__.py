"""Evaluation helpers: retrieval metrics and top-k re-ranking over similarity matrices (SPEC §5.1)."""
