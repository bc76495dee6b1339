"""containers/triton."""
