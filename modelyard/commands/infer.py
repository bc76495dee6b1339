"""`modelyard infer MODEL -i NAME=JSON`: one quick call through the router (KServe v2 gRPC), for trying a
model by hand.

Each input's datatype comes from the model's metadata (asked of the router); its shape is the JSON value's.
Exit status: 0 answered; 1 the router or the model answered with an error (its gRPC status and message);
2 a bad input or an unreachable router.
"""

from __future__ import annotations

import json
from typing import Any

import click

from modelyard.commands.output import Table, chosen, emit_data, output_option, print_table
from modelyard.console import fail


def _inputs(values: tuple[str, ...]) -> dict[str, Any]:
    parsed: dict[str, Any] = {}
    for value in values:
        name, sep, text = value.partition("=")
        if not sep or not name:
            fail(f"bad input {value!r}: expected NAME=JSON, e.g. INPUT=[1,2,3]")
        try:
            parsed[name] = json.loads(text)
        except json.JSONDecodeError as exc:
            fail(f"input {name}: not JSON ({exc.msg} at column {exc.colno}): {text!r}")
    return parsed


@click.command("infer")
@click.argument("model")
@click.option("-i", "--input", "inputs", multiple=True, metavar="NAME=JSON", help="An input tensor (repeat).")
@click.option("--version", "model_version", default="", help="Call this version (default: the route rule's).")
@click.option(
    "--router",
    envvar="MODELYARD_ROUTER",
    default="127.0.0.1:8001",
    show_default=True,
    help="The router's address (also $MODELYARD_ROUTER).",
)
@click.option("--tenant", default=None, help="Call as this tenant (x-tenant-id; routers that trust it).")
@click.option("--token", envvar="MODELYARD_TOKEN", default=None, help="Bearer token (also $MODELYARD_TOKEN).")
@click.option("--timeout-s", type=click.FloatRange(min=0, min_open=True), default=30.0, show_default=True)
@output_option
def infer(
    model: str,
    inputs: tuple[str, ...],
    model_version: str,
    router: str,
    tenant: str | None,
    token: str | None,
    timeout_s: float,
    output: str,
) -> None:
    """Call MODEL once through the router and print its outputs."""
    import numpy as np
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException, triton_to_np_dtype

    values = _inputs(inputs)
    headers = {}
    if tenant:
        headers["x-tenant-id"] = tenant
    if token:
        headers["authorization"] = f"Bearer {token}"
    client = grpcclient.InferenceServerClient(router)

    def refused(exc: InferenceServerException) -> None:
        status = str(exc.status() or "").removeprefix("StatusCode.")
        message = " ".join(str(exc.message() or exc).split())
        if status in ("UNAVAILABLE", "DEADLINE_EXCEEDED") and "connect" in message.lower():
            fail(f"cannot reach the router at {router}: {message}")
        fail(f"{model}: {status}: {message}" if status else f"{model}: {message}", status=1)

    try:
        metadata = client.get_model_metadata(
            model, model_version, headers=headers, as_json=True, client_timeout=timeout_s
        )
        declared = {tensor["name"]: tensor["datatype"] for tensor in metadata.get("inputs", [])}
        if unknown := sorted(set(values) - set(declared)):
            fail(f"{model} has no input {', '.join(unknown)} (its inputs: {', '.join(declared)})")
        if missing := sorted(set(declared) - set(values)):
            fail(f"{model} needs input {', '.join(missing)}: give -i {missing[0]}=JSON")
        tensors = []
        for name, value in values.items():
            datatype = declared[name]
            try:
                if datatype == "BYTES":
                    array = np.array(value, dtype=np.object_)
                    array = np.vectorize(lambda v: str(v).encode(), otypes=[np.object_])(array)
                else:
                    array = np.array(value, dtype=triton_to_np_dtype(datatype))
            except (ValueError, TypeError, OverflowError) as exc:
                fail(f"input {name}: not a {datatype} tensor: {exc}")
            tensor = grpcclient.InferInput(name, list(array.shape), datatype)
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        result = client.infer(
            model, tensors, model_version=model_version, headers=headers, client_timeout=timeout_s
        )
    except InferenceServerException as exc:
        refused(exc)
        return
    finally:
        client.close()
    answer = result.get_response(as_json=True)
    outputs = {}
    for tensor in answer.get("outputs", []):
        array = result.as_numpy(tensor["name"])
        data = (
            [v.decode(errors="replace") if isinstance(v, bytes) else v for v in array.ravel().tolist()]
            if array is not None and array.dtype == np.object_
            else (array.ravel().tolist() if array is not None else [])
        )
        outputs[tensor["name"]] = {
            "datatype": tensor["datatype"],
            "shape": [int(d) for d in tensor.get("shape", [])],
            "data": data,
        }
    if chosen(output) != "table":
        emit_data(
            chosen(output),
            {
                "model": answer.get("model_name", model),
                "version": answer.get("model_version", ""),
                "outputs": outputs,
            },
        )
        return
    table = Table(("output", "datatype", "shape", "data"))
    for name, tensor in outputs.items():
        table.rows.append((name, tensor["datatype"], json.dumps(tensor["shape"]), json.dumps(tensor["data"])))
    print_table(table)
