"""KServe v2 tensor datatypes, defined once for every module that reads or writes tensors: the numpy dtype
of each (little-endian, as `raw_input_contents` / `raw_output_contents` are), the typed `contents` field
that carries each, and item sizes."""

from __future__ import annotations

from typing import Any

import numpy as np

DTYPES: dict[str, np.dtype[Any]] = {
    name: np.dtype(code).newbyteorder("<")
    for name, code in {
        "BOOL": "?", "UINT8": "u1", "UINT16": "u2", "UINT32": "u4", "UINT64": "u8",
        "INT8": "i1", "INT16": "i2", "INT32": "i4", "INT64": "i8", "FP16": "f2", "FP32": "f4", "FP64": "f8",
    }.items()
}  # fmt: skip

# The typed `InferTensorContents` field per datatype; FP16 and BF16 travel as raw bytes only (as in Triton).
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


def item_bytes(datatype: str) -> int | None:
    """Bytes per element of a fixed-size datatype; None for BYTES (and names not known here)."""
    if datatype == "BF16":  # no numpy dtype, two bytes all the same
        return 2
    dtype = DTYPES.get(datatype)
    return None if dtype is None else dtype.itemsize
