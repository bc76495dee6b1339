"""The zero-hop client's route cache: answers kept between updates, never past one."""

from __future__ import annotations

from modelyard.client import MAX_KEPT_PICKS, RouteCache
from modelyard.v1 import router_pb2

Version = tuple[str, tuple[str, ...], tuple[str, ...]]


def update(*versions: Version, snapshot: bool = False, **rule: object) -> router_pb2.RouteUpdate:
    """One model `m`: (version, tenants, ready addresses) per version; a rule from keyword arguments."""
    entry = router_pb2.ModelRoutes(model_name="m")
    for version, tenants, ready in versions:
        copies = [router_pb2.Copy(address=a) for a in ready]
        entry.versions.add(version=version, tenants=tenants, ready=copies)
    if rule:
        entry.has_rule = True
        entry.rule.CopyFrom(router_pb2.RouteRule(**rule))  # type: ignore[arg-type]
    return router_pb2.RouteUpdate(snapshot=snapshot, models=[entry])


def test_a_pick_follows_every_update() -> None:
    cache = RouteCache()
    cache.apply(update(("1", (), ("c1:1",)), snapshot=True))
    assert cache.pick("m", "", "acme", "") == ("1", "c1:1")
    cache.apply(update(("1", (), ("c1:1",)), ("2", ("acme",), ("c2:1",))))  # a private v2
    assert cache.pick("m", "", "acme", "") == ("2", "c2:1")
    assert cache.pick("m", "", "other", "") == ("1", "c1:1")
    cache.apply(update(("1", (), ()), ("2", ("acme",), ("c2:1",))))  # v1's copy went away
    assert cache.pick("m", "", "other", "") is None  # the router takes the call
    cache.apply(update(("1", (), ("c3:1",)), ("2", ("acme",), ("c2:1",)), default_version="1"))
    assert cache.pick("m", "", "acme", "") == ("1", "c3:1")


def test_a_weighted_split_is_drawn_per_call() -> None:
    cache = RouteCache()
    cache.apply(update(("1", (), ("c1:1",)), ("2", (), ("c2:1",)), snapshot=True, weights={"1": 1, "2": 1}))
    assert {cache.pick("m", "", None, "")[0] for _ in range(200)} == {"1", "2"}  # type: ignore[index]


def test_kept_picks_stay_bounded_whatever_tenants_callers_name() -> None:
    cache = RouteCache()
    cache.apply(update(("1", (), ("c1:1",)), snapshot=True))
    for i in range(MAX_KEPT_PICKS * 2 + 3):
        assert cache.pick("m", "", f"t{i}", "") == ("1", "c1:1")
    assert len(cache._picked) <= MAX_KEPT_PICKS
