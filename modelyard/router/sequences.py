"""Sticky sequences: every call of one Triton sequence goes to the same copy, whichever router takes it.

A call belongs to a sequence when it carries Triton's `sequence_id` request parameter (the correlation id;
0 or "" is none). Its copy is chosen by rendezvous hashing of the sequence id over the ids of the model's
ready copies: a pure function of what every router reads from the store, so routers agree without
remembering anything, and a copy that goes away moves only its own sequences.

A sequence's state lives in its copy. When that copy dies, the choice moves to another copy that does not
hold the state; the router never lets that pass silently: a call without `sequence_start` that its copy
failed before running (UNAVAILABLE, NOT_FOUND) is not resent elsewhere, and Triton's sequence batcher
refuses a call without the START flag for a sequence it does not know. Both end as ABORTED naming the lost
sequence; the client starts it again (`sequence_start`). A copy added while a sequence runs takes about
1/n of the running sequences the same way (a known limit of choosing without memory).
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from modelyard.errors import ModelyardError
from modelyard.placement.model import Container, ModelVersion
from modelyard.router.wire import WireError, read_sequence_parameters

# Triton's sequence batcher, for a call without START whose sequence it does not hold.
_UNKNOWN_SEQUENCE = re.compile(r"must specify the START flag")


@dataclass(frozen=True)
class SequenceCall:
    """The sequence a call belongs to: its id (as text, ints and strings alike) and whether it starts it."""

    id: str
    start: bool


class SequenceLost(ModelyardError):
    """A call of a sequence whose copy (and state) is gone: the client must start the sequence again."""

    code = grpc.StatusCode.ABORTED


def read_sequence(request: bytes) -> SequenceCall | None:
    """The sequence a serialized ModelInferRequest belongs to, or None. Reads only its `parameters` map
    entries; bytes that do not parse are of no sequence (the container refuses them)."""
    try:
        found = read_sequence_parameters(request)
    except WireError:
        return None
    return None if found is None else SequenceCall(*found)


_MASK_64 = (1 << 64) - 1


@functools.lru_cache(maxsize=65536)
def _digest(text: str) -> int:
    """64 bits of BLAKE2b: the same on every router (Python's own str hash is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def _score(sequence: int, container: int) -> int:
    """splitmix64's finalizer over both digests: a well-mixed score per (sequence, copy) pair."""
    x = sequence ^ container
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK_64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK_64
    return x ^ (x >> 31)


def sticky_copy(sequence_id: str, copies: Sequence[Container]) -> Container | None:
    """The copy a sequence goes to: the highest rendezvous score of (sequence id, copy id)."""
    if not copies:
        return None
    if len(copies) == 1:
        return copies[0]
    sequence = _digest(sequence_id)
    return max(copies, key=lambda c: (_score(sequence, _digest(c.id)), c.id))


def lost_sequence(
    sequence: SequenceCall, model: ModelVersion, copy: str, code: grpc.StatusCode, details: str
) -> SequenceLost | None:
    """The clear failure for a sequence call a copy answered with `code`, or None when the answer stands
    as it is (a call that starts its sequence may go elsewhere; other errors are the model's)."""
    where = f"sequence {sequence.id} of model '{model.name}' version '{model.version}'"
    again = "start it again with sequence_start"
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND) and not sequence.start:
        return SequenceLost(f"{where} is lost: its copy on {copy} is unavailable ({details}); {again}")
    if _UNKNOWN_SEQUENCE.search(details):
        return SequenceLost(
            f"{where} is lost: the copy it maps to now ({copy}) does not hold it (its copy went away, "
            f"it timed out, or it never started); {again}"
        )
    return None
