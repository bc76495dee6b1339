"""The Triton adapter: puts a model version into a Triton repository and loads or unloads it."""

from __future__ import annotations

import asyncio
import shutil
from collections import defaultdict
from pathlib import Path
from urllib.parse import unquote, urlparse

import tritonclient.grpc.aio as triton_aio
from tritonclient.utils import InferenceServerException

from placement.model import ModelVersion


class LoadError(Exception):
    """A model version could not be loaded; the message says why (Triton's own words where it gave some)."""


def artifact_path(model: ModelVersion) -> Path:
    parsed = urlparse(model.artifact_uri)
    if parsed.scheme not in ("", "file"):
        raise LoadError(f"{model.key}: unsupported artifact URI {model.artifact_uri!r} (only file://)")
    return Path(unquote(parsed.path))


class TritonAdapter:
    """Loads and unloads model versions on one Triton instance over its KServe v2 repository API.

    Each version lives in `<repository>/<name>/<version>/`; the config (with `version_policy: all`) loads
    every version present, so loading or unloading one version means changing folders and reloading.
    """

    def __init__(self, address: str, repository: Path) -> None:
        self.address = address
        self.repository = repository
        self._client = triton_aio.InferenceServerClient(address)
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    async def close(self) -> None:
        await self._client.close()

    async def live(self) -> bool:
        try:
            return bool(await self._client.is_server_live(client_timeout=2))
        except InferenceServerException:
            return False

    async def load(self, model: ModelVersion, timeout_s: float = 120.0) -> None:
        async with self._locks[model.name]:
            await asyncio.to_thread(self._materialize, model)
            await self._reload(model.name, timeout_s)
            if not await self._client.is_model_ready(model.name, model.version):
                raise LoadError(
                    f"{model.key}: Triton loaded the model but version {model.version} is not ready"
                )

    async def unload(self, model: ModelVersion, timeout_s: float = 60.0) -> None:
        async with self._locks[model.name]:
            model_dir = self.repository / model.name
            await asyncio.to_thread(shutil.rmtree, model_dir / model.version, True)
            remaining = [p for p in model_dir.iterdir() if p.is_dir()] if model_dir.exists() else []
            if remaining:
                await self._reload(model.name, timeout_s)
                return
            try:
                await self._client.unload_model(model.name, client_timeout=timeout_s)
            except InferenceServerException as exc:
                raise LoadError(f"{model.key}: unload failed: {exc.message()}") from exc
            await asyncio.to_thread(shutil.rmtree, model_dir, True)

    async def _reload(self, name: str, timeout_s: float) -> None:
        try:
            await self._client.load_model(name, client_timeout=timeout_s)
        except InferenceServerException as exc:
            raise LoadError(f"{name}: Triton refused the load: {exc.message()}") from exc

    def _materialize(self, model: ModelVersion) -> None:
        if not model.version.isdigit():
            raise LoadError(f"{model.key}: Triton versions are positive integers, got {model.version!r}")
        source = artifact_path(model)
        config = source / "config.pbtxt"
        files = source / "version"
        if not config.is_file() or not files.is_dir():
            raise LoadError(f"{model.key}: artifact {source} lacks config.pbtxt or version/")
        model_dir = self.repository / model.name
        model_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy2(config, model_dir / "config.pbtxt")
        target = model_dir / model.version
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(files, target, ignore=shutil.ignore_patterns("__pycache__"))

    async def footprint(self, model: ModelVersion) -> int:
        """Bytes the loaded version really uses: Triton's `memory_usage` statistic where it reports one,
        else the resident memory of the version's python-backend stub processes (0 when neither shows).
        """
        try:
            stats = await self._client.get_inference_statistics(model.name, model.version)
            reported = sum(u.byte_size for s in stats.model_stats for u in s.memory_usage)
        except InferenceServerException:
            reported = 0
        if reported:
            return int(reported)
        script = str(self.repository / model.name / model.version / "model.py")
        return await asyncio.to_thread(stub_rss_bytes, script)

    async def ready_versions(self) -> set[str]:
        """Model keys (`name@version`) Triton reports READY."""
        index = await self._client.get_model_repository_index()
        return {f"{m.name}@{m.version}" for m in index.models if m.state == "READY" and m.version}


def stub_rss_bytes(script: str) -> int:
    """Resident bytes of the python-backend stubs running `script` (one per model instance)."""
    total = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
            if len(args) < 2 or args[1].decode(errors="replace") != script:
                continue
            for line in (proc / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except (OSError, ValueError):
            continue  # the process ended while we looked
    return total
