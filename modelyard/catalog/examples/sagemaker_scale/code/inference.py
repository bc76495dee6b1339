"""The `sagemaker_scale` example: OUTPUT = INPUT x the factor stored with the model (2).

SageMaker's handler conventions (sagemaker-inference): `model_fn` loads the model from its directory;
`predict_fn` runs it. The toolkit's default `input_fn`/`output_fn` decode and encode application/x-npy.
"""

import os

import numpy as np


def model_fn(model_dir):
    with open(os.path.join(model_dir, "factor.txt")) as f:
        return np.float32(f.read().strip())


def predict_fn(data, model):
    return (np.asarray(data, dtype=np.float32) * model).astype(np.float32)
