"""Archives, the content-addressed model store and registration: bad archives are refused whole."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from modelyard.catalog.examples import EXAMPLES_DIR
from modelyard.catalog.modelstore import ArchiveError, LocalModelStore
from modelyard.catalog.registration import AlreadyRegistered, RegistrationError, remove, upload
from modelyard.placement import registry
from modelyard.placement.store import open_store

SIGNATURE = {
    "inputs": [{"name": "INPUT", "datatype": "FP32", "shape": [-1]}],
    "outputs": [{"name": "OUTPUT", "datatype": "FP32", "shape": [-1]}],
}


def triton_archive(tmp_path: Path, manifest: dict | None = None, name: str = "scale.tgz") -> Path:  # type: ignore[type-arg]
    source = tmp_path / f"src-{name}"
    shutil.copytree(EXAMPLES_DIR / "scale", source)
    if manifest is not None:
        (source / "manifest.json").write_text(json.dumps(manifest))
    archive = tmp_path / name
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source, arcname=".")
    return archive


def register(tmp_path: Path, archive: Path, **kwargs):  # type: ignore[no-untyped-def]
    async def main():  # type: ignore[no-untyped-def]
        async with open_store(str(tmp_path / "store")) as store:
            model = (await upload(store, LocalModelStore(tmp_path / "artifacts"), archive, **kwargs)).model
            fleet = await registry.load_fleet(store)
            return model, fleet

    return asyncio.run(main())


def registered(tmp_path: Path) -> dict:  # type: ignore[type-arg]
    async def main():  # type: ignore[no-untyped-def]
        async with open_store(str(tmp_path / "store")) as store:
            return (await registry.load_fleet(store)).models

    return asyncio.run(main())


def test_a_good_archive_is_stored_by_hash_and_registered(tmp_path: Path) -> None:
    archive = triton_archive(tmp_path, {"backend": "triton", "framework": "python", **SIGNATURE})
    model, fleet = register(tmp_path, archive, name="scale", version="3", tenants=("b", "a"))
    import hashlib

    assert model.sha256 == hashlib.sha256(archive.read_bytes()).hexdigest()
    stored = tmp_path / "artifacts" / model.sha256
    assert (stored / "config.pbtxt").is_file() and (stored / "version" / "model.py").is_file()
    assert model.artifact_uri == stored.resolve().as_uri()
    assert model.tenants == ("a", "b") and model.backend == "triton"
    assert model.memory_bytes >= 32 * 2**20  # a python-backend model costs a stub process at least
    assert fleet.models == {"scale@3": model}


def test_a_triton_archive_without_manifest_registers_with_its_config_signature(tmp_path: Path) -> None:
    model, _ = register(tmp_path, triton_archive(tmp_path, None), name="scale", version="1")
    assert model.backend == "triton"
    assert '"name":"INPUT"' in model.signature and '"name":"OUTPUT"' in model.signature


def test_an_archive_with_neither_manifest_nor_config_is_refused(tmp_path: Path) -> None:
    archive = triton_archive(tmp_path, None)
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if not m.name.endswith("config.pbtxt")]
        (tmp_path / "bare").mkdir()
        tar.extractall(tmp_path / "bare", members=members, filter="data")
    with pytest.raises(ArchiveError, match=r"neither manifest\.json nor a Triton model.s config\.pbtxt"):
        register(tmp_path, tmp_path / "bare", name="scale", version="1")
    assert registered(tmp_path) == {}


@pytest.mark.parametrize(
    "manifest, message",
    [
        ({"backend": "onnx", **SIGNATURE}, "unknown backend 'onnx'"),
        ({"backend": "triton", **SIGNATURE, "memory_bytes": -5}, "memory_bytes must be a positive integer"),
        (
            {
                "backend": "triton",
                "inputs": SIGNATURE["inputs"],
                "outputs": [{"name": "Y", "datatype": "FP32", "shape": [-1]}],
            },
            "do not match config.pbtxt",
        ),
        (
            {"backend": "triton", "inputs": [], "outputs": SIGNATURE["outputs"]},
            "inputs must be a non-empty list",
        ),
    ],
    ids=["unknown-backend", "negative-memory", "signature-mismatch", "no-inputs"],
)
def test_bad_archives_are_refused_and_nothing_is_registered_or_stored(
    tmp_path: Path, manifest, message
) -> None:  # type: ignore[no-untyped-def]
    archive = triton_archive(tmp_path, manifest)
    with pytest.raises(ArchiveError, match=message):
        register(tmp_path, archive, name="scale", version="1")
    assert registered(tmp_path) == {}
    assert not (tmp_path / "artifacts").exists() or not any((tmp_path / "artifacts").iterdir())


def test_a_hash_mismatch_is_refused(tmp_path: Path) -> None:
    archive = triton_archive(tmp_path, {"backend": "triton", **SIGNATURE})
    with pytest.raises(ArchiveError, match="sha256 mismatch"):
        register(tmp_path, archive, name="scale", version="1", expected_sha256="0" * 64)
    assert registered(tmp_path) == {}


def test_a_file_that_is_not_an_archive_is_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tgz"
    junk.write_bytes(b"definitely not gzip")
    with pytest.raises(ArchiveError, match="not a tar archive"):
        register(tmp_path, junk, name="scale", version="1")


def test_an_archive_escaping_its_folder_is_refused(tmp_path: Path) -> None:
    evil = tmp_path / "evil.tar"
    payload = tmp_path / "payload"
    payload.write_text("x")
    with tarfile.open(evil, "w") as tar:
        tar.add(payload, arcname="../../escaped")
    with pytest.raises(ArchiveError):
        register(tmp_path, evil, name="scale", version="1")
    assert not (tmp_path.parent / "escaped").exists()


def test_versions_are_immutable_but_reuploading_the_same_artifact_is_fine(tmp_path: Path) -> None:
    first = triton_archive(tmp_path, {"backend": "triton", **SIGNATURE}, name="a.tgz")
    other = triton_archive(tmp_path, {"backend": "triton", **SIGNATURE, "memory_bytes": 10**9}, name="b.tgz")
    model, _ = register(tmp_path, first, name="scale", version="1")
    again, _ = register(tmp_path, first, name="scale", version="1")
    assert again == model
    with pytest.raises(AlreadyRegistered, match="already exists with another artifact"):
        register(tmp_path, other, name="scale", version="1")
    with pytest.raises(AlreadyRegistered, match=r"this artifact but other settings \(replicas 1\)"):
        register(tmp_path, first, name="scale", version="1", replicas=2)
    assert registered(tmp_path) == {"scale@1": model}


@pytest.mark.parametrize(
    "name, version, message",
    [("bad/name", "1", "bad model name"), ("ok", "v1", "positive integers"), ("a@b", "1", "bad model name")],
)
def test_bad_names_and_versions_are_refused(tmp_path: Path, name: str, version: str, message: str) -> None:
    archive = triton_archive(tmp_path, {"backend": "triton", **SIGNATURE})
    with pytest.raises(RegistrationError, match=message):
        register(tmp_path, archive, name=name, version=version)
    assert registered(tmp_path) == {}


def test_remove_unregisters_and_leaves_the_shard_map_to_the_controller(tmp_path: Path) -> None:
    archive = triton_archive(tmp_path, {"backend": "triton", **SIGNATURE})
    register(tmp_path, archive, name="scale", version="1")

    async def main() -> None:
        async with open_store(str(tmp_path / "store")) as store:
            await registry.write_shard_map(store, {"scale@1": ["c1"]}, expected_generation=0)
            map_before, _ = await store.get_prefix("/modelyard/map/")
            await remove(store, "scale", "1")
            assert (await registry.load_fleet(store)).models == {}
            # The controller is the one writer of the map: it drops the copies of unregistered models.
            map_after, _ = await store.get_prefix("/modelyard/map/")
            assert map_after == map_before
            with pytest.raises(RegistrationError, match="not registered"):
                await remove(store, "scale", "1")

    asyncio.run(main())


def test_stored_artifacts_are_readable_by_other_users(tmp_path: Path) -> None:
    archive = triton_archive(tmp_path, {"backend": "triton", **SIGNATURE})
    model, _ = register(tmp_path, archive, name="scale", version="1")
    stored = tmp_path / "artifacts" / model.sha256
    assert stored.stat().st_mode & 0o777 == 0o755  # containers may run as another uid than the uploader


def test_an_archive_over_the_size_limit_is_refused_before_anything_is_stored(tmp_path: Path) -> None:
    archive = triton_archive(tmp_path, {"backend": "triton", **SIGNATURE})
    limit = archive.stat().st_size - 1
    with pytest.raises(ArchiveError, match=r"the archive is .* over the .* archive limit"):
        register(tmp_path, archive, name="scale", version="1", max_archive_bytes=limit)
    assert registered(tmp_path) == {}
    assert not (tmp_path / "artifacts").exists()


def test_an_archive_that_unpacks_over_the_size_limit_is_refused_before_unpacking(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.tgz"
    zeros = tmp_path / "zeros"
    zeros.write_bytes(bytes(1_000_000))  # compresses to ~1 KB
    with tarfile.open(bomb, "w:gz") as tar:
        tar.add(zeros, arcname="weights.bin")
    assert bomb.stat().st_size < 100_000
    with pytest.raises(
        ArchiveError, match=r"its files unpack to 976\.6 KiB, over the 97\.7 KiB archive limit"
    ):
        register(tmp_path, bomb, name="scale", version="1", max_archive_bytes=100_000)


def test_a_directory_over_the_size_limit_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "model"
    shutil.copytree(EXAMPLES_DIR / "scale", source)
    (source / "manifest.json").write_text(json.dumps({"backend": "triton", **SIGNATURE}))
    with pytest.raises(ArchiveError, match="its files hold"):
        register(tmp_path, source, name="scale", version="1", max_archive_bytes=10)


def test_upload_refuses_an_oversized_archive_with_one_line_and_status_2(tmp_path: Path) -> None:
    archive = triton_archive(tmp_path, {"backend": "triton", **SIGNATURE})
    result = subprocess.run(
        [sys.executable, "-m", "modelyard", "models", "upload", str(archive), "--name", "scale",
         "--version", "1", "--store", str(tmp_path / "store"), "--model-store", str(tmp_path / "artifacts")],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "MODELYARD_MAX_ARCHIVE_BYTES": "100"},
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "over the 100 B archive limit" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_stored_artifacts_are_fsynced_before_they_are_renamed_into_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A power cut cannot be produced in a test, so this watches the real fsync calls instead: every file
    # and folder of the artifact must reach the disk before its final name exists, and the store's
    # folder after the rename.
    synced: list[tuple[str, bool]] = []  # (path, the final artifact folder existed at the time)
    real_fsync = os.fsync
    artifacts = tmp_path / "artifacts"

    def watched_fsync(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        synced.append((path, any(p.is_dir() and not p.name.startswith(".") for p in artifacts.iterdir())))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", watched_fsync)
    archive = triton_archive(tmp_path, {"backend": "triton", **SIGNATURE})
    model, _ = register(tmp_path, archive, name="scale", version="1")
    stored = artifacts / model.sha256
    in_staging = {  # what was synced under the staging folder, relative to it, before the rename
        str(Path(*Path(path).relative_to(artifacts).parts[1:]))
        for path, visible in synced
        if not visible and Path(path).is_relative_to(artifacts) and Path(path) != artifacts
    }
    assert {str(p.relative_to(stored)) for p in stored.rglob("*")} | {"."} <= in_staging
    assert (str(artifacts), True) in synced  # the rename itself made durable


def test_an_artifact_that_fails_to_reach_the_disk_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An I/O error on fsync (a failing disk) cannot be produced on demand: this one is injected.
    def failing_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    (tmp_path / "artifacts").mkdir()  # so the failure hits the artifact's own files
    archive = triton_archive(tmp_path, {"backend": "triton", **SIGNATURE})
    with pytest.raises(OSError, match="Input/output error"):
        register(tmp_path, archive, name="scale", version="1")
    assert registered(tmp_path) == {}
    assert list((tmp_path / "artifacts").iterdir()) == []  # no artifact, no staging folder


# -- signatures in the registry ---------------------------------------------------------------------------


def _stream_archive(tmp_path: Path) -> Path:
    """The decoupled example (config.pbtxt: `decoupled: true`) with a manifest that says nothing of it."""
    source = tmp_path / "src-stream"
    shutil.copytree(EXAMPLES_DIR / "stream", source)
    manifest = {
        "backend": "triton",
        "inputs": [{"name": "INPUT", "datatype": "FP32", "shape": [-1]}],
        "outputs": [{"name": "OUTPUT", "datatype": "FP32", "shape": [1]}],
    }
    (source / "manifest.json").write_text(json.dumps(manifest))
    return source


def test_an_upload_stores_the_signature_in_the_registry_decoupled_from_config_pbtxt(tmp_path: Path) -> None:
    scale, _ = register(
        tmp_path, triton_archive(tmp_path, {"backend": "triton", **SIGNATURE}), name="scale", version="1"
    )
    stream, fleet = register(tmp_path, _stream_archive(tmp_path), name="stream", version="1")
    assert json.loads(scale.signature) == {**SIGNATURE, "decoupled": False}
    assert json.loads(stream.signature) == {
        "inputs": [{"name": "INPUT", "datatype": "FP32", "shape": [-1]}],
        "outputs": [{"name": "OUTPUT", "datatype": "FP32", "shape": [1]}],
        "decoupled": True,  # only config.pbtxt says so
    }
    assert fleet.models["stream@1"].signature == stream.signature  # as the registry reads it back


def test_a_version_registered_before_signatures_were_stored_reuploads_as_the_same_registration(
    tmp_path: Path,
) -> None:
    archive = triton_archive(tmp_path, {"backend": "triton", **SIGNATURE})
    model, _ = register(tmp_path, archive, name="scale", version="1")
    old = json.loads(model.to_json())
    del old["signature"]  # the value as the registry held it before this field existed
    old_raw = json.dumps(old, sort_keys=True).encode()

    async def write_old_then_reupload():  # type: ignore[no-untyped-def]
        async with open_store(str(tmp_path / "store")) as store:
            await store.put(registry.MODELS + "scale@1", old_raw)
            again = await upload(
                store, LocalModelStore(tmp_path / "artifacts"), archive, name="scale", version="1"
            )
            return again, await registry.read_model(store, "scale@1")

    again, current = asyncio.run(write_old_then_reupload())
    assert not again.created and again.model.signature == ""  # a no-op, not "already exists"
    assert current is not None and current.value == old_raw  # the old value stands as it was


def test_a_value_without_a_signature_parses_and_a_malformed_one_is_refused() -> None:
    from modelyard.placement.model import ModelVersion

    old = ModelVersion.from_json(b'{"name": "m", "version": "1", "backend": "custom"}')
    assert old.signature == ""
    good = json.dumps({**SIGNATURE, "decoupled": False})
    assert (
        ModelVersion.from_json(json.dumps({"name": "m", "version": "1", "signature": good})).signature == good
    )
    for bad in (
        "not json",
        json.dumps({**SIGNATURE}),  # no decoupled
        json.dumps({**SIGNATURE, "decoupled": "yes"}),
        json.dumps({**SIGNATURE, "inputs": [], "decoupled": False}),
        json.dumps(
            {**SIGNATURE, "outputs": [{"name": "O", "datatype": "FP32", "shape": ["x"]}], "decoupled": False}
        ),
    ):
        for _ in range(2):  # parsed signatures are cached: a refusal is not, and holds the second time too
            with pytest.raises(ValueError, match="signature"):
                ModelVersion.from_json(json.dumps({"name": "m", "version": "1", "signature": bad}))
