"""The Triton adapter: puts a model version into a Triton repository and loads or unloads it.

Triton keeps one `config.pbtxt` per model directory for all the versions in it, so two versions of one
model cannot have different configs there (triton#4832). Each version therefore gets a model of its own,
named by its key `name@version` (`triton_model_name`): our model names match [A-Za-z0-9][A-Za-z0-9_.-]*,
so the `@` cannot collide with a user's model name, and Triton accepts it. Loading, reloading or
unloading one version never touches another. Callers keep using the public name and version: the router
and the zero-hop client send the internal name to Triton and show the public one in answers.
"""

from __future__ import annotations

import asyncio
import shutil
from collections import defaultdict
from pathlib import Path

import tritonclient.grpc.aio as triton_aio
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException

from modelyard.catalog.modelstore import file_path
from modelyard.containers.adapter import LoadError
from modelyard.fleet_secret import FLEET_SECRET_HEADER
from modelyard.placement.model import ModelVersion, model_key

TRITON_SERVER_NAME = "triton"  # what Triton answers in ServerMetadata.name


def triton_model_name(name: str, version: str) -> str:
    """The name Triton knows one version of a model by (its own model directory)."""
    return model_key(name, version)


def artifact_path(model: ModelVersion) -> Path:
    path = file_path(model.artifact_uri)
    if path is None:
        raise LoadError(f"{model.key}: unsupported artifact URI {model.artifact_uri!r} (only file://)")
    return path


def version_config(model: ModelVersion, text: str) -> str:
    """The archive's config for the version's own model: its internal name, and only its version."""
    config = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise LoadError(f"{model.key}: config.pbtxt does not parse: {exc}") from exc
    config.name = triton_model_name(model.name, model.version)
    config.version_policy.Clear()
    config.version_policy.specific.versions.append(int(model.version))
    return str(text_format.MessageToString(config))


class TritonAdapter:
    """Loads and unloads model versions on one Triton instance over its KServe v2 repository API.

    Each version lives in `<repository>/<name@version>/` with its own config and one version folder.
    """

    def __init__(self, address: str, repository: Path, *, fleet_secret: str | None = None) -> None:
        self.address = address
        self.repository = repository
        self._client = triton_aio.InferenceServerClient(address)
        # Sent on every call: Triton's restricted protocols refuse calls without it.
        self._headers = {FLEET_SECRET_HEADER: fleet_secret} if fleet_secret else None
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    async def close(self) -> None:
        await self._client.close()

    async def live(self) -> bool:
        try:
            return bool(await self._client.is_server_live(client_timeout=2, headers=self._headers))
        except InferenceServerException:
            return False

    def model_dir(self, model: ModelVersion) -> Path:
        return self.repository / triton_model_name(model.name, model.version)

    async def load(self, model: ModelVersion, timeout_s: float = 120.0) -> None:
        internal = triton_model_name(model.name, model.version)
        async with self._locks[internal]:
            await asyncio.to_thread(self._materialize, model)
            try:
                await self._client.load_model(internal, client_timeout=timeout_s, headers=self._headers)
            except InferenceServerException as exc:
                raise LoadError(f"{model.key}: Triton refused the load: {exc.message()}") from exc
            if not await self._client.is_model_ready(internal, model.version, headers=self._headers):
                raise LoadError(
                    f"{model.key}: Triton loaded the model but version {model.version} is not ready"
                )

    async def unload(self, model: ModelVersion, timeout_s: float = 60.0) -> None:
        internal = triton_model_name(model.name, model.version)
        async with self._locks[internal]:
            try:
                await self._client.unload_model(internal, client_timeout=timeout_s, headers=self._headers)
            except InferenceServerException as exc:
                raise LoadError(f"{model.key}: unload failed: {exc.message()}") from exc
            await asyncio.to_thread(shutil.rmtree, self.model_dir(model), True)

    def _materialize(self, model: ModelVersion) -> None:
        if not model.version.isdigit() or int(model.version) <= 0:
            raise LoadError(f"{model.key}: Triton versions are positive integers, got {model.version!r}")
        source = artifact_path(model)
        config = source / "config.pbtxt"
        files = source / "version"
        if not config.is_file() or not files.is_dir():
            raise LoadError(f"{model.key}: artifact {source} lacks config.pbtxt or version/")
        model_dir = self.model_dir(model)
        model_dir.mkdir(parents=True, exist_ok=True)
        staged = model_dir / "config.pbtxt.tmp"
        staged.write_text(version_config(model, config.read_text()))
        staged.replace(model_dir / "config.pbtxt")
        target = model_dir / model.version
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(files, target, ignore=shutil.ignore_patterns("__pycache__"))

    async def footprint(self, model: ModelVersion) -> int:
        """Bytes the loaded version really uses: Triton's `memory_usage` statistic where it reports one,
        else the resident memory of the version's python-backend stub processes (0 when neither shows).
        """
        try:
            internal = triton_model_name(model.name, model.version)
            stats = await self._client.get_inference_statistics(
                internal, model.version, headers=self._headers
            )
            reported = sum(u.byte_size for s in stats.model_stats for u in s.memory_usage)
        except InferenceServerException:
            reported = 0
        if reported:
            return int(reported)
        script = str(self.model_dir(model) / model.version / "model.py")
        return await asyncio.to_thread(stub_rss_bytes, script)

    async def ready_versions(self) -> set[str]:
        """Model keys (`name@version`) Triton reports READY (models under internal names only)."""
        index = await self._client.get_model_repository_index(headers=self._headers)
        return {
            m.name
            for m in index.models
            if m.state == "READY" and "@" in m.name and m.name.rpartition("@")[2] == m.version
        }


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
