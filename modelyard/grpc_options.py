"""The gRPC channel and server options every modelyard process uses, defined once.

Servers (router, our container) cap one message at a limit: gRPC refuses a larger one with
RESOURCE_EXHAUSTED naming the limit before buffering it, so one caller cannot exhaust a process's memory.
Channels from the router to containers carry whatever the container accepts (-1: no limit of their own).
"""

from __future__ import annotations

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024**2
NO_LIMIT = -1


def message_size_options(max_message_bytes: int) -> tuple[tuple[str, int], ...]:
    """Send and receive limits for one message, in bytes (NO_LIMIT: none)."""
    return (
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    )


def container_channel_options() -> tuple[tuple[str, int], ...]:
    """A router's channel to a container: no size limit of its own, and reconnects within a second.

    gRPC's default reconnect backoff grows to 120 s, which a call waiting for a restarted container (same
    address) would sit out."""
    return (
        *message_size_options(NO_LIMIT),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
    )
