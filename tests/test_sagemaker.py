"""SageMaker multi-model containers (issue 17): AWS's multi-model-server with sagemaker-inference, real.

One real MMS process is shared by the module's container tests; the fleet tests start their own fleet
(Triton, our container and SageMaker containers, agents, controller, router) once per module.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backends.sagemaker import container_model_name, parse_container_name
from placement.controller import incremental_changes
from placement.model import Container, CopyState, ModelVersion
from placement.registry import Fleet

_NAMES = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,20}", fullmatch=True)

# -- pure: names, placement -----------------------------------------------------------------------------


@given(_NAMES, _NAMES)
def test_container_names_read_back_and_never_collide(name: str, version: str) -> None:
    spelled = container_model_name(name, version)
    assert parse_container_name(spelled) == (name, version)
    assert "@" not in spelled and all(c.isalnum() or c in "_.-" for c in spelled)


def test_container_names_of_different_versions_differ() -> None:
    # The pairs a naive `name_version` join would confuse.
    pairs = [("a_b", "1"), ("a", "b_1"), ("a_", "1"), ("a", "_1")]
    spelled = {container_model_name(n, v) for n, v in pairs}
    assert len(spelled) == len(pairs)


@pytest.mark.parametrize("foreign", ["model", "x_", "_v1", "a_b"])
def test_names_not_ours_are_not_read_as_versions(foreign: str) -> None:
    assert parse_container_name(foreign) is None


def _sagemaker_fleet(states: dict[tuple[str, str], CopyState]) -> Fleet:
    gib = 1024**3
    containers = [
        Container(f"sm-{i}", f"127.0.0.1:{20000 + i}", memory_bytes=4 * gib, backend="sagemaker")
        for i in range(2)
    ]
    models = [
        ModelVersion("big", "1", backend="sagemaker", memory_bytes=gib),
        ModelVersion("small", "1", backend="sagemaker", memory_bytes=gib),
        ModelVersion("new", "1", backend="sagemaker", memory_bytes=gib),
    ]
    return Fleet.of(
        models=models,
        containers=containers,
        assignments={"big@1": ["sm-0"], "small@1": ["sm-0"]},
        states=states,
    )


def test_a_copy_refused_for_memory_moves_and_its_container_counts_as_full() -> None:
    refused = CopyState("failed", message="HTTP 507", container_full=True)
    fleet = _sagemaker_fleet({("sm-0", "big@1"): refused, ("sm-0", "small@1"): CopyState("ready")})
    assert fleet.full_containers() == {"sm-0"}
    changes, unplaced = incremental_changes(fleet, ["big@1", "small@1", "new@1"])
    assert changes["big@1"] == ("sm-1",)  # moved off the container that said 507
    assert "small@1" not in changes  # its ready copy on the full container stays
    assert changes["new@1"] == ("sm-1",)  # sm-0 has 2 GiB "free" by the books, but said it is full
    assert not unplaced


def test_a_plain_failed_load_does_not_make_a_container_full() -> None:
    failed = CopyState("failed", message="HTTP 500: model_fn raised")
    fleet = _sagemaker_fleet({("sm-0", "big@1"): failed})
    assert fleet.full_containers() == set()
    changes, _ = incremental_changes(fleet, ["big@1", "new@1"])
    assert "big@1" not in changes  # stays, and its agent retries with backoff


def test_full_marks_go_when_the_failed_state_goes() -> None:
    refused = CopyState("failed", message="HTTP 507", container_full=True)
    fleet = _sagemaker_fleet({("sm-0", "big@1"): refused})
    fleet.apply(_delete_state("sm-0", "big@1"))
    assert fleet.full_containers() == set() and not fleet.full_copies


def _delete_state(cid: str, key: str):  # type: ignore[no-untyped-def]
    from placement.registry import state_key
    from placement.store.base import Event

    return Event("delete", state_key(cid, key), b"", 10_000)
