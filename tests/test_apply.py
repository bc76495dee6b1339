"""`modelyard apply -f FLEET.yaml` and `modelyard export`: through the real command against the embedded store
and etcd, and through the library for what a command line cannot provoke (a store failing mid-write, two
applies at once, random fleets with hypothesis)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelyard.catalog import fleet_apply
from modelyard.catalog.fleet import FleetSpec, ModelEntry, parse_data
from modelyard.catalog.modelstore import LocalModelStore
from modelyard.placement import registry
from modelyard.placement.store import Store, StoreError, open_store
from modelyard.placement.store.base import MAX_TXN_OPS

PACK = """
import json, numpy as np
np.savez("weights.npz", factor=np.array([2.0], dtype=np.float32))
json.dump({"backend": "custom", "framework": "numpy", "format": 1, "op": "scale",
           "inputs": [{"name": "INPUT", "datatype": "FP32", "shape": [-1]}],
           "outputs": [{"name": "OUTPUT", "datatype": "FP32", "shape": [-1]}]}, open("manifest.json", "w"))
"""

FLEET = """
models:
  - {name: double, version: 1, archive: double}
  - {name: double, version: 2, archive: double, replicas: 2, tenants: [acme]}
pipelines:
  - name: quad
    version: 1
    inputs: [{name: X, datatype: FP32, shape: [-1]}]
    outputs: [{name: Z, datatype: FP32, shape: [-1]}]
    steps:
      - {name: a, model: double@1, inputs: {INPUT: X}, outputs: {OUTPUT: Y}}
      - {name: b, model: double@1, inputs: {INPUT: Y}, outputs: {OUTPUT: Z}}
routes:
  - {model: double, default: 1, pins: {acme: 2}}
"""


def modelyard(*args: str, cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "modelyard", *args],
        capture_output=True, text=True, timeout=120, cwd=cwd, input=stdin,
    )  # fmt: skip


def stored_keys(store_url: str) -> dict[str, bytes]:
    async def read() -> dict[str, bytes]:
        async with open_store(store_url) as store:
            items, _ = await store.get_prefix(registry.ROOT)
            return {i.key: i.value for i in items if i.key != fleet_apply.APPLIED}

    return asyncio.run(read())


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small custom (numpy) model folder: manifest.json and weights."""
    folder = tmp_path_factory.mktemp("model") / "double"
    folder.mkdir()
    subprocess.run([sys.executable, "-c", PACK], cwd=folder, check=True, timeout=60)
    return folder


@pytest.fixture
def work(tmp_path: Path, model_dir: Path) -> Path:
    """A folder with the model folder and the fleet file beside it (archive paths are relative to it)."""
    (tmp_path / "double").symlink_to(model_dir)
    (tmp_path / "fleet.yaml").write_text(FLEET)
    return tmp_path


def test_apply_registers_everything_then_a_second_apply_changes_nothing(work: Path, store_url: str) -> None:
    common = ("--store", store_url, "--model-store", str(work / "artifacts"))
    first = modelyard("apply", "-f", "fleet.yaml", *common, cwd=work)
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == [
        "+ model double@1 (custom, cpu, 4 B, replicas 1, public)",
        "+ model double@2 (custom, cpu, 4 B, replicas 2, acme)",
        "+ pipeline quad@1 (2 steps, public)",
        "+ route double: default 1, pins acme=2",
        "applied: 4 added, 0 changed, 0 removed, 0 unchanged",
    ]
    keys = stored_keys(store_url)
    assert set(keys) == {
        registry.MODELS + "double@1",
        registry.MODELS + "double@2",
        registry.PIPELINES + "quad@1",
        registry.ROUTES + "double",
    }
    again = modelyard("apply", "-f", "fleet.yaml", *common, cwd=work)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == "applied: no changes (4 unchanged)"
    assert stored_keys(store_url) == keys


