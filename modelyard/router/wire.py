"""Reading the few header fields the router routes on straight from protobuf bytes, without decoding tensors.

KServe v2 requests (and modelyard.v1's, which are wire-compatible) carry `model_name` as field 1 and
`model_version` as field 2. Scanning the top-level fields and skipping every length-delimited value costs
a few operations per field whatever the tensor sizes, so a 16 MiB request is routed as cheaply as 4 KiB.
"""

from __future__ import annotations

import functools


class WireError(ValueError):
    """The bytes are not a well-formed protobuf message."""


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= len(data):
            raise WireError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise WireError("varint longer than 10 bytes")


def read_header(data: bytes) -> tuple[str, str, str]:
    """The string fields 1, 2 and 3 (model name, version, request id) of a serialized request.

    The last occurrence of a field wins, as protobuf parsing does; every other field is skipped unread.
    On the call path of every request: one-byte tags and lengths (all but values of 128 bytes or more)
    are read inline, without a call.
    """
    fields = ["", "", ""]
    pos = 0
    end = len(data)
    while pos < end:
        tag = data[pos]
        if tag < 0x80:
            pos += 1
        else:
            tag, pos = _varint(data, pos)
        field, wire_type = tag >> 3, tag & 7
        if field == 0:
            raise WireError("field number 0")
        if wire_type == 2:
            if pos < end and data[pos] < 0x80:
                length = data[pos]
                pos += 1
            else:
                length, pos = _varint(data, pos)
            stop = pos + length
            if stop > end:
                raise WireError(f"field {field} runs past the end of the message")
            if field <= 3:
                try:
                    fields[field - 1] = data[pos:stop].decode()
                except UnicodeDecodeError as exc:
                    raise WireError(f"field {field} is not UTF-8") from exc
            pos = stop
        else:
            pos = _skip(data, pos, tag, end)
        if pos > end:
            raise WireError("truncated message")
    return fields[0], fields[1], fields[2]


def read_name_version(data: bytes) -> tuple[str, str]:
    name, version, _ = read_header(data)
    return name, version


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _string_field(field: int, value: str) -> bytes:
    raw = value.encode()
    return _encode_varint(field << 3 | 2) + _encode_varint(len(raw)) + raw


def with_version(data: bytes, version: str) -> bytes:
    """The message with `model_version` (field 2) set: appending a field overrides earlier occurrences."""
    return data + _string_field(2, version)


@functools.lru_cache(maxsize=65536)
def name_version_fields(name: str, version: str) -> bytes:
    """Fields 1 (`model_name`) and 2 (`model_version`), encoded once per model version (bounded cache).

    Appended to a KServe v2 model-level request (infer, metadata, config, ready, statistics), they override
    the name and version it had and leave the tensors untouched: one copy of the request, not a decode."""
    return _string_field(1, name) + _string_field(2, version)


def with_name(data: bytes, name: str) -> bytes:
    """The message with its string field 1 set to `name` (a response's `model_name` / `name`)."""
    return data + name_field(name)


@functools.lru_cache(maxsize=65536)
def name_field(name: str) -> bytes:
    return _string_field(1, name)


def with_nested_name(data: bytes, field: int, name: str) -> bytes:
    """The message with `field` (a singular sub-message) given `name` as its field 1.

    Protobuf merges repeated occurrences of a singular message field, so the appended occurrence only
    overrides the name: `ModelConfigResponse.config.name`, `ModelStreamInferResponse.infer_response
    .model_name`.
    """
    inner = _string_field(1, name)
    return data + _encode_varint(field << 3 | 2) + _encode_varint(len(inner)) + inner


def length_delimited_fields(data: bytes) -> list[tuple[int, bytes]]:
    """(field number, value) of every length-delimited top-level field, in order; skips the others."""
    fields = []
    pos = 0
    end = len(data)
    while pos < end:
        tag, pos = _varint(data, pos)
        field, wire_type = tag >> 3, tag & 7
        if wire_type == 2:
            length, pos = _varint(data, pos)
            if pos + length > end:
                raise WireError(f"field {field} runs past the end of the message")
            fields.append((field, data[pos : pos + length]))
            pos += length
        else:
            pos = _skip(data, pos, tag, end)
    if pos > end:
        raise WireError("truncated message")
    return fields


def with_bool_parameter(message: bytes, key: str, value: bool) -> bytes:
    """The message with `parameters[key] = bool_param(value)` appended (a later map entry wins)."""
    raw_key = key.encode()
    parameter = b"\x08" + (b"\x01" if value else b"\x00")
    entry = (
        b"\x0a"
        + _encode_varint(len(raw_key))
        + raw_key
        + b"\x12"
        + _encode_varint(len(parameter))
        + parameter
    )
    return message + b"\x22" + _encode_varint(len(entry)) + entry


