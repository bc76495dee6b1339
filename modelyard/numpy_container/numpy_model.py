"""The custom container's model format: a directory with `manifest.json` and `weights.npz`, run with numpy.

```json
{"format": 1, "backend": "custom", "framework": "numpy", "op": "linear",
 "inputs":  [{"name": "INPUT",  "datatype": "FP32", "shape": [-1, 4]}],
 "outputs": [{"name": "OUTPUT", "datatype": "FP32", "shape": [-1, 2]}]}
```

Ops: `linear` (OUTPUT = INPUT @ W + b), `scale` (OUTPUT = INPUT * factor), `identity` (each output is the
input at the same position; no weights), `stream` (decoupled: one response per element of a 1-d INPUT) and
`lookup` (a feature lookup: weights `keys` [n] and `table` [n, d]; a 1-d integer INPUT of keys gives their
rows, [k, d]; an unknown key is refused).
Everything is checked when the directory is loaded, so a loaded model only checks request tensors per call.
"""

from __future__ import annotations

import functools
import io
import json
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from modelyard.datatypes import DTYPES
from modelyard.errors import BadRequest

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.npz"

# KServe v2 datatypes with a fixed-width numpy equivalent (BYTES and BF16 are not supported).
_FLOAT_TYPES = ("FP16", "FP32", "FP64")


class ModelFormatError(BadRequest, ValueError):
    """A model directory that cannot be loaded; the message is one line saying why."""


class TensorError(BadRequest, ValueError):
    """Request tensors that do not match the model's signature (missing, wrong datatype or shape)."""


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of the signature; -1 in `shape` accepts any size in that dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @property
    def dtype(self) -> np.dtype[Any]:
        return DTYPES[self.datatype]

    def accepts(self, shape: Sequence[int]) -> bool:
        return len(shape) == len(self.shape) and all(
            want == -1 or want == got for want, got in zip(self.shape, shape, strict=True)
        )

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


Arrays = dict[str, np.ndarray]