def test_apply_of_export_changes_nothing_in_yaml_and_json(work: Path, store_url: str) -> None:
    common = ("--store", store_url, "--model-store", str(work / "artifacts"))
    assert modelyard("apply", "-f", "fleet.yaml", *common, cwd=work).returncode == 0
    before = stored_keys(store_url)
    exported = modelyard("export", "--store", store_url, cwd=work)
    assert exported.returncode == 0, exported.stderr
    as_json = modelyard("export", "-o", "json", "--store", store_url, cwd=work)
    assert yaml.safe_load(exported.stdout) == json.loads(as_json.stdout)
    (work / "exported.yaml").write_text(exported.stdout)
    (work / "exported.json").write_text(as_json.stdout)
    for name in ("exported.yaml", "exported.json"):
        dry = modelyard("apply", "-f", name, "--dry-run", *common, cwd=work)
        assert dry.returncode == 0, dry.stderr
        assert dry.stdout.strip() == "dry run: no changes (4 unchanged); nothing written"
    # Into an empty store sharing the model store: the same fleet, registered from the stored artifacts.
    other = str(work / "other-store")
    copied = modelyard("apply", "-f", "exported.yaml", "--store", other, "--model-store", common[3], cwd=work)
    assert copied.returncode == 0, copied.stderr
    assert stored_keys(other) == before


def test_dry_run_shows_the_diff_and_writes_nothing(work: Path) -> None:
    store = str(work / "store")
    dry = modelyard("apply", "-f", "fleet.yaml", "--dry-run", "--store", store, cwd=work)
    assert dry.returncode == 0, dry.stderr
    assert (
        dry.stdout.splitlines()[-1]
        == "dry run: 4 to add, 0 to change, 0 to remove, 0 unchanged; nothing written"
    )
    assert dry.stderr.strip() == f"note: no store at {store} yet: compared with an empty fleet"
    assert not Path(store).exists()  # not even created
    assert not (work / ".modelyard" / "artifacts").exists()  # no artifact stored either
    assert modelyard("apply", "-f", "fleet.yaml", "--store", store, cwd=work).returncode == 0
    keys = stored_keys(store)
    (work / "fleet.yaml").write_text(FLEET.replace("version: 2", "version: 3"))
    dry = modelyard("apply", "-f", "fleet.yaml", "--dry-run", "--store", store, cwd=work)
    assert dry.returncode == 0, dry.stderr
    assert "+ model double@3 (custom, cpu, 4 B, replicas 2, acme)" in dry.stdout.splitlines()
    assert stored_keys(store) == keys


def test_a_replicas_change_is_shown_then_applied(work: Path) -> None:
    store = str(work / "store")
    assert modelyard("apply", "-f", "fleet.yaml", "--store", store, cwd=work).returncode == 0
    (work / "fleet.yaml").write_text(FLEET.replace("replicas: 2", "replicas: 3, max_replicas: 5"))
    dry = modelyard("apply", "-f", "fleet.yaml", "--dry-run", "--store", store, cwd=work)
    assert dry.stdout.splitlines()[0] == "~ model double@2: replicas 2 -> 3, max replicas 0 -> 5"
    done = modelyard("apply", "-f", "fleet.yaml", "--store", store, cwd=work)
    assert done.returncode == 0, done.stderr
    model = json.loads(stored_keys(store)[registry.MODELS + "double@2"])
    assert (model["replicas"], model["max_replicas"]) == (3, 5)


def test_what_the_file_leaves_out_is_kept_unless_pruned(work: Path) -> None:
    store = str(work / "store")
    assert modelyard("apply", "-f", "fleet.yaml", "--store", store, cwd=work).returncode == 0
    (work / "small.yaml").write_text("models:\n  - {name: double, version: 1, archive: double}\n")
    kept = modelyard("apply", "-f", "small.yaml", "--store", store, cwd=work)
    assert kept.returncode == 0, kept.stderr
    assert "3 registered but not in the file, kept (--prune removes them)" in kept.stderr
    assert len(stored_keys(store)) == 4
    pruned = modelyard("apply", "-f", "small.yaml", "--prune", "--store", store, cwd=work)
    assert pruned.returncode == 0, pruned.stderr
    assert pruned.stdout.splitlines() == [
        "- route double",
        "- pipeline quad@1",
        "- model double@2",
        "applied: 0 added, 0 changed, 3 removed, 1 unchanged",
    ]
    assert set(stored_keys(store)) == {registry.MODELS + "double@1"}


BAD_FILES = [
    ("models: [{name: double, version: 1, archive: double, replicas: -1}]", "models[0].replicas: -1 is less"),
    ("models: [{name: double, version: 1, archive: double, replica: 1}]", "models[0]: Additional properties"),
    ("models: [{name: double, version: 1}]", "models[0]: give archive"),
    (
        "models: [{name: 'bad name', version: 1, archive: double}]",
        "models[0].name: 'bad name' does not match",
    ),
    ("models: [{name: double, version: 1, archive: nowhere}]", "models[0]: nowhere: no such file"),
    ("routes: [{model: double, default: 1}]", "routes[0]: model 'double' is not in the fleet"),
    ("routes: [{model: double, split: {'1': 0}}]", "routes[0].split.1: 0 is less than the minimum of 1"),
    ("pipelines: [{name: p, version: 1, inputs: [], outputs: [], steps: []}]", "pipelines[0]: inputs must"),
    ("models: {name: x", "bad.yaml:2:1: not valid YAML"),
    ("kind: Fleet", "Additional properties are not allowed ('kind' was unexpected)"),
    (
        "models: [{name: d, version: 1, replicas: 1, replicas: 2}]",
        "not valid YAML: key 'replicas' is given twice",
    ),
]


