"""MLServer containers: archive checks for scikit-learn / XGBoost models and the adapter that loads them.

An MLServer archive holds `manifest.json` (`"backend": "mlserver"`, `"framework": "sklearn" | "xgboost"`,
the signature), MLServer's own `model-settings.json` (its `implementation` and `parameters.uri`, the model
file relative to the archive) and that model file (scikit-learn: joblib/pickle; XGBoost: json/ubj).

MLServer runs in multi-model mode with its own repository folder (containers/mlserver/process.py). As on
Triton (containers/triton/), each version is a model of its own named `name@version`, in its own folder
with a model-settings.json naming it so, so two versions of one model share one MLServer and loading or
unloading one never touches the other; the router sends that internal name (placement.model
`PER_VERSION_NAME_BACKENDS`). The agent drives it through MLServer's KServe v2 repository extension over
gRPC (RepositoryModelLoad / Unload / Index), with the same generated stubs as for our container.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from modelyard.catalog.modelstore import ArchiveError, Manifest, file_path
from modelyard.containers.adapter import LoadError
from modelyard.placement.model import ModelVersion, model_key

SETTINGS_FILE = "model-settings.json"
# framework -> (MLServer implementation, the package that provides it, model file suffixes)
FRAMEWORKS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "sklearn": ("mlserver_sklearn.SKLearnModel", "mlserver_sklearn", (".joblib", ".pkl", ".pickle")),
    "xgboost": ("mlserver_xgboost.XGBoostModel", "mlserver_xgboost", (".json", ".ubj", ".bst")),
}
# MLServer loads a model into its own process; a scikit-learn model costs a few MiB above its file.
MLSERVER_MIN_BYTES = 8 * 1024 * 1024


def mlserver_model_name(name: str, version: str) -> str:
    """The name MLServer knows one version of a model by (its own folder and model-settings.json)."""
    return model_key(name, version)


def _settings(root: Path) -> dict[str, Any]:
    path = root / SETTINGS_FILE
    if not path.is_file():
        raise ArchiveError(f"an mlserver archive needs {SETTINGS_FILE} at its top level")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArchiveError(f"{SETTINGS_FILE} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ArchiveError(f"{SETTINGS_FILE} must be a JSON object")
    return raw


def model_file(root: Path, settings: dict[str, Any], framework: str) -> Path:
    """The archive's model file named by `parameters.uri`, checked to lie inside the archive."""
    parameters = settings.get("parameters") or {}
    uri = parameters.get("uri") if isinstance(parameters, dict) else None
    if not isinstance(uri, str) or not uri:
        raise ArchiveError(f"{SETTINGS_FILE}: parameters.uri must name the model file")
    path = (root / uri).resolve()
    if not path.is_relative_to(root.resolve()):
        raise ArchiveError(f"{SETTINGS_FILE}: parameters.uri {uri!r} points outside the archive")
    if not path.is_file() or path.stat().st_size == 0:
        raise ArchiveError(f"{SETTINGS_FILE}: parameters.uri {uri!r}: no such non-empty file in the archive")
    suffixes = FRAMEWORKS[framework][2]
    if path.suffix not in suffixes:
        raise ArchiveError(f"{framework} model file {uri!r} must end with one of {', '.join(suffixes)}")
    return path


def check_archive(root: Path, manifest: Manifest) -> int:
    """Checks an mlserver archive; returns its estimated footprint (bytes). Raises ArchiveError."""
    framework = manifest.framework
    if framework not in FRAMEWORKS:
        raise ArchiveError(
            f"manifest.json: an mlserver model's framework must be one of {', '.join(FRAMEWORKS)}, "
            f"got {framework!r}"
        )
    implementation, package, _ = FRAMEWORKS[framework]
    settings = _settings(root)
    declared = settings.get("implementation")
    if declared != implementation:
        raise ArchiveError(
            f"{SETTINGS_FILE}: implementation must be {implementation} for a {framework} model, "
            f"got {declared!r}"
        )
    if importlib.util.find_spec(package) is None:
        raise ArchiveError(
            f"{framework} models need {package.replace('_', '-')}, which is not installed here"
        )
    path = model_file(root, settings, framework)
    return max(2 * path.stat().st_size, MLSERVER_MIN_BYTES)


