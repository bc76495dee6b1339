"""The custom model format: what each op computes, and every way a model directory is rejected at load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelyard.numpy_container.numpy_model import (
    WHOLE_READ_BYTES,
    ModelFormatError,
    TensorError,
    TensorSpec,
    load_model_dir,
    write_model_dir,
)

RNG = np.random.default_rng(7)


def spec(name: str, shape: tuple[int, ...], datatype: str = "FP32") -> TensorSpec:
    return TensorSpec(name, datatype, shape)


def linear_dir(path: Path, n_in: int = 4, n_out: int = 2, **overrides: Any) -> Path:
    weights = {
        "W": RNG.standard_normal((n_in, n_out)).astype(np.float32),
        "b": RNG.standard_normal(n_out).astype(np.float32),
    }
    return write_model_dir(
        path,
        overrides.get("op", "linear"),
        overrides.get("weights", weights),
        overrides.get("inputs", [spec("INPUT", (-1, n_in))]),
        overrides.get("outputs", [spec("OUTPUT", (-1, n_out))]),
    )


def test_linear_computes_input_times_w_plus_b(tmp_path: Path) -> None:
    model = load_model_dir(linear_dir(tmp_path / "m"))
    x = RNG.standard_normal((5, 4)).astype(np.float32)
    W, b = np.load(tmp_path / "m" / "weights.npz")["W"], np.load(tmp_path / "m" / "weights.npz")["b"]
    out = model.run({"INPUT": x})["OUTPUT"]
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, x @ W + b, rtol=1e-6)


@pytest.mark.parametrize("n_in", [4, 600])  # weights of 40 B, read whole; of 2.4 MB, parsed from disk
def test_weights_small_and_large_load_exactly(tmp_path: Path, n_in: int) -> None:
    model = load_model_dir(linear_dir(tmp_path / "m", n_in=n_in, n_out=1000 if n_in > 4 else 2))
    assert ((tmp_path / "m" / "weights.npz").stat().st_size > WHOLE_READ_BYTES) == (n_in > 4)
    with np.load(tmp_path / "m" / "weights.npz") as stored:
        np.testing.assert_array_equal(model.arrays["W"], stored["W"])
        np.testing.assert_array_equal(model.arrays["b"], stored["b"])


def test_linear_weights_are_converted_once_to_the_signature_datatype(tmp_path: Path) -> None:
    weights = {"W": np.ones((3, 2), dtype=np.float64), "b": np.zeros(2, dtype=np.int64)}
    model = load_model_dir(
        linear_dir(tmp_path, weights=weights, inputs=[spec("X", (3,))], outputs=[spec("Y", (2,))])
    )
    assert {a.dtype for a in model.arrays.values()} == {np.dtype(np.float32)}
    out = model.run({"X": np.array([1, 2, 3], dtype=np.float32)})["Y"]
    np.testing.assert_array_equal(out, np.array([6, 6], dtype=np.float32))


@pytest.mark.parametrize("factor", [np.float32(2.5), np.array([2.5], dtype=np.float32)], ids=["0d", "1elem"])
def test_scale_multiplies_by_the_factor(tmp_path: Path, factor: np.ndarray) -> None:
    write_model_dir(tmp_path, "scale", {"factor": factor}, [spec("INPUT", (-1,))], [spec("OUTPUT", (-1,))])
    model = load_model_dir(tmp_path)
    x = RNG.standard_normal(7).astype(np.float32)
    out = model.run({"INPUT": x})["OUTPUT"]
    np.testing.assert_array_equal(out, x * np.float32(2.5))
    assert out.dtype == np.float32


def test_identity_returns_each_input_under_the_output_at_the_same_position(tmp_path: Path) -> None:
    write_model_dir(
        tmp_path,
        "identity",
        None,
        [spec("A", (-1,), "INT32"), spec("B", (2, 2), "FP64")],
        [spec("A_OUT", (-1,), "INT32"), spec("B_OUT", (2, 2), "FP64")],
    )
    model = load_model_dir(tmp_path)
    a, b = np.arange(5, dtype=np.int32), RNG.standard_normal((2, 2))
    out = model.run({"A": a, "B": b})
    np.testing.assert_array_equal(out["A_OUT"], a)
    np.testing.assert_array_equal(out["B_OUT"], b)
    assert model.memory_bytes == 0


def test_identity_loads_without_a_weights_file(tmp_path: Path) -> None:
    write_model_dir(tmp_path, "identity", None, [spec("INPUT", (-1,))], [spec("OUTPUT", (-1,))])
    (tmp_path / "weights.npz").unlink()
    assert load_model_dir(tmp_path).run({"INPUT": np.ones(2, np.float32)})["OUTPUT"].tolist() == [1, 1]


def test_stream_yields_one_single_element_output_per_input_element_in_order(tmp_path: Path) -> None:
    write_model_dir(tmp_path, "stream", None, [spec("INPUT", (-1,))], [spec("OUTPUT", (1,))])
    model = load_model_dir(tmp_path)
    x = RNG.standard_normal(6).astype(np.float32)
    responses = list(model.stream({"INPUT": x}))
    assert model.decoupled
    assert [r["OUTPUT"].shape for r in responses] == [(1,)] * 6
    np.testing.assert_array_equal(np.concatenate([r["OUTPUT"] for r in responses]), x)


def test_stream_of_a_non_decoupled_model_yields_its_single_result(tmp_path: Path) -> None:
    model = load_model_dir(linear_dir(tmp_path))
    x = np.ones((1, 4), dtype=np.float32)
    (only,) = list(model.stream({"INPUT": x}))
    np.testing.assert_array_equal(only["OUTPUT"], model.run({"INPUT": x})["OUTPUT"])


def test_memory_bytes_is_the_sum_of_weight_bytes_and_weights_are_read_only(tmp_path: Path) -> None:
    model = load_model_dir(linear_dir(tmp_path, n_in=16, n_out=8))
    assert model.memory_bytes == (16 * 8 + 8) * 4
    assert not any(a.flags.writeable for a in model.arrays.values())


def test_manifest_written_is_the_documented_format(tmp_path: Path) -> None:
    linear_dir(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest == {
        "format": 1,
        "backend": "custom",
        "framework": "numpy",
        "op": "linear",
        "inputs": [{"name": "INPUT", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "OUTPUT", "datatype": "FP32", "shape": [-1, 2]}],
    }


def _rewrite_manifest(path: Path, **changes: Any) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    manifest.update(changes)
    (path / "manifest.json").write_text(json.dumps(manifest))


def _save_npy(path: Path, array: np.ndarray) -> None:
    with path.open("wb") as f:  # np.save(path) would append .npy to the name
        np.save(f, array)


BROKEN: dict[str, tuple[Any, str]] = {
    "no manifest": (lambda p: (p / "manifest.json").unlink(), "no manifest.json"),
    "manifest not json": (lambda p: (p / "manifest.json").write_text("{op: linear"), "not JSON"),
    "manifest a list": (lambda p: (p / "manifest.json").write_text("[]"), "JSON object"),
    "other format": (lambda p: _rewrite_manifest(p, format=2), "format must be 1"),
    "other framework": (lambda p: _rewrite_manifest(p, framework="onnx"), "framework must be 'numpy'"),
    "unknown op": (lambda p: _rewrite_manifest(p, op="conv"), "unknown op 'conv'"),
    "no weights file": (lambda p: (p / "weights.npz").unlink(), "no weights.npz"),
    "weights not npz": (lambda p: (p / "weights.npz").write_bytes(b"garbage"), "not a readable npz"),
    "weights a single npy": (lambda p: _save_npy(p / "weights.npz", np.ones(2)), "single array"),
    "missing b": (lambda p: np.savez(p / "weights.npz", W=np.ones((4, 2))), "must hold W, b; it holds W"),
    "extra weight": (
        lambda p: np.savez(p / "weights.npz", W=np.ones((4, 2)), b=np.ones(2), c=np.ones(1)),
        "it holds W, b, c",
    ),
    "W rows differ from input": (
        lambda p: np.savez(p / "weights.npz", W=np.ones((3, 2)), b=np.ones(2)),
        "input INPUT shape [-1, 4] must end in 3",
    ),
    "W columns differ from output": (
        lambda p: np.savez(p / "weights.npz", W=np.ones((4, 3)), b=np.ones(3)),
        "output OUTPUT shape [-1, 2] must end in 3",
    ),
    "b wrong length": (
        lambda p: np.savez(p / "weights.npz", W=np.ones((4, 2)), b=np.ones(3)),
        "b [out], got [4, 2] and [3]",
    ),
    "W not 2-d": (lambda p: np.savez(p / "weights.npz", W=np.ones(4), b=np.ones(2)), "W must be [in, out]"),
    "string weights": (
        lambda p: np.savez(p / "weights.npz", W=np.full((4, 2), "x"), b=np.ones(2)),
        "does not convert to FP32",
    ),
    "unknown datatype": (
        lambda p: _rewrite_manifest(p, inputs=[{"name": "INPUT", "datatype": "BYTES", "shape": [-1, 4]}]),
        "datatype 'BYTES'",
    ),
    "bad shape": (
        lambda p: _rewrite_manifest(p, inputs=[{"name": "INPUT", "datatype": "FP32", "shape": [-2, 4]}]),
        "shape must be a list of sizes",
    ),
    "no outputs": (lambda p: _rewrite_manifest(p, outputs=[]), "outputs must be a non-empty list"),
    "output datatype differs": (
        lambda p: _rewrite_manifest(p, outputs=[{"name": "OUTPUT", "datatype": "FP64", "shape": [-1, 2]}]),
        "output OUTPUT is FP64 but input INPUT is FP32",
    ),
    "output rank differs": (
        lambda p: _rewrite_manifest(p, outputs=[{"name": "OUTPUT", "datatype": "FP32", "shape": [2]}]),
        "does not follow input",
    ),
    "integer linear": (
        lambda p: _rewrite_manifest(
            p,
            inputs=[{"name": "INPUT", "datatype": "INT32", "shape": [-1, 4]}],
            outputs=[{"name": "OUTPUT", "datatype": "INT32", "shape": [-1, 2]}],
        ),
        "computes in FP16, FP32 or FP64",
    ),
}


@pytest.mark.parametrize("breakage", list(BROKEN), ids=list(BROKEN))
def test_broken_model_dir_raises_one_line_format_error_naming_dir_and_reason(
    tmp_path: Path, breakage: str
) -> None:
    root = linear_dir(tmp_path / "model")
    damage, reason = BROKEN[breakage]
    damage(root)
    with pytest.raises(ModelFormatError) as info:
        load_model_dir(root)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{root}: ")
    assert reason in message


@pytest.mark.parametrize(
    ("op", "weights", "inputs", "outputs", "reason"),
    [
        (
            "scale",
            {"factor": np.ones(2)},
            [spec("I", (-1,))],
            [spec("O", (-1,))],
            "factor must hold one value",
        ),
        (
            "scale",
            {"factor": np.float64(1.5)},
            [spec("I", (-1,), "INT32")],
            [spec("O", (-1,), "INT32")],
            "INT32",
        ),
        ("scale", {}, [spec("I", (-1,))], [spec("O", (-1,))], "must hold factor; it holds none"),
        ("identity", {"W": np.ones(1)}, [spec("I", (-1,))], [spec("O", (-1,))], "must hold none; it holds W"),
        (
            "identity",
            None,
            [spec("I", (-1,)), spec("J", (-1,))],
            [spec("O", (-1,))],
            "as many outputs as inputs",
        ),
        ("identity", None, [spec("I", (3,))], [spec("O", (4,))], "does not follow input"),
        ("stream", None, [spec("I", (-1, 2))], [spec("O", (1,))], "input must be 1-d"),
        ("stream", None, [spec("I", (-1,))], [spec("O", (2,))], "output [1] per response"),
        ("linear", None, [spec("I", (-1, 4)), spec("J", (-1, 4))], [spec("O", (-1, 2))], "one input and one"),
    ],
)
def test_weights_or_signature_that_do_not_fit_the_op_are_rejected(
    tmp_path: Path, op: str, weights: Any, inputs: list[TensorSpec], outputs: list[TensorSpec], reason: str
) -> None:
    write_model_dir(tmp_path, op, weights, inputs, outputs)
    with pytest.raises(ModelFormatError, match=reason.replace("[", r"\[").replace("]", r"\]")):
        load_model_dir(tmp_path)


def test_run_rejects_missing_input_wrong_datatype_and_wrong_shape(tmp_path: Path) -> None:
    model = load_model_dir(linear_dir(tmp_path))
    with pytest.raises(TensorError, match="missing input 'INPUT'"):
        model.run({})
    with pytest.raises(TensorError, match="is float64, the model takes FP32"):
        model.run({"INPUT": np.ones((1, 4))})
    with pytest.raises(TensorError, match=r"shape \[1, 3\], the model takes \[-1, 4\]"):
        model.run({"INPUT": np.ones((1, 3), dtype=np.float32)})


@settings(max_examples=30, deadline=None)
@given(
    n_in=st.integers(1, 8),
    n_out=st.integers(1, 8),
    rows=st.integers(0, 5),
    seed=st.integers(0, 2**16),
)
def test_linear_matches_numpy_for_any_sizes(
    tmp_path_factory: pytest.TempPathFactory, n_in: int, n_out: int, rows: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((n_in, n_out)).astype(np.float32)
    b = rng.standard_normal(n_out).astype(np.float32)
    path = write_model_dir(
        tmp_path_factory.mktemp("linear"),
        "linear",
        {"W": W, "b": b},
        [spec("INPUT", (-1, n_in))],
        [spec("OUTPUT", (-1, n_out))],
    )
    x = rng.standard_normal((rows, n_in)).astype(np.float32)
    np.testing.assert_allclose(load_model_dir(path).run({"INPUT": x})["OUTPUT"], x @ W + b, rtol=1e-5)
