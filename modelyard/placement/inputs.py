"""The planner's files: MODELS.jsonl and CONTAINERS.jsonl in, MAP.json in (the previous map) and out.

Every mistake in a file raises InputError with one line that names the file and, where there is one, the
line: `models.jsonl:17: replicas must be >= 1, got 0`. Keys the planner does not use are ignored.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from itertools import islice, repeat
from operator import lt
from typing import Any, TypeVar

from modelyard.placement.model import CONTAINER_KINDS, MODEL_KINDS
from modelyard.placement.planner import Capacity, Demand, Demands, Plan

T = TypeVar("T")
_KINDS = {kind: kind for kind in MODEL_KINDS}


class InputError(Exception):
    """A missing or malformed input file; the message is one line meant for the user."""


@dataclass(frozen=True)
class PreviousMap:
    version: int
    assignments: dict[str, tuple[str, ...]]


def read_models(path: str) -> Demands:
    """MODELS.jsonl: `{"name", "memory_bytes", "replicas" (default 1), "kind" (default "any")}` per line."""
    text = _read_text(path)
    models = _well_formed_models(_parse_all(text))
    if models is not None:
        return models
    return Demands.of(_check_lines(path, _numbered_lines(text), "name", "model name", _model))


def _well_formed_models(records: list[Any] | None) -> Demands | None:
    """The fast path for 1M-line files: the models if every record is valid, else None (and the slow path
    finds the line to blame). Each rule is checked on a whole column at once, by C loops."""
    if records is None or set(map(type, records)) != {dict}:
        return None
    names = _column(records, "name")
    memory_bytes = _column(records, "memory_bytes")
    replicas = _column(records, "replicas", 1)
    kinds = _column(records, "kind", "any")
    # Types compared exactly: JSON true/false arrive as bool, which Python counts as int. Demands checks
    # the rest (unique names, known kinds, replicas >= 1).
    if not (
        set(map(type, names)) == {str}
        and all(names)
        and set(map(type, memory_bytes)) == {int}
        and min(memory_bytes) > 0
        and set(map(type, replicas)) == {int}
        and set(map(type, kinds)) == {str}
    ):
        return None
    # One string object per kind instead of one per line.
    kinds = tuple(map(_KINDS.get, kinds, kinds))
    try:
        return Demands(names, memory_bytes, replicas, kinds)
    except ValueError:
        return None


def _column(records: list[dict[str, Any]], key: str, default: Any = None) -> tuple[Any, ...]:
    return tuple(map(dict.get, records, repeat(key), repeat(default)))


def read_containers(path: str) -> list[Capacity]:
    """CONTAINERS.jsonl: `{"id", "memory_bytes", "kind"}` per line."""
    return _check_lines(path, _numbered_lines(_read_text(path)), "id", "container id", _container)


def read_map(path: str) -> PreviousMap:
    """A MAP.json written by `plan`: `{"version", "assignments": {name: [container ids]}, ...}`."""
    text = _read_text(path)
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}") from None
    if not isinstance(document, dict):
        raise InputError(f'{path}:1: expected a JSON object with "assignments"')
    version = document.get("version", 0)
    if not _is_int(version) or version < 0:
        line = _line_of(text, '"version"')
        raise InputError(f"{path}:{line}: version must be an integer >= 0, got {_show(version)}")
    assignments = document.get("assignments")
    if not isinstance(assignments, dict):
        line = _line_of(text, '"assignments"')
        raise InputError(f"{path}:{line}: assignments must be an object of model name -> container ids")
    checked: dict[str, tuple[str, ...]] = {}
    for name, ids in assignments.items():
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            line = _line_of(text, json.dumps(name))
            raise InputError(
                f"{path}:{line}: assignments[{json.dumps(name)}] must be a list of container ids"
            )
        checked[name] = tuple(ids)
    return PreviousMap(version, checked)


def format_map(result: Plan, version: int) -> str:
    """The MAP.json text for a plan: keys sorted, so the same plan is always the same bytes."""
    document = {
        "assignments": result.assignments,
        "reasons": result.unplaced,
        "unplaced": sorted(result.unplaced),
        "version": version,
    }
    # `plan` returns its dicts in key order: then json need not sort a million keys again (0.2 s at 1M).
    in_order = _in_key_order(result.assignments) and _in_key_order(result.unplaced)
    return json.dumps(document, sort_keys=not in_order) + "\n"


def _in_key_order(mapping: Mapping[str, Any]) -> bool:
    return all(map(lt, mapping, islice(mapping, 1, None)))


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as file:
            return file.read()
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text ({exc.reason})") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None


def _numbered_lines(text: str) -> list[tuple[int, str]]:
    """The non-blank lines of a file with their numbers."""
    return [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]


def _parse_all(text: str) -> list[Any] | None:
    """All non-blank lines parsed at once (one JSON array), or None when some line is not JSON on its own."""
    if text.isascii() and "\r" not in text:
        # Then "\n" is the only line break (splitlines knows more), and a file without blank lines parses
        # with each newline between two lines made a comma, without a list of its lines (0.5 s at 1M).
        between = text.count("\n") - text.endswith("\n")
        records = _loads_array(text.replace("\n", ",", between))
        if records is not None and len(records) == between + 1:
            return records
    lines = list(filter(str.strip, text.splitlines()))
    records = _loads_array(",".join(lines))
    # `1, 2` on one line would parse as two array items; the slow path then reports the line.
    return records if records is not None and len(records) == len(lines) else None


def _loads_array(items: str) -> list[Any] | None:
    try:
        records: list[Any] = json.loads("".join(("[", items, "]")))  # one copy of 80 MB, not two
    except (json.JSONDecodeError, RecursionError):
        return None
    return records


def _check_lines(
    path: str,
    lines: list[tuple[int, str]],
    key: str,
    what: str,
    parse: Callable[[Mapping[str, Any]], T | str],
) -> list[T]:
    """One item per line; `parse` returns the item or what is wrong with the line."""
    items: list[T] = []
    first_line: dict[str, int] = {}
    for lineno, line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{lineno}: not valid JSON: {exc.msg}") from None
        if not isinstance(record, dict):
            raise InputError(f"{path}:{lineno}: expected a JSON object, got {_show(record)}")
        item = parse(record)
        if isinstance(item, str):
            raise InputError(f"{path}:{lineno}: {item}")
        name = record[key]
        if name in first_line:
            raise InputError(
                f"{path}:{lineno}: duplicate {what} {_show(name)} (first on line {first_line[name]})"
            )
        first_line[name] = lineno
        items.append(item)
    return items


def _model(record: Mapping[str, Any]) -> Demand | str:
    name = record.get("name")
    if not isinstance(name, str) or not name:
        return f"name must be a non-empty string, got {_show(name)}"
    memory_bytes = _positive("memory_bytes", record.get("memory_bytes"))
    if isinstance(memory_bytes, str):
        return memory_bytes
    replicas = record.get("replicas", 1)
    if not _is_int(replicas):
        return f"replicas must be an integer, got {_show(replicas)}"
    if replicas < 1:
        return f"replicas must be >= 1, got {replicas}"
    kind = record.get("kind", "any")
    if kind not in MODEL_KINDS:
        return f"kind must be one of {', '.join(MODEL_KINDS)}, got {_show(kind)}"
    return Demand(name, memory_bytes, replicas, kind)


def _container(record: Mapping[str, Any]) -> Capacity | str:
    container_id = record.get("id")
    if not isinstance(container_id, str) or not container_id:
        return f"id must be a non-empty string, got {_show(container_id)}"
    memory_bytes = _positive("memory_bytes", record.get("memory_bytes"))
    if isinstance(memory_bytes, str):
        return memory_bytes
    kind = record.get("kind")
    if kind not in CONTAINER_KINDS:
        return f"kind must be one of {', '.join(CONTAINER_KINDS)}, got {_show(kind)}"
    return Capacity(container_id, memory_bytes, kind)


def _positive(key: str, value: Any) -> int | str:
    """The value if it is a positive integer, else what is wrong with it."""
    if value is None:
        return f"missing {key}"
    if not _is_int(value):
        return f"{key} must be an integer, got {_show(value)}"
    if value <= 0:
        return f"{key} must be > 0, got {value}"
    return int(value)


def _is_int(value: Any) -> bool:
    # JSON true/false arrive as bool, which Python counts as int.
    return isinstance(value, int) and not isinstance(value, bool)


def _show(value: Any) -> str:
    """A value as it appeared in the file, cut short to keep the message on one line."""
    text = json.dumps(value) if value is not None else "nothing"
    return text if len(text) <= 60 else text[:57] + "..."


def _line_of(text: str, needle: str) -> int:
    at = text.find(needle)
    return text.count("\n", 0, at) + 1 if at >= 0 else 1