@dataclass(frozen=True)
class NumpyModel:
    """A loaded model: what it computes (`op` with `arrays`) and its signature. Not tied to a name/version."""

    op: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    arrays: Mapping[str, np.ndarray]

    @property
    def memory_bytes(self) -> int:
        """The accounting unit for container budgets: the bytes of the weight arrays."""
        return sum(a.nbytes for a in self.arrays.values())

    @property
    def decoupled(self) -> bool:
        """Whether a request gets several responses (served through ModelStreamInfer only, as in Triton)."""
        return self.op == "stream"

    def input_spec(self, name: str) -> TensorSpec | None:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        return None

    def output_spec(self, name: str) -> TensorSpec | None:
        for spec in self.outputs:
            if spec.name == name:
                return spec
        return None

    def run(self, inputs: Mapping[str, np.ndarray]) -> Arrays:
        """All outputs for one request. For `stream`, the streamed elements concatenated."""
        x = self._checked(inputs)
        if self.op == "linear":
            return {self.outputs[0].name: x[0] @ self.arrays["W"] + self.arrays["b"]}
        if self.op == "scale":
            return {self.outputs[0].name: x[0] * self.arrays["factor"].reshape(())}
        if self.op == "lookup":
            return {self.outputs[0].name: self._lookup(x[0])}
        # identity, and stream as one response: each output is the input at the same position.
        return {spec.name: array for spec, array in zip(self.outputs, x, strict=True)}

    def stream(self, inputs: Mapping[str, np.ndarray]) -> Iterator[Arrays]:
        """The responses for one request: one per element for `stream`, the single `run` result otherwise."""
        if not self.decoupled:
            yield self.run(inputs)
            return
        x = self._checked(inputs)[0]
        name = self.outputs[0].name
        for i in range(x.shape[0]):
            yield {name: x[i : i + 1]}

    def _lookup(self, wanted: np.ndarray) -> np.ndarray:
        """The table's rows for `wanted` keys (`keys` sorted at load: a binary search per key)."""
        keys, table = self.arrays["keys"], self.arrays["table"]
        at = np.searchsorted(keys, wanted)
        found = at < keys.shape[0]
        found[found] = keys[at[found]] == wanted[found]
        if not found.all():
            unknown = wanted[~found]
            shown = ", ".join(str(k) for k in unknown[:5]) + (", ..." if unknown.size > 5 else "")
            raise TensorError(f"unknown key(s) {shown}: not in the lookup table ({keys.shape[0]} keys)")
        rows: np.ndarray = table[at]
        return rows

    def _checked(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        arrays = []
        for spec in self.inputs:
            array = inputs.get(spec.name)
            if array is None:
                raise TensorError(f"missing input '{spec.name}'")
            if array.dtype != spec.dtype:
                raise TensorError(f"input '{spec.name}' is {array.dtype}, the model takes {spec.datatype}")
            if not spec.accepts(array.shape):
                raise TensorError(
                    f"input '{spec.name}' has shape {list(array.shape)}, the model takes {list(spec.shape)}"
                )
            arrays.append(array)
        return arrays


def load_model_dir(path: Path | str) -> NumpyModel:
    """Reads and validates a model version directory. Blocking file I/O: call it off the event loop."""
    root = Path(path)
    try:
        manifest = _read_manifest(root)
        op = manifest["op"]
        inputs = _specs(manifest, "inputs")
        outputs = _specs(manifest, "outputs")
        weights = _read_weights(root, required=bool(_OPS[op].weights))
        arrays = _OPS[op].validate(inputs, outputs, weights)
    except ModelFormatError as exc:
        raise ModelFormatError(f"{root}: {exc}") from None
    for array in arrays.values():
        array.setflags(write=False)  # shared by every request; outputs must never alias writable weights
    return NumpyModel(op=op, inputs=inputs, outputs=outputs, arrays=arrays)


def write_model_dir(
    path: Path | str,
    op: str,
    weights: Mapping[str, npt.ArrayLike] | None,
    inputs: Sequence[TensorSpec | Mapping[str, Any]],
    outputs: Sequence[TensorSpec | Mapping[str, Any]],
) -> Path:
    """Writes a model version directory as given, unvalidated (tests write broken ones on purpose)."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    manifest = {
        "format": FORMAT_VERSION,
        "backend": "custom",
        "framework": "numpy",
        "op": op,
        "inputs": [s.to_json() if isinstance(s, TensorSpec) else dict(s) for s in inputs],
        "outputs": [s.to_json() if isinstance(s, TensorSpec) else dict(s) for s in outputs],
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    arrays = {name: np.asarray(value) for name, value in (weights or {}).items()}
    with (root / WEIGHTS).open("wb") as f:
        np.savez(f, **arrays)
    return root


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _read_manifest(root: Path) -> dict[str, Any]:
    try:
        text = (root / MANIFEST).read_text()
    except FileNotFoundError:
        raise ModelFormatError(f"no {MANIFEST}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelFormatError(f"cannot read {MANIFEST}: {_one_line(exc)}") from exc
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelFormatError(f"{MANIFEST} is not JSON: {_one_line(exc)}") from exc
    if not isinstance(manifest, dict):
        raise ModelFormatError(f"{MANIFEST} must be a JSON object")
    expected = {"format": FORMAT_VERSION, "backend": "custom", "framework": "numpy"}
    for key, value in expected.items():
        if manifest.get(key) != value:
            raise ModelFormatError(f"{MANIFEST}: {key} must be {value!r}, got {manifest.get(key)!r}")
    op = manifest.get("op")
    if op not in _OPS:
        raise ModelFormatError(f"{MANIFEST}: unknown op {op!r}; known ops: {', '.join(_OPS)}")
    return manifest


def _specs(manifest: dict[str, Any], key: str) -> tuple[TensorSpec, ...]:
    items = manifest.get(key)
    if not isinstance(items, list) or not items:
        raise ModelFormatError(f"{MANIFEST}: {key} must be a non-empty list")
    specs = []
    for i, item in enumerate(items):
        where = f"{MANIFEST}: {key}[{i}]"
        if not isinstance(item, dict):
            raise ModelFormatError(f"{where}: expected an object with name, datatype, shape")
        name, datatype, shape = item.get("name"), item.get("datatype"), item.get("shape")
        if not isinstance(name, str) or not name:
            raise ModelFormatError(f"{where}: name must be a non-empty string")
        if datatype not in DTYPES:
            raise ModelFormatError(
                f"{where} ({name}): datatype {datatype!r} is not one of {', '.join(DTYPES)}"
            )
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= -1 for d in shape
        ):
            raise ModelFormatError(f"{where} ({name}): shape must be a list of sizes (-1 for any)")
        specs.append(_shared_spec(name, datatype, tuple(shape)))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ModelFormatError(f"{MANIFEST}: {key} repeat a name: {names}")
    return tuple(specs)


@functools.lru_cache(maxsize=4096)
def _shared_spec(name: str, datatype: str, shape: tuple[int, ...]) -> TensorSpec:
    """One TensorSpec object for every model with the same input or output: thousands of models share few."""
    return TensorSpec(name, datatype, shape)


WHOLE_READ_BYTES = 1024 * 1024  # weights files up to this size are read in one call (`_read_weights`)


def _read_weights(root: Path, *, required: bool) -> Arrays:
    path = root / WEIGHTS
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        if required:
            raise ModelFormatError(f"no {WEIGHTS}") from None
        return {}
    except OSError as exc:
        raise ModelFormatError(f"cannot read {WEIGHTS}: {_one_line(exc)}") from exc
    try:
        # A small file is read whole and parsed in memory: parsing it from disk makes dozens of small
        # reads and seeks, each a hand-over of the GIL when other threads wait for it (the container's
        # loop, the other loads). Measured: 2.4 ms of container CPU per load of a tiny model, four
        # loads at once, 2.05 ms read whole. A large one is parsed from disk, never held twice.
        source = io.BytesIO(path.read_bytes()) if size <= WHOLE_READ_BYTES else path
        loaded = np.load(source, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ModelFormatError(f"{WEIGHTS} is a single array, not an npz archive of named arrays")
        with loaded as npz:
            return {name: npz[name] for name in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        if isinstance(exc, ModelFormatError):
            raise
        raise ModelFormatError(f"{WEIGHTS} is not a readable npz file: {_one_line(exc)}") from exc


def _weight(weights: Arrays, name: str, datatype: str, op: str) -> np.ndarray:
    """A weight converted once, at load, to the datatype the op computes in."""
    array = weights[name]
    dtype = DTYPES[datatype]
    if array.dtype.kind not in "biuf" or not np.can_cast(array.dtype, dtype, "same_kind"):
        raise ModelFormatError(f"{op}: weight {name} is {array.dtype}, which does not convert to {datatype}")
    return np.ascontiguousarray(array, dtype=dtype)


def _check_weight_names(op: str, weights: Arrays, expected: tuple[str, ...]) -> None:
    if set(weights) != set(expected):
        want = ", ".join(expected) or "none"
        got = ", ".join(sorted(weights)) or "none"
        raise ModelFormatError(f"{op}: {WEIGHTS} must hold {want}; it holds {got}")


def _check_arity(op: str, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...]) -> None:
    if len(inputs) != 1 or len(outputs) != 1:
        raise ModelFormatError(f"{op}: takes one input and one output, got {len(inputs)} and {len(outputs)}")


def _check_same_datatype(op: str, a: TensorSpec, b: TensorSpec) -> None:
    if a.datatype != b.datatype:
        raise ModelFormatError(f"{op}: output {b.name} is {b.datatype} but input {a.name} is {a.datatype}")


def _check_follows(op: str, x: TensorSpec, y: TensorSpec, dims: int) -> None:
    """The first `dims` output dimensions must be what the input's give: equal, or -1 in the output."""
    ok = len(x.shape) == len(y.shape) and all(
        want == -1 or want == got for got, want in zip(x.shape[:dims], y.shape[:dims], strict=True)
    )
    if not ok:
        raise ModelFormatError(
            f"{op}: output {y.name} shape {list(y.shape)} does not follow "
            f"input {x.name} shape {list(x.shape)}"
        )


def _validate_linear(inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...], w: Arrays) -> Arrays:
    _check_arity("linear", inputs, outputs)
    _check_weight_names("linear", w, ("W", "b"))
    x, y = inputs[0], outputs[0]
    _check_same_datatype("linear", x, y)
    if x.datatype not in _FLOAT_TYPES:
        raise ModelFormatError(f"linear: computes in FP16, FP32 or FP64, not {x.datatype}")
    W, b = _weight(w, "W", x.datatype, "linear"), _weight(w, "b", x.datatype, "linear")
    if W.ndim != 2 or b.shape != (W.shape[1],):
        raise ModelFormatError(
            f"linear: W must be [in, out] and b [out], got {list(W.shape)} and {list(b.shape)}"
        )
    if not x.shape or x.shape[-1] != W.shape[0]:
        raise ModelFormatError(
            f"linear: input {x.name} shape {list(x.shape)} must end in {W.shape[0]} (W is {list(W.shape)})"
        )
    if y.shape[-1:] != (W.shape[1],):
        raise ModelFormatError(
            f"linear: output {y.name} shape {list(y.shape)} must end in {W.shape[1]} (W is {list(W.shape)})"
        )
    _check_follows("linear", x, y, len(x.shape) - 1)
    return {"W": W, "b": b}


