"""OUTPUT = INPUT * factor, with `factor` from the model config's parameters (FP32, any length)."""

import json

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        parameters = json.loads(args["model_config"]).get("parameters", {})
        self.factor = np.float32(parameters.get("factor", {}).get("string_value", "2.0"))

    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT").as_numpy()
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT", x * self.factor)]))
        return responses
