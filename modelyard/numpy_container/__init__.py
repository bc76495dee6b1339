"""numpy_container: our own KServe v2 container (container.py), its hosting and its numpy models."""

# The trailing metadata of a successful RepositoryModelLoad: the bytes the container now accounts for the
# version (its ModelStatistics `memory_usage`), so an agent measures a load without a second call.
MEMORY_BYTES_TRAILER = "modelyard-memory-bytes"
