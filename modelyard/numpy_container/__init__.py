"""numpy_container."""
