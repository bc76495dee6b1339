"""The handler service our SageMaker containers run: sagemaker-inference's DefaultHandlerService (its
Transformer calls the model's `code/inference.py`: `model_fn`, `input_fn`, `predict_fn`, `output_fn`,
each with the toolkit's defaults when absent), behind the function entry point MMS calls.

Why a function entry point (`modelyard.containers.sagemaker.handler:handle`) rather than the class:
MMS's loader calls a class service's `initialize` inside `except Exception` and logs what it raises, so a
`model_fn` that fails (or runs out of memory) would leave a model reported loaded that fails every call.
A function is called once with no data at load and what it raises propagates: MMS answers the load 507
for a MemoryError ("System out of memory", the contract's out-of-memory status) and 500 for anything else.

MMS runs each model in worker processes of its own, so one service per process is one service per model.
This module runs inside those workers; it imports nothing of modelyard's beyond itself.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from sagemaker_inference.default_handler_service import DefaultHandlerService


class ModelHandlerService(DefaultHandlerService):
    """DefaultHandlerService with the model's `code/` importable in this worker.

    The toolkit's `initialize` only prepends `code/` to the PYTHONPATH variable, which a running
    interpreter does not read again; SageMaker's own containers start their workers with it set. Here
    the model directory is known only at load, so it goes on `sys.path`.
    """

    def initialize(self, context: Any) -> None:
        model_dir = context.system_properties.get("model_dir")
        code_dir = os.path.join(model_dir, "code")
        if os.path.isdir(code_dir) and code_dir not in sys.path:
            sys.path.insert(0, code_dir)
        super().initialize(context)


_service: ModelHandlerService | None = None


def handle(data: Any, context: Any) -> Any:
    """MMS's entry point: `data` None is the load (runs `model_fn`), else a batch of requests."""
    global _service
    if data is None:
        service = ModelHandlerService()
        service.initialize(context)  # raises: the load fails with the model's own error
        _service = service
        return None
    if _service is None:  # cannot happen after a successful load; say so rather than crash the worker
        raise RuntimeError("model not initialized")
    return _service.handle(data, context)
