"""The placement controller: keeps the shard map matched to the fleet without an operator.

It follows the store and, shortly after registrations or the set of live containers change, runs the same
rebalance an operator would (`modelyard placement rebalance`): new models get placed, copies on containers
whose lease expired are re-placed, and new containers fill up — all make-before-break, under the rebalance
lock, so a manual rebalance and the controller never apply at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket

from placement import registry
from placement.rebalance import apply_rebalance, plan_rebalance
from placement.registry import Fleet
from placement.store import CompactedError, Store, StoreError

log = logging.getLogger(__name__)

_TRIGGERS = (registry.MODELS, registry.CONTAINERS)


class PlacementController:
    def __init__(
        self, store: Store, *, debounce_s: float = 0.5, ready_timeout_s: float = 120.0, retry_s: float = 5.0
    ) -> None:
        self.store = store
        self.debounce_s = debounce_s
        self.ready_timeout_s = ready_timeout_s
        self.retry_s = retry_s
        self.holder = f"controller {socket.gethostname()}:{os.getpid()}"
        self.rounds = 0  # rebalances applied, for tests and metrics
        self._wake = asyncio.Event()

    async def run(self) -> None:
        follower = asyncio.create_task(self._follow())
        try:
            while True:
                await self._wake.wait()
                await asyncio.sleep(self.debounce_s)  # let a burst of registrations settle into one plan
                self._wake.clear()
                try:
                    await self.reconcile()
                except StoreError as exc:  # includes a rebalance someone else holds, or a concurrent plan
                    log.info("placement controller: %s; retrying in %.0f s", exc, self.retry_s)
                    await asyncio.sleep(self.retry_s)
                    self._wake.set()
        finally:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower

    async def reconcile(self) -> bool:
        """One rebalance if the fleet needs one; True when it applied moves."""
        fleet = await registry.load_fleet(self.store)
        proposal = plan_rebalance(fleet)
        if not proposal.moves:
            return False
        log.info("placement controller: applying %d moves", len(proposal.moves))
        result = await apply_rebalance(
            self.store, proposal, holder=self.holder, ready_timeout_s=self.ready_timeout_s
        )
        self.rounds += 1
        if result.failed:
            sample = ", ".join(
                f"{key} on {cid}: {why}" for (key, cid), why in sorted(result.failed.items())[:5]
            )
            log.warning(
                "placement controller: %d new copies did not become ready (old copies kept), e.g. %s; "
                "retrying in %.0f s",
                len(result.failed),
                sample,
                self.retry_s,
            )
            asyncio.get_running_loop().call_later(self.retry_s, self._wake.set)
        return True

    async def _follow(self) -> None:
        while True:
            try:
                fleet: Fleet = await registry.load_fleet(self.store)
                self._wake.set()
                async for events in self.store.watch_prefix(registry.ROOT, fleet.revision + 1):
                    if any(e.key.startswith(_TRIGGERS) for e in events):
                        self._wake.set()
            except CompactedError:
                continue
            except StoreError as exc:
                log.warning("placement controller: store watch failed (%s); retrying", exc)
                await asyncio.sleep(1.0)
