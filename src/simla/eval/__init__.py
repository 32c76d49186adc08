"""Evaluation helpers: retrieval metrics and top-k re-ranking over similarity matrices (the reference protocol)."""