@pytest.mark.parametrize(("text", "expected"), BAD_FILES)
def test_a_bad_field_is_one_line_naming_its_path_and_exit_2(work: Path, text: str, expected: str) -> None:
    (work / "bad.yaml").write_text(text + "\n")
    result = modelyard("apply", "-f", "bad.yaml", "--store", str(work / "store"), cwd=work)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: bad.yaml"), result.stderr
    assert expected in lines[0]
    assert result.stdout == ""


def test_an_error_in_a_later_section_writes_nothing(work: Path) -> None:
    store = str(work / "store")
    (work / "fleet.yaml").write_text(
        FLEET.replace("model: double@1, inputs: {INPUT: Y}", "model: double@9, inputs: {INPUT: Y}")
    )
    result = modelyard("apply", "-f", "fleet.yaml", "--store", store, cwd=work)
    assert result.returncode == 2
    assert "pipelines[0]: step 'b': model 'double' has no version '9'" in result.stderr
    assert stored_keys(store) == {}  # the two good models before it were not registered


def test_changing_an_immutable_version_is_refused_with_exit_3(work: Path) -> None:
    store = str(work / "store")
    assert modelyard("apply", "-f", "fleet.yaml", "--store", store, cwd=work).returncode == 0
    before = stored_keys(store)
    (work / "fleet.yaml").write_text(FLEET.replace("tenants: [acme]", "tenants: [acme, beta]"))
    result = modelyard("apply", "-f", "fleet.yaml", "--store", store, cwd=work)
    assert result.returncode == 3
    assert "models[1]: double@2 is registered with other settings" in result.stderr
    assert stored_keys(store) == before


def test_an_artifact_must_be_the_model_store_s_copy_of_its_hash(work: Path) -> None:
    store = ("--store", str(work / "store"))
    assert modelyard("apply", "-f", "fleet.yaml", *store, cwd=work).returncode == 0
    sha = json.loads(stored_keys(str(work / "store"))[registry.MODELS + "double@1"])["sha256"]
    stored = (work / ".modelyard" / "artifacts" / sha).resolve().as_uri()
    for uri, ok in ((stored, True), ((work / "double").resolve().as_uri(), False)):
        (work / "more.yaml").write_text(
            f"models: [{{name: double, version: 5, artifact: '{uri}', sha256: {sha}}}]"
        )
        result = modelyard("apply", "-f", "more.yaml", "--dry-run", *store, cwd=work)
        assert (result.returncode == 0) == ok, result.stderr
        if not ok:
            assert (
                f"models[0]: artifact: the model store holds sha256 {sha[:12]}… at {stored}" in result.stderr
            )


def test_a_misspelt_tenant_limit_is_refused_naming_it_and_nothing_is_written(work: Path) -> None:
    (work / "fleet.yaml").write_text(FLEET + "tenants:\n  - {name: acme, max_in_flight: 8}\n")
    result = modelyard("apply", "-f", "fleet.yaml", "--store", str(work / "store"), cwd=work)
    assert result.returncode == 2
    assert "tenants: acme: unknown field 'max_in_flight'" in result.stderr
    assert stored_keys(str(work / "store")) == {}


def test_tenant_limits_apply_show_and_export_back(work: Path) -> None:
    store = str(work / "store")
    (work / "fleet.yaml").write_text(
        FLEET + "tenants:\n  - {name: acme, max_inflight: 8, rps: 200, burst: 50, priority: high}\n"
    )
    result = modelyard("apply", "-f", "fleet.yaml", "--store", store, cwd=work)
    assert result.returncode == 0, result.stderr
    shown = json.loads(modelyard("tenants", "show", "acme", "-o", "json", "--store", store, cwd=work).stdout)
    assert json.dumps(shown).count("200") >= 1 and "high" in json.dumps(shown)
    exported = modelyard("export", "--store", store, cwd=work).stdout
    (work / "again.yaml").write_text(exported)
    again = modelyard("apply", "-f", "again.yaml", "--dry-run", "--store", store, cwd=work)
    assert again.returncode == 0, again.stderr
    assert "tenant" not in again.stdout  # exported limits apply as no change


