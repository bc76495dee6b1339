"""The Fleet's indexes (copies per container, bytes used per container, versions per name) always equal what a
full scan of its values gives, whatever order store events arrive in."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from modelyard.placement.model import CopyState, ModelVersion
from modelyard.placement.registry import ASSIGN, GENERATION, MODELS, Assignment, Fleet, state_key
from modelyard.placement.store.base import Event

MODELS_ = ["a@1", "a@2", "b@1", "c@1"]
CONTAINERS = ["c1", "c2", "c3"]

model_event = st.builds(
    lambda key, memory, delete: ("model", key, memory, delete),
    st.sampled_from(MODELS_),
    st.integers(0, 1000),
    st.booleans(),
)
assign_event = st.builds(
    lambda key, ids, gen, delete: ("assign", key, ids, gen, delete),
    st.sampled_from(MODELS_),
    st.lists(st.sampled_from(CONTAINERS), max_size=3, unique=True),
    st.integers(0, 3),
    st.booleans(),
)
state_event = st.builds(
    lambda key, cid, measured, delete: ("state", key, cid, measured, delete),
    st.sampled_from(MODELS_),
    st.sampled_from(CONTAINERS),
    st.integers(0, 5000),
    st.booleans(),
)
generation_event = st.builds(lambda gen: ("generation", gen), st.integers(0, 3))


def to_event(spec: tuple, revision: int) -> Event:  # type: ignore[type-arg]
    kind = spec[0]
    if kind == "model":
        _, key, memory, delete = spec
        name, version = key.split("@")
        value = ModelVersion(name, version, memory_bytes=memory).to_json()
        return Event("delete" if delete else "put", MODELS + key, b"" if delete else value, revision)
    if kind == "assign":
        _, key, ids, gen, delete = spec
        value = Assignment(tuple(ids), gen, ()).to_json()
        return Event("delete" if delete else "put", ASSIGN + key, b"" if delete else value, revision)
    if kind == "state":
        _, key, cid, measured, delete = spec
        value = CopyState("ready", measured_bytes=measured).to_json()
        return Event("delete" if delete else "put", state_key(cid, key), b"" if delete else value, revision)
    return Event("put", GENERATION, str(spec[1]).encode(), revision)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(model_event, assign_event, state_event, generation_event), max_size=60))
def test_indexes_match_a_full_scan_after_any_event_sequence(specs: list[tuple]) -> None:  # type: ignore[type-arg]
    fleet = Fleet()
    for revision, spec in enumerate(specs, 1):
        fleet.apply(to_event(spec, revision))
    by_container: dict[str, set[str]] = {}
    used: dict[str, int] = {}
    for key, ids in fleet.assignments.items():
        model = fleet.models.get(key)
        measured = [s.measured_bytes for (_, k), s in fleet.states.items() if k == key]
        cost = max([model.memory_bytes, *measured]) if model else 0
        for cid in ids:
            by_container.setdefault(cid, set()).add(key)
            if cost:
                used[cid] = used.get(cid, 0) + cost
    assert fleet.by_container == by_container
    assert fleet.used == used
    for key, model in fleet.models.items():
        measured = [s.measured_bytes for (_, k), s in fleet.states.items() if k == key]
        assert fleet.budget_bytes(model) == max([model.memory_bytes, *measured])
    assert fleet.by_name == {
        name: {m.version: m for m in fleet.models.values() if m.name == name}
        for name in {m.name for m in fleet.models.values()}
    }
    # Committed assignments: ids for generations up to the committed one, else what they replaced.
    for key, raw in fleet.raw_assignments.items():
        expected = raw.ids if raw.gen <= fleet.generation else raw.prev
        assert fleet.assignments.get(key, ()) == expected
