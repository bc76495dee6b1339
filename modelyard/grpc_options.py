"""The gRPC channel and server options every modelyard process uses, defined once.

Servers (router, our container) cap one message at a limit: gRPC refuses a larger one with
RESOURCE_EXHAUSTED naming the limit before buffering it, so one caller cannot exhaust a process's memory.
Channels from the router to containers carry whatever the container accepts (-1: no limit of their own).
"""

from __future__ import annotations

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024**2
NO_LIMIT = -1
# A container that goes silent (its host cut off: packets dropped, no reset) leaves the calls sent to it
# waiting for their deadline unless the router asks: with calls in flight it pings every KEEPALIVE_MS and
# closes the connection when a ping goes unanswered for KEEPALIVE_TIMEOUT_MS, so those calls fail over
# (UNAVAILABLE) to another copy well within a 10-s deadline.
KEEPALIVE_MS = 1000
KEEPALIVE_TIMEOUT_MS = 2000
# What the containers accept: gRPC's default (one ping per 5 minutes without data, then GOAWAY) would end
# the connection of a router pinging during a long call.
MIN_PING_INTERVAL_MS = 500


def message_size_options(max_message_bytes: int) -> tuple[tuple[str, int], ...]:
    """Send and receive limits for one message, in bytes (NO_LIMIT: none)."""
    return (
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    )


def container_channel_options() -> tuple[tuple[str, int], ...]:
    """A router's channel to a container: no size limit of its own, reconnects within a second, and pings
    while calls are in flight.

    gRPC's default reconnect backoff grows to 120 s, which a call waiting for a restarted container (same
    address) would sit out."""
    return (
        *message_size_options(NO_LIMIT),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
        *keepalive_options(KEEPALIVE_MS, KEEPALIVE_TIMEOUT_MS),
    )


def keepalive_options(time_ms: int, timeout_ms: int) -> tuple[tuple[str, int], ...]:
    """A channel that pings its server every `time_ms` while calls are in flight and closes the connection
    (its calls fail UNAVAILABLE) when a ping is unanswered for `timeout_ms`. On gRPC 1.85 the wait for an
    answer is `grpc.http2.ping_timeout_ms` (default one minute): without it `keepalive_timeout_ms` alone
    let a call to a stopped server sit out its whole deadline (measured)."""
    return (
        ("grpc.keepalive_time_ms", time_ms),
        ("grpc.keepalive_timeout_ms", timeout_ms),
        ("grpc.http2.ping_timeout_ms", timeout_ms),
        ("grpc.http2.max_pings_without_data", 0),
    )


def container_server_options() -> tuple[tuple[str, int], ...]:
    """A container's server: accepts the router's keepalive pings (`container_channel_options`)."""
    return (
        ("grpc.http2.min_recv_ping_interval_without_data_ms", MIN_PING_INTERVAL_MS),
        ("grpc.http2.max_ping_strikes", 0),
    )
