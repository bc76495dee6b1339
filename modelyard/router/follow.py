"""Keeps a RoutingTable current through the one store follower (placement/follow.py).

If the store becomes unreachable the table keeps its last contents and `degraded` is set; when the store
comes back (or the watch's history was compacted) the table is reloaded from a fresh snapshot.
"""

from __future__ import annotations

from modelyard.placement.follow import StoreFollower
from modelyard.placement.store import Store
from modelyard.router.table import RoutingTable


class TableFollower(StoreFollower):
    """A follower of the router's own, feeding its routing table."""

    def __init__(self, store: Store, table: RoutingTable, *, retry_s: float = 1.0) -> None:
        super().__init__(store, name="routing table", retry_s=retry_s)
        self.table = table
        self.listen(table.on_change)