def _validate_scale(inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...], w: Arrays) -> Arrays:
    _check_arity("scale", inputs, outputs)
    _check_weight_names("scale", w, ("factor",))
    x, y = inputs[0], outputs[0]
    _check_same_datatype("scale", x, y)
    if x.datatype == "BOOL":
        raise ModelFormatError("scale: does not compute in BOOL")
    factor = _weight(w, "factor", x.datatype, "scale")
    if factor.size != 1:
        raise ModelFormatError(f"scale: factor must hold one value, got shape {list(factor.shape)}")
    _check_follows("scale", x, y, len(x.shape))
    return {"factor": factor.reshape(())}


def _validate_identity(inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...], w: Arrays) -> Arrays:
    _check_weight_names("identity", w, ())
    if len(inputs) != len(outputs):
        raise ModelFormatError(
            f"identity: needs as many outputs as inputs, got {len(inputs)} and {len(outputs)}"
        )
    for x, y in zip(inputs, outputs, strict=True):
        _check_same_datatype("identity", x, y)
        _check_follows("identity", x, y, len(x.shape))
    return {}


def _validate_stream(inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...], w: Arrays) -> Arrays:
    _check_arity("stream", inputs, outputs)
    _check_weight_names("stream", w, ())
    x, y = inputs[0], outputs[0]
    _check_same_datatype("stream", x, y)
    if len(x.shape) != 1 or y.shape not in ((1,), (-1,)):
        raise ModelFormatError(
            f"stream: input must be 1-d and output [1] per response, got {list(x.shape)} and {list(y.shape)}"
        )
    return {}


