"""Channels to containers, one per address, and the copy choice (power of two choices by calls in flight).

Requests and responses cross the router as serialized bytes (no tensor decoding). The forwarding itself,
and its one retry on another copy when a call provably did not run, is in routing.py.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import grpc
import grpc.aio

from modelyard.grpc_options import container_channel_options
from modelyard.placement.model import Container

CHANNEL_OPTIONS = container_channel_options()


class ContainerChannels:
    """One channel per container address, with outstanding-call counts for the copy choice."""

    def __init__(self, credentials: grpc.ChannelCredentials | None = None) -> None:
        self.credentials = credentials  # TLS to containers when set
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._unary: dict[tuple[str, str], grpc.aio.UnaryUnaryMultiCallable] = {}
        self.outstanding: dict[str, int] = {}
        # Addresses whose last call failed UNAVAILABLE (refused, reset, or a keepalive ping unanswered):
        # not chosen while another copy is usable, until their channel is connected again.
        self.suspect: set[str] = set()

    def unary(self, address: str, method: str) -> grpc.aio.UnaryUnaryMultiCallable:
        call = self._unary.get((address, method))
        if call is None:
            call = self.channel(address).unary_unary(method)  # no serializers: bytes in, bytes out
            self._unary[(address, method)] = call
        return call

    def channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            if self.credentials is not None:
                channel = grpc.aio.secure_channel(address, self.credentials, options=CHANNEL_OPTIONS)
            else:
                channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
            self._channels[address] = channel
        return channel

    def stream(self, address: str, method: str) -> grpc.aio.StreamStreamMultiCallable:
        return self.channel(address).stream_stream(method)  # bytes in, bytes out

    def usable(self, address: str) -> bool:
        """Whether calls to `address` can be expected to get through now: its channel is connected, or
        idle without a failure since it last was. A channel connecting (again) may wait out a call's whole
        deadline when its host went silent, so it is not."""
        channel = self._channels.get(address)
        if channel is None:
            return True
        state = channel.get_state()
        if state == grpc.ChannelConnectivity.READY:
            self.suspect.discard(address)
            return True
        return state == grpc.ChannelConnectivity.IDLE and address not in self.suspect

    def pick(self, copies: Sequence[Container], exclude: str | None = None) -> Container | None:
        """Power of two choices: of two random copies, the one with fewer calls in flight; copies whose
        container is not `usable` only when no other is."""
        candidates = [c for c in copies if c.id != exclude] if exclude else copies
        if not candidates:
            return None
        if len(candidates) == 1:
            return candidates[0]
        a, b = random.sample(candidates, 2)
        usable = self.usable
        if not (usable(a.address) and usable(b.address)):  # rare: only then look at every copy
            healthy = [c for c in candidates if usable(c.address)]
            if len(healthy) == 1:
                return healthy[0]
            if healthy:
                a, b = random.sample(healthy, 2)
        return a if self.outstanding.get(a.id, 0) <= self.outstanding.get(b.id, 0) else b

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        self._unary.clear()
