"""Pipeline specs: parsing, the graph rules and signature checks (pure), and the Fleet's pipeline index."""

from __future__ import annotations

import pytest

from modelyard.placement.pipeline import ModelSignature, Pipeline, PipelineError, check_signatures, parse_yaml
from modelyard.placement.registry import PIPELINES, Fleet
from modelyard.placement.store.base import Event

FAN = """
name: fan
version: "1"
inputs:  [{name: X, datatype: FP32, shape: [-1]}]
outputs: [{name: Y, datatype: FP32, shape: [-1]}]
steps:
  - {name: sum,    model: add_sub, inputs: {INPUT0: A, INPUT1: B}, outputs: {OUTPUT0: Y}}
  - {name: thrice, model: triple,  inputs: {INPUT: X}, outputs: {OUTPUT: A}}
  - {name: twice,  model: scale@1, inputs: {INPUT: X}, outputs: {OUTPUT: B}}
"""

VECTOR = ("FP32", (-1,))
SIGNATURES = {
    "thrice": ModelSignature("triple@1", {"INPUT": VECTOR}, {"OUTPUT": VECTOR}),
    "twice": ModelSignature("scale@1", {"INPUT": VECTOR}, {"OUTPUT": VECTOR}),
    "sum": ModelSignature(
        "add_sub@1",
        {"INPUT0": ("FP32", (4,)), "INPUT1": ("FP32", (4,))},
        {"OUTPUT0": ("FP32", (4,)), "OUTPUT1": ("FP32", (4,))},
    ),
}


def test_steps_are_ordered_after_their_producers_and_pins_are_read() -> None:
    pipeline = parse_yaml(FAN)
    order = [s.name for s in pipeline.steps]
    assert order.index("sum") > order.index("thrice") and order.index("sum") > order.index("twice")
    twice = next(s for s in pipeline.steps if s.name == "twice")
    assert (twice.model_name, twice.model_version) == ("scale", "1")
    assert Pipeline.from_json(pipeline.to_json()) == pipeline


@pytest.mark.parametrize(
    ("old", "new", "words"),
    [
        ("INPUT1: B", "INPUT1: C", ["step 'sum'", "'C'", "no step or pipeline input produces"]),
        ("OUTPUT: B}", "OUTPUT: A}", ["step 'twice'", "'A'", "exactly one producer"]),
        (
            "{INPUT: X}, outputs: {OUTPUT: A}",
            "{INPUT: Y}, outputs: {OUTPUT: A}",
            ["cycle", "thrice", "sum", "tensor '"],
        ),
        ("{OUTPUT0: Y}", "{OUTPUT0: Z}", ["pipeline output 'Y'", "no step produces"]),
    ],
)
def test_graph_errors_name_the_step_and_the_tensor(old: str, new: str, words: list[str]) -> None:
    with pytest.raises(PipelineError) as caught:
        parse_yaml(FAN.replace(old, new))
    message = str(caught.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_signatures_flow_through_the_steps() -> None:
    checked = check_signatures(parse_yaml(FAN), SIGNATURES)
    assert not checked.streaming
    wrong = {
        **SIGNATURES,
        "twice": ModelSignature("scale@1", {"INPUT": VECTOR}, {"OUTPUT": ("INT64", (-1,))}),
    }
    with pytest.raises(PipelineError, match=r"step 'sum': tensor 'B' is INT64 \[-1\].*INPUT1 takes FP32"):
        check_signatures(parse_yaml(FAN), wrong)
    with pytest.raises(PipelineError, match="step 'sum': model add_sub@1 has no input 'IN'"):
        check_signatures(parse_yaml(FAN.replace("INPUT0: A", "IN: A")), SIGNATURES)


def test_a_streaming_step_must_be_last() -> None:
    streaming = {
        **SIGNATURES,
        "thrice": ModelSignature("triple@1", {"INPUT": VECTOR}, {"OUTPUT": VECTOR}, True),
    }
    with pytest.raises(PipelineError, match="step 'sum': reads tensor 'A' from the streaming step 'thrice'"):
        check_signatures(parse_yaml(FAN), streaming)


def test_the_fleet_indexes_pipelines_and_skips_a_bad_value() -> None:
    fleet = Fleet()
    pipeline = parse_yaml(FAN)
    changes = fleet.apply(Event("put", PIPELINES + "fan@1", pipeline.to_json(), 1))
    assert changes.pipelines == {"fan@1"} and fleet.pipelines_by_name["fan"]["1"] == pipeline
    fleet.apply(Event("put", PIPELINES + "bad@1", b'{"name": "bad", "version": "1", "steps": 3}', 2))
    assert "bad@1" not in fleet.pipelines and PIPELINES + "bad@1" in fleet.unparsable
    fleet.apply(Event("put", PIPELINES + "other@1", pipeline.to_json(), 3))  # value names fan@1
    assert "other@1" not in fleet.pipelines
    fleet.apply(Event("delete", PIPELINES + "fan@1", b"", 4))
    assert not fleet.pipelines and not fleet.pipelines_by_name
