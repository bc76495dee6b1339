"""Hosting model versions in our container: loaded versions, the memory budget, loads and drained unloads,
and statistics. Its errors are of the one family (modelyard/errors.py): the gRPC front maps them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from modelyard.catalog.modelstore import file_path
from modelyard.errors import BadRequest, ModelNotFound, PermissionDenied, ResourceExhausted, Unavailable
from modelyard.numpy_container.numpy_model import NumpyModel, load_model_dir
from modelyard.placement.model import version_order

log = logging.getLogger(__name__)
R = TypeVar("R")

DRAIN_TIMEOUT_S = 30.0


class OverBudget(ResourceExhausted):
    """A load that would take the container over its memory budget."""


def artifact_dir(artifact_uri: str) -> Path:
    path = file_path(artifact_uri) if artifact_uri.startswith("file:") else None
    if path is None:
        raise BadRequest(f"artifact_uri must be a file:// directory, got {artifact_uri!r}")
    return path


def check_in_store(path: Path, model_store: Path) -> None:
    """Refuses a model directory outside `model_store` (a path already resolved; `path` is resolved here:
    neither `..` nor a symbolic link leads out of it). File system calls: run it off the event loop."""
    if not path.resolve().is_relative_to(model_store):
        raise PermissionDenied(f"model directory {str(path)!r} is outside this container's model store")


class LoadedVersion:
    """One loaded model version: the model, its in-flight requests and its statistics."""

    __slots__ = (
        "_drained",
        "artifact_uri",
        "execution_count",
        "fail_count",
        "fail_ns",
        "in_flight",
        "inference_count",
        "last_inference_ms",
        "model",
        "name",
        "success_count",
        "success_ns",
        "unloading",
        "version",
    )

    def __init__(self, name: str, version: str, artifact_uri: str, model: NumpyModel) -> None:
        self.name = name
        self.version = version
        self.artifact_uri = artifact_uri
        self.model = model
        self.unloading = False
        self.in_flight = 0
        self._drained: asyncio.Future[None] | None = None
        self.inference_count = self.execution_count = 0
        self.success_count = self.success_ns = self.fail_count = self.fail_ns = 0
        self.last_inference_ms = 0

    def __repr__(self) -> str:
        return f"LoadedVersion({self.name!r}, {self.version!r}, in_flight={self.in_flight})"

    def release(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0 and self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    async def drain(self, timeout_s: float) -> bool:
        """Waits until no request runs on this version; False if some still do after `timeout_s`."""
        if self.in_flight == 0:
            return True
        self._drained = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.shield(self._drained)
        except TimeoutError:
            return False
        return True

    def record(self, start_ns: int, ok: bool) -> None:
        """Counts one request; like Triton, inference and execution counts are of successful ones only."""
        elapsed_ns = time.perf_counter_ns() - start_ns
        self.last_inference_ms = time.time_ns() // 1_000_000
        if ok:
            self.inference_count += 1
            self.execution_count += 1
            self.success_count += 1
            self.success_ns += elapsed_ns
        else:
            self.fail_count += 1
            self.fail_ns += elapsed_ns


class _KeyLock:
    """An asyncio.Lock for one (name, version), dropped when nobody holds or waits for it."""

    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


class ModelHost:
    """The loaded model versions of one container, under its memory budget (sum of weight bytes)."""

    def __init__(
        self,
        memory_bytes: int,
        *,
        loader: Callable[[Path], NumpyModel] = load_model_dir,
        drain_timeout_s: float = DRAIN_TIMEOUT_S,
        model_store: Path | None = None,
        compute_threads: int | None = None,
    ) -> None:
        """`model_store`: load only from inside this directory (None: anywhere), resolved once here, not
        at every load. `compute_threads`: the pool running model math (numpy releases the GIL in most of
        it); default: Python's choice."""
        self.memory_bytes = memory_bytes
        self.model_store = model_store.resolve() if model_store is not None else None
        self.compute = ThreadPoolExecutor(compute_threads, thread_name_prefix="model-compute")
        self.used_bytes = 0
        self.load_count = 0  # artifact reads performed; concurrent loads of one key share one
        self.drain_timeout_s = drain_timeout_s
        self._loader = loader
        self._models: dict[str, dict[str, LoadedVersion]] = {}
        self._locks: dict[tuple[str, str], _KeyLock] = {}
        self._loading: set[tuple[str, str]] = set()

    def find(self, name: str, version: str) -> LoadedVersion | None:
        versions = self._models.get(name)
        return versions.get(version) if versions else None

    def resolve(self, name: str, version: str) -> LoadedVersion:
        """The version a request names, or the highest one not being unloaded when it names none."""
        versions = self._models.get(name)
        if not versions:
            raise ModelNotFound(f"model '{name}' is not loaded")
        if version:
            loaded = versions.get(version)
            if loaded is None:
                raise ModelNotFound(
                    f"model '{name}' version '{version}' is not loaded (loaded: {', '.join(versions)})"
                )
            return loaded
        serving = [v for v in versions.values() if not v.unloading] or list(versions.values())
        return max(serving, key=lambda v: version_order(v.version))

    def versions(self, name: str) -> list[LoadedVersion]:
        return sorted(self._models.get(name, {}).values(), key=lambda v: version_order(v.version))

    def all_versions(self) -> list[LoadedVersion]:
        return [v for name in sorted(self._models) for v in self.versions(name)]

    @contextlib.contextmanager
    def serving(self, name: str, version: str) -> Iterator[LoadedVersion]:
        """The version for one request, counted in flight so an unload waits for it."""
        loaded = self.resolve(name, version)
        if loaded.unloading:
            raise Unavailable(f"model '{name}' version '{loaded.version}' is being unloaded")
        loaded.in_flight += 1
        try:
            yield loaded
        finally:
            loaded.release()

    @contextlib.asynccontextmanager
    async def _locked(self, key: tuple[str, str]) -> AsyncIterator[None]:
        entry = self._locks.get(key)
        if entry is None:
            entry = self._locks[key] = _KeyLock()
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if entry.users == 0:
                del self._locks[key]

    async def load(self, name: str, version: str, artifact_uri: str) -> LoadedVersion:
        """Loads a version (or replaces it when `artifact_uri` changed); a no-op when already loaded."""
        path = artifact_dir(artifact_uri)
        current = self.find(name, version)
        if current is not None and current.artifact_uri == artifact_uri and not current.unloading:
            return current
        key = (name, version)
        async with self._locked(key):
            # Checked again: whoever held the lock before us may have loaded it already.
            current = self.find(name, version)
            if current is not None and current.artifact_uri == artifact_uri:
                return current
            self._loading.add(key)
            self.load_count += 1
            started = time.perf_counter()
            try:
                model = await asyncio.to_thread(self._read, path)
            finally:
                self._loading.discard(key)
            # No await from here on: the budget check and the commit are atomic on the event loop.
            needed = model.memory_bytes
            freed = current.model.memory_bytes if current is not None else 0
            if self.used_bytes - freed + needed > self.memory_bytes:
                replacing = f" ({freed} bytes would be freed by replacing the loaded copy)" if freed else ""
                raise OverBudget(
                    f"model '{name}' version '{version}' needs {needed} bytes; "
                    f"{self.used_bytes} of {self.memory_bytes} bytes are used{replacing}"
                )
            self.used_bytes += needed - freed
            if current is not None:
                current.model = model  # requests already running keep the model they started with
                current.artifact_uri = artifact_uri
                loaded = current
            else:
                loaded = LoadedVersion(name, version, artifact_uri, model)
                self._models.setdefault(name, {})[version] = loaded
            log.debug(
                "loaded %s@%s (%d bytes) in %.1f ms",
                name,
                version,
                needed,
                (time.perf_counter() - started) * 1e3,
            )
            return loaded

    def _read(self, path: Path) -> NumpyModel:
        if self.model_store is not None:
            check_in_store(path, self.model_store)
        return self._loader(path)

    async def run(self, fn: Callable[..., R], *args: Any) -> R:
        """`fn(*args)` on the compute pool: the event loop keeps serving other models meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(self.compute, fn, *args)

    async def unload(self, name: str, version: str | None = None) -> list[str]:
        """Unloads one version (or all of `name`'s); returns the versions unloaded."""
        targets = [version] if version else list(self._models.get(name, {}))
        done = await asyncio.gather(*(self._unload_one(name, v) for v in targets))
        return [v for v, unloaded in zip(targets, done, strict=True) if unloaded]

    async def _unload_one(self, name: str, version: str) -> bool:
        async with self._locked((name, version)):
            loaded = self.find(name, version)
            if loaded is None:
                return False
            loaded.unloading = True  # new requests get UNAVAILABLE from here on
            if not await loaded.drain(self.drain_timeout_s):
                log.warning(
                    "unloading %s@%s with %d requests still running after %.0f s",
                    name,
                    version,
                    loaded.in_flight,
                    self.drain_timeout_s,
                )
            versions = self._models[name]
            del versions[version]
            if not versions:
                del self._models[name]
            self.used_bytes -= loaded.model.memory_bytes
            return True

    def index(self) -> list[tuple[str, str, str]]:
        """(name, version, state) of every version loaded or loading; state READY, UNLOADING or LOADING."""
        rows = [(v.name, v.version, "UNLOADING" if v.unloading else "READY") for v in self.all_versions()]
        rows += [
            (name, version, "LOADING") for name, version in self._loading if not self.find(name, version)
        ]
        return sorted(rows, key=lambda r: (r[0], version_order(r[1])))


# --- protobuf <-> numpy ---------------------------------------------------------------------------------
