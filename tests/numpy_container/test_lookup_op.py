"""The `lookup` op of our container: rows of a table shipped in the weights, by key (a feature lookup)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelyard.numpy_container.numpy_model import (
    ModelFormatError,
    TensorError,
    load_model_dir,
    write_model_dir,
)

IDS = [{"name": "ID", "datatype": "INT64", "shape": [-1]}]
ROWS = [{"name": "FEATURES", "datatype": "FP32", "shape": [-1, 3]}]


def lookup_dir(path: Path, keys: np.ndarray, table: np.ndarray, **specs: list) -> Path:  # type: ignore[type-arg]
    return write_model_dir(
        path, "lookup", {"keys": keys, "table": table}, specs.get("inputs", IDS), specs.get("outputs", ROWS)
    )


@settings(max_examples=30, deadline=None)
@given(keys=st.lists(st.integers(-(2**62), 2**62), min_size=1, max_size=40, unique=True), data=st.data())
def test_each_key_gets_its_own_row_in_the_order_asked(
    tmp_path_factory: pytest.TempPathFactory, keys: list[int], data: st.DataObject
) -> None:
    table = np.arange(len(keys) * 3, dtype=np.float32).reshape(len(keys), 3)
    model = load_model_dir(lookup_dir(tmp_path_factory.mktemp("lookup"), np.array(keys, np.int64), table))
    asked = data.draw(st.lists(st.sampled_from(keys), max_size=20))
    rows = model.run({"ID": np.array(asked, dtype=np.int64)})["FEATURES"]
    assert rows.dtype == np.float32 and rows.shape == (len(asked), 3)
    for key, row in zip(asked, rows, strict=True):
        np.testing.assert_array_equal(row, table[keys.index(key)])


def test_an_unknown_key_is_refused_naming_it(tmp_path: Path) -> None:
    model = load_model_dir(lookup_dir(tmp_path / "m", np.array([7, 3]), np.ones((2, 3), np.float32)))
    with pytest.raises(TensorError, match=r"unknown key\(s\) 4, 99: not in the lookup table \(2 keys\)"):
        model.run({"ID": np.array([3, 4, 99, 7], dtype=np.int64)})
    with pytest.raises(TensorError, match="is float32, the model takes INT64"):
        model.run({"ID": np.array([3.0], dtype=np.float32)})


@pytest.mark.parametrize(
    ("keys", "table", "outputs", "reason"),
    [
        (np.array([1, 1]), np.ones((2, 3)), ROWS, "keys must be unique"),
        (np.array([1, 2]), np.ones((3, 3)), ROWS, "keys must be [n] and table [n, d]"),
        (np.array([1, 2]), np.ones((2, 4)), ROWS, "must be [-1, 4]"),
        (np.array([1.5, 2]), np.ones((2, 3)), ROWS, "does not convert to INT64"),
    ],
    ids=["duplicate-keys", "rows-differ", "width-differs", "float-keys"],
)
def test_a_bad_lookup_table_is_refused_at_load(
    tmp_path: Path,
    keys: np.ndarray,
    table: np.ndarray,
    outputs: list,
    reason: str,  # type: ignore[type-arg]
) -> None:
    with pytest.raises(ModelFormatError) as caught:
        load_model_dir(lookup_dir(tmp_path / "m", keys, table, outputs=outputs))
    assert reason in str(caught.value)