def version_settings(model: ModelVersion, root: Path) -> dict[str, Any]:
    """The archive's model-settings for the version's own model: its internal name and version, the model
    file by absolute path, and the signature from the manifest (what ModelMetadata answers)."""
    try:
        settings = _settings(root)
        manifest = json.loads((root / "manifest.json").read_text())
        framework = str(manifest.get("framework", ""))
        if framework not in FRAMEWORKS:
            raise ArchiveError(f"unknown framework {framework!r}")
        path = model_file(root, settings, framework)
    except (ArchiveError, OSError, ValueError) as exc:
        raise LoadError(f"{model.key}: artifact {root}: {exc}") from exc
    parameters = dict(settings.get("parameters") or {})
    parameters.update(uri=str(path), version=model.version)
    settings.update(name=mlserver_model_name(model.name, model.version), parameters=parameters)
    for what in ("inputs", "outputs"):
        if isinstance(manifest.get(what), list):
            settings[what] = [
                {"name": t["name"], "datatype": t["datatype"], "shape": t["shape"]} for t in manifest[what]
            ]
    return settings


def rss_bytes(pid: int) -> int:
    """Resident bytes of process `pid` and its children (MLServer's parallel workers), 0 if gone."""
    total = 0
    pids = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(c) for c in children]
    except (OSError, ValueError):
        pass
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except (OSError, ValueError):
            continue
    return total


def find_mlserver_pid() -> int | None:
    """The pid of the `mlserver start` process this agent can see (a pod sharing its process namespace),
    the lowest if several; None when there is none."""
    found = mlserver_pids()
    return min(found) if found else None


