"""Pipelines: a registered, versioned DAG of model steps, callable by name like a model. Pure; no I/O.

A pipeline names its input and output tensors; each step calls one model, mapping the model's input names
to pipeline tensors (`inputs`) and its output names to new pipeline tensors (`outputs`), as Triton
ensembles do. Every tensor has exactly one producer (a pipeline input or one step), and the graph is
acyclic. The same parser reads the user's YAML and the stored JSON, so a stored value is checked as
strictly as a registration: every error is a `PipelineError` of one line naming the step and the tensor.

Signatures (`check_signatures`) are checked at registration, against the model versions registered then.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from modelyard.placement.model import model_key, split_model_key

DATATYPES = (
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "FP32", "FP64", "BF16", "BYTES",
)  # fmt: skip
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")


class PipelineError(ValueError):
    """A pipeline spec (or stored value) is refused; the message is one line."""


@dataclass(frozen=True)
class TensorSpec:
    """A pipeline input or output: -1 in `shape` is any size in that dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def describe(self) -> str:
        return f"{self.datatype} {list(self.shape)}"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


def shapes_match(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """Same rank, and each dimension equal or -1 (any) on either side."""
    return len(a) == len(b) and all(x == y or x == -1 or y == -1 for x, y in zip(a, b, strict=True))


@dataclass(frozen=True)
class Step:
    name: str
    model: str  # NAME or NAME@VERSION (pinned)
    inputs: tuple[tuple[str, str], ...]  # (model input name, pipeline tensor)
    outputs: tuple[tuple[str, str], ...]  # (model output name, new pipeline tensor)
    decoupled: bool = False  # the model streams responses (found at registration)

    @property
    def model_name(self) -> str:
        return split_model_key(self.model)[0] if "@" in self.model else self.model

    @property
    def model_version(self) -> str:
        """The pinned version, or "" (the version the caller's routing rules choose)."""
        return split_model_key(self.model)[1] if "@" in self.model else ""

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "name": self.name,
            "model": self.model,
            "inputs": dict(self.inputs),
            "outputs": dict(self.outputs),
        }
        if self.decoupled:
            data["decoupled"] = True
        return data


@dataclass(frozen=True)
class Pipeline:
    name: str
    version: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    steps: tuple[Step, ...]  # in an order where every step comes after the producers of its inputs
    tenants: tuple[str, ...] = ()  # empty: public

    @property
    def key(self) -> str:
        return model_key(self.name, self.version)

    def visible_to(self, tenant: str | None) -> bool:
        return not self.tenants or (tenant is not None and tenant in self.tenants)

    @property
    def streaming(self) -> bool:
        """Its last step is decoupled: answered through InferStream, one response per streamed one."""
        return any(step.decoupled for step in self.steps)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name, "version": self.version}
        if self.tenants:
            data["tenants"] = list(self.tenants)
        data["inputs"] = [t.to_dict() for t in self.inputs]
        data["outputs"] = [t.to_dict() for t in self.outputs]
        data["steps"] = [s.to_dict() for s in self.steps]
        return data

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> Pipeline:
        """A stored value, checked as strictly as a spec (types, names, one producer per tensor, acyclic)."""
        try:
            data = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PipelineError(f"not JSON: {exc}") from exc
        return parse_pipeline(data)


def parse_yaml(text: str) -> Pipeline:
    """A pipeline from its YAML spec (safe loader: plain data only)."""
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PipelineError(f"not valid YAML: {' '.join(str(exc).split())}") from exc
    return parse_pipeline(data)


def _str(value: Any, where: str) -> str:
    if value.__class__ is not str or not value:
        raise PipelineError(f"{where} must be a non-empty string, got {value!r}")
    return value


def _name(value: Any, where: str) -> str:
    text = _str(value, where)
    if not _NAME.fullmatch(text):
        raise PipelineError(f"{where} {text!r}: letters, digits, '_', '.', '-' (at most 128)")
    return text


def _tensors(items: Any, where: str) -> tuple[TensorSpec, ...]:
    if not isinstance(items, list) or not items:
        raise PipelineError(f"{where} must be a non-empty list of {{name, datatype, shape}}")
    out: list[TensorSpec] = []
    for item in items:
        if not isinstance(item, dict):
            raise PipelineError(f"{where}: each entry needs name, datatype and shape, got {item!r}")
        name = _str(item.get("name"), f"{where}: name")
        datatype, shape = item.get("datatype"), item.get("shape")
        if datatype not in DATATYPES:
            raise PipelineError(f"{where}: tensor '{name}': datatype {datatype!r} is not a KServe v2 type")
        if not isinstance(shape, list) or not all(d.__class__ is int and d >= -1 for d in shape):
            raise PipelineError(f"{where}: tensor '{name}': shape must be a list of sizes (-1 for any)")
        if any(t.name == name for t in out):
            raise PipelineError(f"{where}: tensor '{name}' is declared twice")
        out.append(TensorSpec(name, datatype, tuple(shape)))
    return tuple(out)


