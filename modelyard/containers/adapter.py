"""What an agent needs of a container, whatever its kind: the adapter protocol and its error.

TritonAdapter (triton.py), CustomAdapter (custom.py) and SageMakerAdapter (sagemaker.py) implement it;
the agent (agent.py) uses it.
"""

from __future__ import annotations

from typing import Protocol

from modelyard.placement.model import ModelVersion


class LoadError(Exception):
    """A model version could not be loaded; the message says why (the container's own words where it
    gave some)."""


class ContainerFull(LoadError):
    """The container refused a load for lack of memory (SageMaker's 507): placement treats it as full."""


class ContainerAdapter(Protocol):
    """Loads, unloads and measures model versions on one container."""

    async def live(self) -> bool: ...
    async def load(self, model: ModelVersion) -> None: ...
    async def unload(self, model: ModelVersion) -> None: ...
    async def footprint(self, model: ModelVersion) -> int: ...
    async def ready_versions(self) -> set[str]:
        """Keys (`name@version`) of the model versions the container reports ready."""
        ...

    async def close(self) -> None: ...
