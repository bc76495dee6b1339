"""Routing decisions on a fleet snapshot: version resolution, tenant visibility, ready copies."""

from __future__ import annotations

import pytest

from modelyard.placement import registry
from modelyard.placement.model import Container, CopyState, ModelVersion, RouteRule
from modelyard.placement.registry import Fleet
from modelyard.placement.store.base import Event
from modelyard.router.errors import ModelNotFound
from modelyard.router.table import MAX_RESOLVED_PER_NAME, RoutingTable


def put(key: str, value: bytes, revision: int = 1) -> Event:
    return Event("put", key, value, revision)


def fleet_with(models: list[ModelVersion], containers: list[Container]) -> Fleet:
    fleet = Fleet()
    for model in models:
        fleet.apply(put(registry.MODELS + model.key, model.to_json()))
    for container in containers:
        fleet.apply(put(registry.CONTAINERS + container.id, container.to_json()))
    return fleet


C1, C2 = Container("c1", "127.0.0.1:1"), Container("c2", "127.0.0.1:2")


def test_default_version_is_the_highest_numeric_one() -> None:
    models = [ModelVersion("m", v) for v in ("2", "10", "9")]
    table = RoutingTable(fleet_with(models, []))
    assert table.resolve("m", "", None).version == "10"
    assert table.resolve("m", "9", None).version == "9"


def test_unknown_model_and_version_raise_not_found_naming_them() -> None:
    table = RoutingTable(fleet_with([ModelVersion("m", "1")], []))
    with pytest.raises(ModelNotFound, match="'nope'"):
        table.resolve("nope", "", None)
    with pytest.raises(ModelNotFound, match="'7'"):
        table.resolve("m", "7", None)


def test_private_versions_are_invisible_to_other_tenants() -> None:
    models = [ModelVersion("m", "1"), ModelVersion("m", "2", tenants=("acme",))]
    table = RoutingTable(fleet_with(models, []))
    assert table.resolve("m", "", "acme").version == "2"
    assert table.resolve("m", "", "other").version == "1"
    assert table.resolve("m", "", None).version == "1"
    with pytest.raises(ModelNotFound):
        table.resolve("m", "2", "other")


def test_only_ready_copies_on_known_containers_are_routable() -> None:
    model = ModelVersion("m", "1")
    table = RoutingTable(fleet_with([model], [C1, C2]))
    table.apply([put(registry.ASSIGN + model.key, b'["c1", "c2", "gone"]')])
    assert table.ready_copies(model.key) == ()
    table.apply([put(registry.state_key("c1", model.key), CopyState("ready").to_json())])
    assert table.ready_copies(model.key) == (C1,)
    table.apply([put(registry.state_key("c2", model.key), CopyState("loading").to_json())])
    table.apply([put(registry.state_key("gone", model.key), CopyState("ready").to_json())])
    assert table.ready_copies(model.key) == (C1,)
    table.apply([put(registry.state_key("c2", model.key), CopyState("ready").to_json())])
    assert table.ready_copies(model.key) == (C1, C2)


def test_events_invalidate_cached_answers() -> None:
    model = ModelVersion("m", "1")
    table = RoutingTable(fleet_with([model], [C1, C2]))
    table.apply(
        [
            put(registry.ASSIGN + model.key, b'["c1", "c2"]'),
            put(registry.state_key("c1", model.key), CopyState("ready").to_json()),
            put(registry.state_key("c2", model.key), CopyState("ready").to_json()),
        ]
    )
    assert table.ready_copies(model.key) == (C1, C2)
    table.apply([Event("delete", registry.CONTAINERS + "c1", b"", 5)])  # lease expired
    assert table.ready_copies(model.key) == (C2,)
    table.apply([put(registry.ASSIGN + model.key, b'["c1"]', 6)])
    assert table.ready_copies(model.key) == ()
    table.apply([put(registry.MODELS + "m@2", ModelVersion("m", "2").to_json(), 7)])
    assert table.resolve("m", "", None).version == "2"


def test_route_rules_pin_tenants_and_change_without_restart() -> None:
    models = [ModelVersion("m", v) for v in ("1", "2", "3")]
    table = RoutingTable(fleet_with(models, []))
    assert table.resolve("m", "", "acme").version == "3"
    rule = RouteRule("m", default_version="2", tenant_versions=(("acme", "1"),))
    table.apply([put(registry.ROUTES + "m", rule.to_json(), 9)])
    assert table.resolve("m", "", "acme").version == "1"
    assert table.resolve("m", "", "other").version == "2"
    assert table.resolve("m", "3", "acme").version == "3"  # an explicit version still wins
    table.apply([Event("delete", registry.ROUTES + "m", b"", 10)])
    assert table.resolve("m", "", "acme").version == "3"


def test_resolved_versions_follow_registrations() -> None:
    """Resolution is kept per (name, version, tenant) on the call path: every registration change of the
    name must drop what was kept."""
    table = RoutingTable(fleet_with([ModelVersion("m", "1")], []))
    assert table.resolve("m", "", "acme").version == "1"
    table.apply([put(registry.MODELS + "m@2", ModelVersion("m", "2").to_json(), 2)])
    assert table.resolve("m", "", "acme").version == "2"
    private = ModelVersion("m", "2", tenants=("acme",))
    table.apply([put(registry.MODELS + "m@2", private.to_json(), 3)])
    assert table.resolve("m", "", "other").version == "1"
    assert table.resolve("m", "", "acme").version == "2"
    table.apply([Event("delete", registry.MODELS + "m@2", b"", 4)])
    assert table.resolve("m", "", "acme").version == "1"
    with pytest.raises(ModelNotFound):
        table.resolve("m", "2", "acme")


def test_a_weighted_split_is_chosen_per_call_not_kept() -> None:
    models = [ModelVersion("m", v) for v in ("1", "2")]
    table = RoutingTable(fleet_with(models, []))
    rule = RouteRule("m", weights=(("1", 1), ("2", 1)))
    table.apply([put(registry.ROUTES + "m", rule.to_json(), 2)])
    chosen = {table.resolve("m", "", None).version for _ in range(200)}
    assert chosen == {"1", "2"}


def test_kept_resolutions_stay_bounded_whatever_tenants_callers_name() -> None:
    table = RoutingTable(fleet_with([ModelVersion("m", "1")], []))
    for i in range(MAX_RESOLVED_PER_NAME * 3):
        assert table.resolve("m", "", f"tenant-{i}").version == "1"
    assert len(table._resolved["m"]) <= MAX_RESOLVED_PER_NAME