def mlserver_pids() -> list[int]:
    """Pids of the `mlserver start` processes visible here."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # ended while we looked
        names = [Path(a.decode(errors="replace")).name for a in args[:3]]
        if "mlserver" in names and b"start" in args:
            found.append(int(proc.name))
    return found


class MLServerAdapter:
    """Loads and unloads model versions on one MLServer over its KServe v2 repository API.

    Each version lives in `<repository>/<name@version>/model-settings.json`. Footprints are measured as
    the growth of MLServer's resident memory across the load (loads are serialized per adapter so that
    growth is one model's), at least the model file's size; where the process is not visible (another
    pod), the estimate from the file.
    """

    def __init__(
        self,
        address: str,
        repository: Path,
        *,
        pid: Callable[[], int | None] | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.address = address
        self.repository = repository
        self._pid = pid or (lambda: None)
        if credentials is not None:
            self._channel = grpc.aio.secure_channel(address, credentials)
        else:
            self._channel = grpc.aio.insecure_channel(address)
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self._load_lock = asyncio.Lock()
        self._footprints: dict[str, int] = {}

    async def close(self) -> None:
        await self._channel.close()

    async def live(self) -> bool:
        try:
            response = await self._stub.ServerLive(pb.ServerLiveRequest(), timeout=2)
        except grpc.aio.AioRpcError:
            return False
        return bool(response.live)

    def model_dir(self, model: ModelVersion) -> Path:
        return self.repository / mlserver_model_name(model.name, model.version)

    def _materialize(self, model: ModelVersion) -> int:
        source = file_path(model.artifact_uri)
        if source is None or not source.is_dir():
            raise LoadError(f"{model.key}: unsupported artifact URI {model.artifact_uri!r} (a local folder)")
        settings = version_settings(model, source)
        target = self.model_dir(model)
        target.mkdir(parents=True, exist_ok=True)
        staged = target / f"{SETTINGS_FILE}.tmp"
        staged.write_text(json.dumps(settings, indent=2))
        staged.replace(target / SETTINGS_FILE)
        return Path(settings["parameters"]["uri"]).stat().st_size

    async def load(self, model: ModelVersion, timeout_s: float = 120.0) -> None:
        internal = mlserver_model_name(model.name, model.version)
        async with self._load_lock:
            file_bytes = await asyncio.to_thread(self._materialize, model)
            pid = self._pid()
            before = await asyncio.to_thread(rss_bytes, pid) if pid else 0
            try:
                await self._stub.RepositoryModelLoad(
                    pb.RepositoryModelLoadRequest(model_name=internal), timeout=timeout_s
                )
            except grpc.aio.AioRpcError as exc:
                raise LoadError(
                    f"{model.key}: MLServer refused the load: {exc.code().name}: {exc.details()}"
                ) from exc
            after = await asyncio.to_thread(rss_bytes, pid) if pid else 0
            self._footprints[model.key] = max(after - before, file_bytes)
        if model.key not in await self.ready_versions():
            raise LoadError(f"{model.key}: MLServer loaded the model but does not list it ready")

    async def unload(self, model: ModelVersion, timeout_s: float = 60.0) -> None:
        internal = mlserver_model_name(model.name, model.version)
        try:
            await self._stub.RepositoryModelUnload(
                pb.RepositoryModelUnloadRequest(model_name=internal), timeout=timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:  # not loaded: nothing to unload
                raise LoadError(f"{model.key}: unload failed: {exc.code().name}: {exc.details()}") from exc
        self._footprints.pop(model.key, None)
        await asyncio.to_thread(shutil.rmtree, self.model_dir(model), True)

    async def footprint(self, model: ModelVersion) -> int:
        """Bytes the loaded version costs MLServer, as measured when it loaded (0 if not measured here)."""
        return self._footprints.get(model.key, 0)

    async def ready_versions(self) -> set[str]:
        """Keys (`name@version`) of the versions MLServer reports ready (models under internal names only).
        MLServer 1.7 writes the state as `State.READY`."""
        response = await self._stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True), timeout=10)
        return {
            m.name
            for m in response.models
            if m.state.removeprefix("State.") == "READY"
            and "@" in m.name
            and m.name.rpartition("@")[2] == m.version
        }


MLSERVER_EXAMPLE_NAMES = ("iris",)
IRIS_SIGNATURE = {
    "inputs": [{"name": "INPUT", "datatype": "FP32", "shape": [-1, 4]}],
    "outputs": [{"name": "predict", "datatype": "INT64", "shape": [-1]}],
}


def write_iris_model(folder: Path) -> Path:
    """An mlserver archive folder: a scikit-learn classifier trained now on the iris data scikit-learn
    ships (no download), with its manifest and model-settings.json. Deterministic for one scikit-learn."""
    import joblib
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    features, labels = load_iris(return_X_y=True)
    classifier = LogisticRegression(max_iter=1000).fit(features, labels)
    folder.mkdir(parents=True, exist_ok=True)
    joblib.dump(classifier, folder / "model.joblib")
    (folder / "manifest.json").write_text(
        json.dumps({"backend": "mlserver", "framework": "sklearn", **IRIS_SIGNATURE}, indent=2)
    )
    (folder / SETTINGS_FILE).write_text(
        json.dumps(
            {"implementation": FRAMEWORKS["sklearn"][0], "parameters": {"uri": "./model.joblib"}}, indent=2
        )
    )
    return folder


def install_mlserver_example(
    name: str, artifacts: Path, *, version: str = "1", replicas: int = 1
) -> ModelVersion:
    """Builds the example `iris` and stores it in `artifacts/<sha256>/` (like catalog/examples.py)."""
    import tempfile

    from modelyard.catalog.examples import store_example
    from modelyard.catalog.modelstore import read_manifest

    if name not in MLSERVER_EXAMPLE_NAMES:
        raise ValueError(
            f"no mlserver example model named {name!r}; examples: {', '.join(MLSERVER_EXAMPLE_NAMES)}"
        )
    with tempfile.TemporaryDirectory() as tmp:
        source = write_iris_model(Path(tmp) / name)
        memory = check_archive(source, read_manifest(source))
        return store_example(
            source, artifacts, name=name, version=version, replicas=replicas, backend="mlserver",
            memory_bytes=memory,
        )  # fmt: skip
