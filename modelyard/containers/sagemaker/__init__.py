"""containers/sagemaker."""