def _mapping(value: Any, where: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict) or not value:
        raise PipelineError(f"{where} must be a non-empty mapping of model tensor name to pipeline tensor")
    pairs = []
    for key, tensor in value.items():
        pairs.append((_str(key, f"{where}: model tensor name"), _str(tensor, f"{where}[{key}]")))
    return tuple(pairs)


def parse_pipeline(data: Any) -> Pipeline:
    """A Pipeline from plain data (YAML or JSON): types, names, one producer per tensor, acyclic."""
    if not isinstance(data, dict):
        raise PipelineError("a pipeline spec is a mapping with name, version, inputs, outputs and steps")
    unknown = set(data) - {"name", "version", "tenants", "inputs", "outputs", "steps"}
    if unknown:
        raise PipelineError(f"unknown field(s) {', '.join(sorted(map(str, unknown)))}")
    name = _name(data.get("name"), "name")
    version = data.get("version")
    if version.__class__ is int and not isinstance(version, bool):
        version = str(version)  # `version: 1` in YAML
    version = _name(version, "version")
    tenants = data.get("tenants") or []
    if not isinstance(tenants, list) or not all(t.__class__ is str and t for t in tenants):
        raise PipelineError(f"tenants must be a list of tenant names, got {tenants!r}")
    inputs = _tensors(data.get("inputs"), "inputs")
    outputs = _tensors(data.get("outputs"), "outputs")
    raw_steps = data.get("steps")
    if not isinstance(raw_steps, list) or not raw_steps:
        raise PipelineError("steps must be a non-empty list")
    steps: list[Step] = []
    for i, raw in enumerate(raw_steps):
        if not isinstance(raw, dict):
            raise PipelineError(f"steps[{i}] must be a mapping with name, model, inputs and outputs")
        extra = set(raw) - {"name", "model", "inputs", "outputs", "decoupled"}
        step_name = _name(raw.get("name"), f"steps[{i}].name")
        if extra:
            raise PipelineError(f"step '{step_name}': unknown field(s) {', '.join(sorted(map(str, extra)))}")
        if any(s.name == step_name for s in steps):
            raise PipelineError(f"step '{step_name}': two steps have this name")
        model = _str(raw.get("model"), f"step '{step_name}': model")
        model_name, _, model_version = model.partition("@")
        _name(model_name, f"step '{step_name}': model name")
        if "@" in model:
            _name(model_version, f"step '{step_name}': model version")
        decoupled = raw.get("decoupled", False)
        if decoupled.__class__ is not bool:
            raise PipelineError(f"step '{step_name}': decoupled must be true or false")
        step_inputs = _mapping(raw.get("inputs"), f"step '{step_name}': inputs")
        step_outputs = _mapping(raw.get("outputs"), f"step '{step_name}': outputs")
        steps.append(Step(step_name, model, step_inputs, step_outputs, decoupled))
    pipeline = Pipeline(name, version, inputs, outputs, tuple(steps), tuple(sorted(set(tenants))))
    return replace(pipeline, steps=_ordered(pipeline))


def _ordered(pipeline: Pipeline) -> tuple[Step, ...]:
    """The steps in dependency order, after checking one producer per tensor, no missing producer, and no
    cycle; raises PipelineError naming the step and the tensor."""
    producer: dict[str, str] = {t.name: "" for t in pipeline.inputs}  # tensor -> step ("": pipeline input)
    for step in pipeline.steps:
        for model_output, tensor in step.outputs:
            if tensor in producer:
                other = f"step '{producer[tensor]}'" if producer[tensor] else "a pipeline input"
                raise PipelineError(
                    f"step '{step.name}': output {model_output} -> tensor '{tensor}', which {other} "
                    "produces already (every tensor has exactly one producer)"
                )
            producer[tensor] = step.name
        names = [m for m, _ in step.outputs]
        if len(set(names)) != len(names):
            raise PipelineError(f"step '{step.name}': a model output is mapped twice")
    for step in pipeline.steps:
        for model_input, tensor in step.inputs:
            if tensor not in producer:
                raise PipelineError(
                    f"step '{step.name}': input {model_input} reads tensor '{tensor}', which no step or "
                    "pipeline input produces"
                )
    for output in pipeline.outputs:
        if output.name not in producer:
            raise PipelineError(f"pipeline output '{output.name}': no step produces tensor '{output.name}'")
        if producer[output.name] == "":
            raise PipelineError(
                f"pipeline output '{output.name}': tensor '{output.name}' is a pipeline input, not a "
                "step's output"
            )
    # Kahn's algorithm; what is left unordered lies on (or behind) a cycle.
    done: set[str] = {t.name for t in pipeline.inputs}
    ordered: list[Step] = []
    left = list(pipeline.steps)
    while left:
        ready = [s for s in left if all(t in done for _, t in s.inputs)]
        if not ready:
            step = left[0]
            tensor = next(t for _, t in step.inputs if t not in done)
            cycle = _cycle(pipeline, producer, step)
            raise PipelineError(
                f"step '{step.name}': tensor '{tensor}' depends on the step's own output "
                f"(cycle: {' -> '.join(cycle)})"
            )
        for step in ready:
            ordered.append(step)
            done.update(t for _, t in step.outputs)
            left.remove(step)
    return tuple(ordered)


