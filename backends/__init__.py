"""Backends: everything that talks to a container (Triton adapter, Triton process, agent, example models)."""