def stream_error(message: str) -> bytes:
    """A `ModelStreamInferResponse` carrying only `error_message` (field 1)."""
    raw = message.encode()
    return b"\x0a" + _encode_varint(len(raw)) + raw


# -- streams: one upstream stream carries many callers' requests, told apart by request id --------------

_FINAL_RESPONSE = b"triton_final_response"
_EMPTY_FINAL_REQUEST = b"triton_enable_empty_final_response"


def _bool_parameter(data: bytes, start: int, stop: int, key: bytes) -> bool | None:
    """The bool value of map entry `key` in the `parameters` entry at data[start:stop], or None."""
    found_key = False
    value: bool | None = None
    pos = start
    while pos < stop:
        tag, pos = _varint(data, pos)
        if tag & 7 != 2:
            raise WireError("malformed parameter entry")
        length, pos = _varint(data, pos)
        end = pos + length
        if end > stop:
            raise WireError("parameter entry runs past its message")
        if tag >> 3 == 1:
            found_key = data[pos:end] == key
        elif tag >> 3 == 2:  # InferParameter: bool_param is field 1 (varint)
            value = None
            inner = pos
            while inner < end:
                inner_tag, inner = _varint(data, inner)
                if inner_tag == 0x08:
                    flag, inner = _varint(data, inner)
                    value = bool(flag)
                else:
                    inner = _skip(data, inner, inner_tag, end)
        pos = end
    return value if found_key else None


def _skip(data: bytes, pos: int, tag: int, end: int) -> int:
    """The position after the value of a field with `tag` starting at `pos`."""
    wire_type = tag & 7
    if wire_type == 2:
        length, pos = _varint(data, pos)
        pos += length
    elif wire_type == 0:
        _, pos = _varint(data, pos)
    elif wire_type == 1:
        pos += 8
    elif wire_type == 5:
        pos += 4
    else:
        raise WireError(f"unsupported wire type {wire_type} for field {tag >> 3}")
    if pos > end:
        raise WireError("truncated message")
    return pos


def wants_empty_final_response(request: bytes) -> bool:
    """Whether a request sets `parameters["triton_enable_empty_final_response"]` true (a later entry wins)."""
    wanted = False
    pos = 0
    end = len(request)
    while pos < end:
        tag, pos = _varint(request, pos)
        if tag == 0x22:  # field 4, parameters (a map entry); every other field is skipped unread
            length, pos = _varint(request, pos)
            value = _bool_parameter(request, pos, pos + length, _EMPTY_FINAL_REQUEST)
            if value is not None:
                wanted = value
            pos += length
        else:
            pos = _skip(request, pos, tag, end)
    return wanted


_SEQUENCE_ID = b"sequence_id"
_SEQUENCE_START = b"sequence_start"


def read_sequence_parameters(data: bytes) -> tuple[str, bool] | None:
    """Triton's `sequence_id` request parameter (as text: an int64, uint64 or string; 0 and "" are no
    sequence) and `sequence_start` (bool), or None when the request is of no sequence. Scans the
    top-level fields like `read_header`, reading only `parameters` map entries (a later entry wins)."""
    sequence: str | None = None
    start = False
    pos = 0
    end = len(data)
    while pos < end:
        tag = data[pos]
        if tag < 0x80:
            pos += 1
        else:
            tag, pos = _varint(data, pos)
        wire_type = tag & 7
        if wire_type == 2:
            if pos < end and data[pos] < 0x80:
                length = data[pos]
                pos += 1
            else:
                length, pos = _varint(data, pos)
            stop = pos + length
            if stop > end:
                raise WireError(f"field {tag >> 3} runs past the end of the message")
            # Field 4, a `parameters` map entry; only the two keys wanted are read further (a key of
            # under 128 bytes written first, as protobuf writes it, is checked without a call).
            if tag == 0x22 and not (
                length > 2
                and data[pos] == 0x0A
                and data[pos + 1] < 0x80
                and data[pos + 2 : pos + 2 + data[pos + 1]] not in (_SEQUENCE_ID, _SEQUENCE_START)
            ):
                key, value_start, value_stop = _map_entry(data, pos, stop)
                if key == _SEQUENCE_ID:
                    kind, sequence = _parameter(data, value_start, value_stop)
                    if kind == 0x08:
                        sequence = ""  # a bool is no sequence id (Triton refuses it)
                elif key == _SEQUENCE_START:
                    kind, text = _parameter(data, value_start, value_stop)
                    start = kind == 0x08 and text == "True"
            pos = stop
        else:
            pos = _skip(data, pos, tag, end)
    if pos > end:
        raise WireError("truncated message")
    if not sequence or sequence == "0":
        return None
    return sequence, start


