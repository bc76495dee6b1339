"""A decoupled model: one response per INPUT element (OUTPUT = [x]), then the final flag — token streaming."""

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            values = pb_utils.get_input_tensor_by_name(request, "INPUT").as_numpy()
            for value in values:
                output = pb_utils.Tensor("OUTPUT", np.array([value], dtype=np.float32))
                sender.send(pb_utils.InferenceResponse([output]))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