def test_apply_and_export_as_users_run_them(work: Path) -> None:
    """The whole process, as a shell runs it: the numbers go to the report (-s shows them)."""
    store = str(work / "store")
    timings = {}
    for name, args in (
        ("apply (4 new)", ("apply", "-f", "fleet.yaml", "--store", store)),
        ("apply (no changes)", ("apply", "-f", "fleet.yaml", "--store", store)),
        ("export", ("export", "--store", store)),
    ):
        start = time.perf_counter()
        result = modelyard(*args, cwd=work)
        timings[name] = time.perf_counter() - start
        assert result.returncode == 0, result.stderr
    print(" ".join(f"{name}: {seconds:.2f} s;" for name, seconds in timings.items()))
    assert max(timings.values()) < 10  # a loaded 2-core machine; typically well under 1.5 s


# -- the library: failures a command line cannot provoke -------------------------------------------------


class FailingStore(Store):
    """Delegates to a real store; `apply` calls from number `fail_from` on raise StoreError."""

    def __init__(self, inner: Store, fail_from: int) -> None:
        self.inner, self.fail_from, self.calls = inner, fail_from, 0

    async def get(self, key: str) -> Any:
        return await self.inner.get(key)

    async def get_prefix(self, prefix: str) -> Any:
        return await self.inner.get_prefix(prefix)

    async def put(self, key: str, value: bytes, *, lease: Any = None) -> int:
        return await self.inner.put(key, value, lease=lease)

    async def delete(self, key: str) -> bool:
        return await self.inner.delete(key)

    async def apply(
        self,
        puts: Mapping[str, bytes],
        deletes: Sequence[str] = (),
        *,
        if_equal: tuple[str, bytes | None] | None = None,
        lease: Any = None,
    ) -> bool:
        self.calls += 1
        if self.calls >= self.fail_from:
            raise StoreError("etcd at 127.0.0.1:2379 is unreachable (injected)")
        return await self.inner.apply(puts, deletes, if_equal=if_equal, lease=lease)

    def watch_prefix(self, prefix: str, start_revision: int) -> Any:
        return self.inner.watch_prefix(prefix, start_revision)

    async def grant_lease(self, ttl_s: float) -> Any:
        return await self.inner.grant_lease(ttl_s)

    async def close(self) -> None:
        await self.inner.close()


def many_models(model_dir: Path, artifacts: LocalModelStore, count: int) -> FleetSpec:
    """`count` versions of one stored artifact: more changes than one transaction holds."""
    from modelyard.catalog.modelstore import checked

    with checked(model_dir) as artifact:
        uri = artifacts.put(artifact)
        sha = artifact.sha256
    return FleetSpec(
        models=tuple(
            ModelEntry(f"models[{i}]", "m", str(i + 1), artifact=uri, sha256=sha, memory_bytes=4)
            for i in range(count)
        )
    )


def test_a_store_failing_mid_way_through_a_large_apply_is_undone(
    tmp_path: Path, model_dir: Path, store_url: str
) -> None:
    artifacts = LocalModelStore(tmp_path / "artifacts")
    spec = many_models(model_dir, artifacts, 3 * MAX_TXN_OPS)
    url = store_url

    async def run() -> None:
        async with open_store(url) as real:
            plan = await fleet_apply.plan(real, spec, artifacts)
            assert len(plan.changes) == 3 * MAX_TXN_OPS
            # staging mark, batch 1, batch 2 written; batch 3 fails; the undo runs on the real store
            flaky = FailingStore(real, fail_from=4)
            original_apply = flaky.apply

            async def fail_once(*args: Any, **kwargs: Any) -> bool:
                if flaky.calls == 3:
                    flaky.calls += 1
                    raise StoreError("etcd at 127.0.0.1:2379 is unreachable (injected)")
                if flaky.calls > 3:
                    return await real.apply(*args, **kwargs)
                return await original_apply(*args, **kwargs)

            flaky.apply = fail_once  # type: ignore[method-assign]
            with pytest.raises(StoreError, match="the 198 changes written were undone"):
                await fleet_apply.write(flaky, plan)
            items, _ = await real.get_prefix(registry.ROOT)
            assert items == []  # every model written was removed again, and the marker too

    asyncio.run(run())