def _cycle(pipeline: Pipeline, producer: dict[str, str], start: Step) -> list[str]:
    """The step names of a cycle reached from `start` (following the producers of its inputs)."""
    by_name = {s.name: s for s in pipeline.steps}
    path: list[str] = []
    step = start
    while step.name not in path:
        path.append(step.name)
        step = next(by_name[producer[t]] for _, t in step.inputs if producer.get(t))
    return [*path[path.index(step.name) :], step.name]


@dataclass(frozen=True)
class ModelSignature:
    """What a step's model takes and gives, read from its artifact at registration."""

    key: str  # name@version it was read from
    inputs: Mapping[str, tuple[str, tuple[int, ...]]]  # name -> (datatype, shape)
    outputs: Mapping[str, tuple[str, tuple[int, ...]]]
    decoupled: bool = False


def _describe(datatype: str, shape: tuple[int, ...]) -> str:
    return f"{datatype} {list(shape)}"


def check_signatures(pipeline: Pipeline, signatures: Mapping[str, ModelSignature]) -> Pipeline:
    """Checks every step against its model's signature (by step name) and returns the pipeline with the
    steps' `decoupled` flags set. Tensor types flow from the pipeline inputs through the step outputs."""
    types: dict[str, tuple[str, tuple[int, ...]]] = {t.name: (t.datatype, t.shape) for t in pipeline.inputs}
    consumers: dict[str, str] = {}
    steps: list[Step] = []
    for step in pipeline.steps:
        sig = signatures[step.name]
        mapped = dict(step.inputs)
        for model_input, tensor in step.inputs:
            if model_input not in sig.inputs:
                raise PipelineError(
                    f"step '{step.name}': model {sig.key} has no input '{model_input}' (tensor '{tensor}'); "
                    f"its inputs: {', '.join(sig.inputs)}"
                )
            want = sig.inputs[model_input]
            got = types[tensor]
            if got[0] != want[0] or not shapes_match(got[1], want[1]):
                raise PipelineError(
                    f"step '{step.name}': tensor '{tensor}' is {_describe(*got)}, but model {sig.key} input "
                    f"{model_input} takes {_describe(*want)}"
                )
            consumers.setdefault(tensor, step.name)
        for model_input in sig.inputs:
            if model_input not in mapped:
                raise PipelineError(
                    f"step '{step.name}': model {sig.key} input {model_input} is not mapped to a tensor"
                )
        for model_output, tensor in step.outputs:
            if model_output not in sig.outputs:
                raise PipelineError(
                    f"step '{step.name}': model {sig.key} has no output '{model_output}' (tensor "
                    f"'{tensor}'); its outputs: {', '.join(sig.outputs)}"
                )
            types[tensor] = sig.outputs[model_output]
        steps.append(replace(step, decoupled=sig.decoupled))
    for output in pipeline.outputs:
        got = types[output.name]
        if got[0] != output.datatype or not shapes_match(got[1], output.shape):
            raise PipelineError(
                f"pipeline output '{output.name}': declared {output.describe()}, but its producer gives "
                f"{_describe(*got)}"
            )
    streaming = [s for s in steps if s.decoupled]
    if len(streaming) > 1:
        raise PipelineError(
            f"step '{streaming[1].name}': only one step may stream (decoupled); '{streaming[0].name}' does"
        )
    if streaming:
        last = streaming[0]
        produced = {t for _, t in last.outputs}
        for tensor in produced:
            if tensor in consumers:
                raise PipelineError(
                    f"step '{consumers[tensor]}': reads tensor '{tensor}' from the streaming step "
                    f"'{last.name}' (a decoupled step must be the last)"
                )
        for output in pipeline.outputs:
            if output.name not in produced:
                raise PipelineError(
                    f"pipeline output '{output.name}': the pipeline streams (step '{last.name}' is "
                    "decoupled), so every output must come from that last step"
                )
    return replace(pipeline, steps=tuple(steps))
