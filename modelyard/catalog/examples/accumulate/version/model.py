"""A stateful model for Triton's sequence batcher: OUTPUT = the sum of every INPUT of the sequence so far.

The running sum lives in this copy's memory, per correlation id (the sequence id): a call of the sequence
that reaches another copy would find no sum (Triton refuses it: it holds no such sequence)."""

import numpy as np
import triton_python_backend_utils as pb_utils

SEQUENCE_START = 1  # TRITONSERVER_REQUEST_FLAG_SEQUENCE_START
SEQUENCE_END = 2  # TRITONSERVER_REQUEST_FLAG_SEQUENCE_END


class TritonPythonModel:
    def initialize(self, args):
        self.sums = {}

    def execute(self, requests):
        responses = []
        for request in requests:
            sequence = request.correlation_id()
            x = pb_utils.get_input_tensor_by_name(request, "INPUT").as_numpy()
            flags = request.flags()
            if flags & SEQUENCE_START or sequence not in self.sums:
                self.sums[sequence] = np.zeros_like(x)
            total = self.sums[sequence] + x
            self.sums[sequence] = total
            if flags & SEQUENCE_END:
                del self.sums[sequence]
            output = pb_utils.Tensor("OUTPUT", total.astype(np.float32))
            responses.append(pb_utils.InferenceResponse([output]))
        return responses