def test_an_apply_interrupted_for_good_is_finished_by_the_next(
    tmp_path: Path, model_dir: Path, store_url: str
) -> None:
    artifacts = LocalModelStore(tmp_path / "artifacts")
    spec = many_models(model_dir, artifacts, 2 * MAX_TXN_OPS)
    url = store_url

    async def run() -> None:
        async with open_store(url) as real:
            plan = await fleet_apply.plan(real, spec, artifacts)
            with pytest.raises(StoreError, match="could not undo them; run apply again"):
                await fleet_apply.write(FailingStore(real, fail_from=3), plan)
            again = await fleet_apply.plan(real, spec, artifacts)
            assert fleet_apply.staging_note(again) is not None
            assert 0 < len(again.changes) < 2 * MAX_TXN_OPS  # the first batch is there already
            await fleet_apply.write(real, again)
            assert not (await fleet_apply.plan(real, spec, artifacts)).changes

    asyncio.run(run())


def test_of_two_applies_planned_at_once_the_second_writes_nothing(
    tmp_path: Path, model_dir: Path, store_url: str
) -> None:
    artifacts = LocalModelStore(tmp_path / "artifacts")
    one = many_models(model_dir, artifacts, 2)
    other = FleetSpec(models=(dataclasses.replace(one.models[0], name="n"),))

    async def run() -> None:
        async with open_store(store_url) as store:
            first = await fleet_apply.plan(store, one, artifacts)
            second = await fleet_apply.plan(store, other, artifacts)
            await fleet_apply.write(store, first)
            with pytest.raises(StoreError, match="another apply wrote first"):
                await fleet_apply.write(store, second)
            items, _ = await store.get_prefix(registry.MODELS)
            assert [i.key for i in items] == [registry.MODELS + "m@1", registry.MODELS + "m@2"]

    asyncio.run(run())


# -- hypothesis: apply(export()) changes nothing, for any fleet -----------------------------------------

VERSIONS = st.sampled_from(["1", "2", "3", "10", "beta"])
TENANTS = st.lists(st.sampled_from(["acme", "beta", "gamma"]), unique=True, max_size=2)


@st.composite
def fleets(draw: st.DrawFn) -> dict[str, Any]:
    models = []
    for name in draw(st.lists(st.sampled_from(["a", "b", "c"]), unique=True, max_size=3)):
        for version in draw(st.lists(VERSIONS, unique=True, min_size=1, max_size=3)):
            replicas = draw(st.integers(0, 3))
            entry: dict[str, Any] = {"name": name, "version": version, "archive": "double"}
            entry["replicas"] = replicas
            if draw(st.booleans()):
                entry["max_replicas"] = replicas + draw(st.integers(0, 3))
            if tenants := draw(TENANTS):
                entry["tenants"] = tenants
            entry["kind"] = draw(st.sampled_from(["cpu", "gpu", "any"]))
            models.append(entry)
    routes = []
    names = sorted({m["name"] for m in models})
    for name in draw(st.lists(st.sampled_from(names), unique=True)) if names else []:
        versions = sorted(m["version"] for m in models if m["name"] == name)
        rule: dict[str, Any] = {"model": name}
        if draw(st.booleans()):
            rule["default"] = draw(st.sampled_from(versions))
        pins = draw(st.dictionaries(st.sampled_from(["acme", "beta"]), st.sampled_from(versions), max_size=2))
        if pins:
            rule["pins"] = pins
        split = draw(st.dictionaries(st.sampled_from(versions), st.integers(1, 100), max_size=2))
        if split:
            rule["split"] = split
        routes.append(rule)
    pipelines = []
    if models and draw(st.booleans()):
        model = draw(st.sampled_from(models))
        step = {"name": "s", "model": f"{model['name']}@{model['version']}", "inputs": {"INPUT": "X"}}
        pipelines.append(
            {
                "name": "pipe",
                "version": draw(VERSIONS),
                "tenants": draw(TENANTS),
                "inputs": [{"name": "X", "datatype": "FP32", "shape": [-1]}],
                "outputs": [{"name": "Y", "datatype": "FP32", "shape": [-1]}],
                "steps": [{**step, "outputs": {"OUTPUT": "Y"}}],
            }
        )
    return {"models": models, "pipelines": pipelines, "routes": routes}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fleet=fleets())