def _map_entry(data: bytes, pos: int, stop: int) -> tuple[bytes, int, int]:
    """A `map<string, InferParameter>` entry at data[pos:stop]: its key and its value's span."""
    key = b""
    value_start = value_stop = pos
    while pos < stop:
        tag, pos = _varint(data, pos)
        if tag & 7 != 2:
            pos = _skip(data, pos, tag, stop)
            continue
        length, pos = _varint(data, pos)
        if pos + length > stop:
            raise WireError("parameter entry runs past its message")
        if tag == 0x0A:
            key = data[pos : pos + length]
        elif tag == 0x12:
            value_start, value_stop = pos, pos + length
        pos += length
    return key, value_start, value_stop


def _parameter(data: bytes, pos: int, stop: int) -> tuple[int, str]:
    """An InferParameter's kind (the tag of its bool, int64, uint64 or string field; 0 for another) and
    value as text."""
    text = ""
    kind = 0
    while pos < stop:
        tag, pos = _varint(data, pos)
        kind = tag
        if tag in (0x08, 0x10, 0x28):  # bool_param, int64_param, uint64_param
            number, pos = _varint(data, pos)
            if tag == 0x08:
                text = str(bool(number))
            else:
                text = str(number - (1 << 64) if tag == 0x10 and number >= 1 << 63 else number)
        elif tag == 0x1A:  # string_param
            length, pos = _varint(data, pos)
            try:
                text = data[pos : pos + length].decode()
            except UnicodeDecodeError as exc:
                raise WireError("string parameter is not UTF-8") from exc
            pos += length
        else:
            text, kind = "", 0
            pos = _skip(data, pos, tag, stop)
    return kind, text


def with_stream_request_id(request: bytes, request_id: str) -> bytes:
    """The request with its `id` set and an explicit final response asked for (so its end is known)."""
    raw_key = _EMPTY_FINAL_REQUEST
    entry = b"\x0a" + _encode_varint(len(raw_key)) + raw_key + b"\x12\x02\x08\x01"
    return request + (_string_field(3, request_id) + b"\x22" + _encode_varint(len(entry)) + entry)


class StreamResponse:
    """What the router needs from a `ModelStreamInferResponse`, read without decoding tensors.

    `inner` is the (start, stop) of `infer_response` in the bytes (None when absent); `final` is its
    `triton_final_response` parameter; `has_outputs` whether it carries outputs.
    """

    __slots__ = ("error", "final", "has_outputs", "inner", "request_id")

    def __init__(self, data: bytes) -> None:
        self.error: str | None = None
        self.request_id: str | None = None
        self.inner: tuple[int, int] | None = None
        self.final = False
        self.has_outputs = False
        pos = 0
        end = len(data)
        while pos < end:
            tag, pos = _varint(data, pos)
            if tag == 0x0A:  # error_message
                length, pos = _varint(data, pos)
                self.error = data[pos : pos + length].decode(errors="replace")
                pos += length
            elif tag == 0x12:  # infer_response
                length, pos = _varint(data, pos)
                self.inner = (pos, pos + length)
                self._read_inner(data, pos, pos + length)
                pos += length
            else:
                pos = _skip(data, pos, tag, end)
        if pos > end:
            raise WireError("truncated message")

    def _read_inner(self, data: bytes, pos: int, end: int) -> None:
        while pos < end:
            tag, pos = _varint(data, pos)
            field = tag >> 3
            if tag & 7 != 2:
                pos = _skip(data, pos, tag, end)
                continue
            length, pos = _varint(data, pos)
            stop = pos + length
            if stop > end:
                raise WireError(f"field {field} runs past the end of infer_response")
            if field == 3:
                self.request_id = data[pos:stop].decode(errors="replace")
            elif field == 4:
                value = _bool_parameter(data, pos, stop, _FINAL_RESPONSE)
                if value is not None:
                    self.final = value
            elif field == 5 or field == 6:
                self.has_outputs = True
            pos = stop


def response_fields(name: str | None, request_id: str) -> bytes:
    """`model_name` (when given) and `id` as fields 1 and 3 of a ModelInferResponse: appended to one, they
    override what the container wrote."""
    return (_string_field(1, name) if name is not None else b"") + _string_field(3, request_id)


def nested(field: int, inner: bytes) -> bytes:
    """A length-delimited field `field` holding `inner` (appended to a message, it merges into the field)."""
    return _encode_varint(field << 3 | 2) + _encode_varint(len(inner)) + inner
