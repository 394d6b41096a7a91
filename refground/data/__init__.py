"""Datasets: the unified model, its store, validation, the synthetic world and real formats."""