def test_apply_of_export_changes_nothing_for_any_fleet(
    fleet: dict[str, Any], model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    work = tmp_path_factory.mktemp("fleet")
    (work / "double").symlink_to(model_dir)
    artifacts = LocalModelStore(work / "artifacts")

    async def run() -> None:
        async with open_store(str(work / "store")) as store:
            spec = parse_data(fleet, "fleet.yaml", work)
            plan = await fleet_apply.plan(store, spec, artifacts)
            await fleet_apply.write(store, plan)
            assert not (await fleet_apply.plan(store, spec, artifacts)).changes  # idempotent
            exported, skipped = await fleet_apply.export(store)
            assert skipped == 0
            # the export says what the file said
            assert len(exported["models"]) == len(fleet["models"])
            assert len(exported["routes"]) == len(fleet["routes"])
            assert len(exported["pipelines"]) == len(fleet["pipelines"])
            text = yaml.safe_dump(exported, sort_keys=False)
            again = await fleet_apply.plan(store, parse_data(yaml.safe_load(text), "export", work), artifacts)
            listed = len(fleet["models"]) + len(fleet["pipelines"]) + len(fleet["routes"])
            assert not again.changes and again.unchanged == listed
            assert (await fleet_apply.export(store))[0] == exported

    asyncio.run(run())


# -- the tenant-limits hook: what the tenant-limits work plugs in ---------------------------------------

TENANTS_PREFIX = registry.ROOT + "tenants/"


def limits_section() -> fleet_apply.Section:
    """A stand-in for tenant limits: one key per tenant holding its limits as JSON."""

    def to_keys(entries: list[dict[str, Any]]) -> dict[str, bytes]:
        keys = {}
        for entry in entries:
            if not isinstance(entry.get("max_in_flight"), int):
                raise ValueError(f"{entry['name']}: max_in_flight must be an integer")
            keys[TENANTS_PREFIX + entry["name"]] = json.dumps(entry, sort_keys=True).encode()
        return keys

    def to_entries(stored: dict[str, bytes]) -> list[dict[str, Any]]:
        return [json.loads(value) for _, value in sorted(stored.items())]

    return fleet_apply.Section(TENANTS_PREFIX, to_keys, to_entries)


def test_tenant_limits_join_the_fleet_once_the_hook_returns_a_section(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fleet_apply, "tenant_limits_section", limits_section)
    artifacts = LocalModelStore(tmp_path / "artifacts")
    wanted = {"tenants": [{"name": "acme", "max_in_flight": 8}, {"name": "beta", "max_in_flight": 2}]}

    async def run() -> None:
        async with open_store(str(tmp_path / "store")) as store:
            plan = await fleet_apply.plan(store, parse_data(wanted, "fleet.yaml", tmp_path), artifacts)
            assert [c.line() for c in plan.ordered()] == ["+ tenant acme", "+ tenant beta"]
            await fleet_apply.write(store, plan)
            exported, _ = await fleet_apply.export(store)
            assert exported["tenants"] == wanted["tenants"]
            again = await fleet_apply.plan(store, parse_data(exported, "export", tmp_path), artifacts)
            assert not again.changes and again.unchanged == 2
            fewer = parse_data({"tenants": [{"name": "acme", "max_in_flight": 4}]}, "fleet.yaml", tmp_path)
            kept = await fleet_apply.plan(store, fewer, artifacts)
            assert [c.line() for c in kept.ordered()] == ["~ tenant acme"] and kept.kept == ["tenant beta"]
            pruned = await fleet_apply.plan(store, fewer, artifacts, prune=True)
            assert [c.line() for c in pruned.ordered()] == ["~ tenant acme", "- tenant beta"]
            bad = parse_data({"tenants": [{"name": "acme", "max_in_flight": "lots"}]}, "fleet.yaml", tmp_path)
            with pytest.raises(fleet_apply.FleetApplyError, match="tenants: acme: max_in_flight must be"):
                await fleet_apply.plan(store, bad, artifacts)

    asyncio.run(run())


def test_a_version_whose_registration_does_not_parse_is_not_overwritten(
    tmp_path: Path, model_dir: Path
) -> None:
    artifacts = LocalModelStore(tmp_path / "artifacts")
    spec = many_models(model_dir, artifacts, 1)

    async def run() -> None:
        async with open_store(str(tmp_path / "store")) as store:
            await store.put(registry.MODELS + "m@1", b"{not json")
            with pytest.raises(
                fleet_apply.FleetConflict, match="m@1 is registered, but its registration does"
            ):
                await fleet_apply.plan(store, spec, artifacts)
            assert (await store.get(registry.MODELS + "m@1")).value == b"{not json"  # type: ignore[union-attr]

    asyncio.run(run())
