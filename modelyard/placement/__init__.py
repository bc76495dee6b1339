"""Placement: the data model, the planner, the stores and the `modelyard placement` CLI."""
