"""containers/mlserver."""
