"""Call counts per model version, reported to the store for the placement controller (copies follow load).

The call path pays one dict increment and one clock read (`count`); every `period_s` a task turns the
counts into rates and writes them, with the time since each one's last call, as one small key under this
router's lease (`/modelyard/rates/{router id}`, format in placement/rates.py). Only models called in the
period appear (the controller remembers last calls), so a report's size follows the models with traffic,
not the fleet's. When calls stop, the report is deleted with its lease (no report counts as no calls), and
an idle router writes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

from modelyard.placement.rates import RATES, RateReport
from modelyard.placement.store import Lease, Store, StoreError, stop_leased

log = logging.getLogger(__name__)

DEFAULT_PERIOD_S = 5.0  # seconds between reports ($MODELYARD_RATE_PERIOD_S: tests and quick demos use less)


class RateCounter:
    def __init__(self, store: Store, *, period_s: float | None = None, router_id: str = "") -> None:
        self.store = store
        self.period_s = period_s or DEFAULT_PERIOD_S
        self.router_id = router_id or f"{socket.gethostname()}-{os.getpid()}-{id(self):x}"
        self.key = RATES + self.router_id
        self.reports = 0  # reports written, for tests
        self._counts: dict[str, int] = {}
        self._last_call: dict[str, float] = {}  # model key -> monotonic time of its last call
        self._task: asyncio.Task[None] | None = None
        self._lease: Lease | None = None

    def count(self, key: str) -> None:
        """One call for model version `key` (on the call path: keep it a dict write)."""
        counts = self._counts
        counts[key] = counts.get(key, 0) + 1
        self._last_call[key] = time.monotonic()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._report_forever(), name="router-rates")

    async def stop(self) -> None:
        (task, self._task), (lease, self._lease) = (self._task, None), (self._lease, None)
        await stop_leased(task, lease)

    def report(self, elapsed_s: float) -> RateReport:
        """The rates of the models called since the last report (counts reset)."""
        counts, self._counts = self._counts, {}
        last_call, self._last_call = self._last_call, {}
        now = time.monotonic()
        elapsed_s = max(elapsed_s, 1e-3)
        return RateReport(
            self.router_id,
            time.time(),
            self.period_s,
            {key: round(n / elapsed_s, 3) for key, n in counts.items()},
            {key: round(now - t, 3) for key, t in last_call.items()},
        )

    async def _report_forever(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(self.period_s)
            now = time.monotonic()
            report = self.report(now - last)
            last = now
            try:
                if report.rates:
                    await self._write(report)
                elif self._lease is not None:
                    # Calls stopped: the last report goes with its lease (no report counts as no calls), and
                    # an idle router writes nothing more, waking no store watcher, until calls come again.
                    lease, self._lease = self._lease, None
                    await lease.revoke()
            except StoreError as exc:  # the store is down, or the lease lapsed: the next period tries again
                log.info("router rates: cannot report (%s)", exc)
                self._lease = None

    async def _write(self, report: RateReport) -> None:
        if self._lease is None:
            self._lease = await self.store.grant_lease(max(10.0, 3 * self.period_s))
        else:
            await self._lease.refresh()
        await self.store.put(self.key, report.to_json(), lease=self._lease)
        self.reports += 1
