"""containers/custom."""
