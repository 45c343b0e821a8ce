"""Coordinator: global model, round planning, slicing, merging, evaluation, CLI."""