def _validate_lookup(inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...], w: Arrays) -> Arrays:
    _check_arity("lookup", inputs, outputs)
    _check_weight_names("lookup", w, ("keys", "table"))
    x, y = inputs[0], outputs[0]
    if not x.datatype.startswith(("INT", "UINT")) or len(x.shape) != 1:
        raise ModelFormatError(
            f"lookup: input {x.name} must be a 1-d integer tensor of keys, got {x.datatype} {list(x.shape)}"
        )
    if y.datatype not in _FLOAT_TYPES and not y.datatype.startswith(("INT", "UINT")):
        raise ModelFormatError(f"lookup: output {y.name} must be a number type, got {y.datatype}")
    keys, table = _weight(w, "keys", x.datatype, "lookup"), _weight(w, "table", y.datatype, "lookup")
    if keys.ndim != 1 or table.ndim != 2 or table.shape[0] != keys.shape[0]:
        raise ModelFormatError(
            f"lookup: keys must be [n] and table [n, d], got {list(keys.shape)} and {list(table.shape)}"
        )
    if np.unique(keys).size != keys.size:
        raise ModelFormatError("lookup: keys must be unique")
    if len(y.shape) != 2 or y.shape[0] not in (-1, x.shape[0]) or y.shape[1] not in (-1, table.shape[1]):
        raise ModelFormatError(
            f"lookup: output {y.name} shape {list(y.shape)} must be [{x.shape[0]}, {table.shape[1]}] "
            "(rows of the table, one per key)"
        )
    order = np.argsort(keys, kind="stable")
    return {"keys": np.ascontiguousarray(keys[order]), "table": np.ascontiguousarray(table[order])}


@dataclass(frozen=True)
class _Op:
    weights: tuple[str, ...]
    validate: Callable[[tuple[TensorSpec, ...], tuple[TensorSpec, ...], Arrays], Arrays]


_OPS: dict[str, _Op] = {
    "linear": _Op(("W", "b"), _validate_linear),
    "scale": _Op(("factor",), _validate_scale),
    "identity": _Op((), _validate_identity),
    "stream": _Op((), _validate_stream),
    "lookup": _Op(("keys", "table"), _validate_lookup),
}
OPS: tuple[str, ...] = tuple(_OPS)
