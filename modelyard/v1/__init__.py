"""Python code generated from protos/modelyard/v1 at build time."""
