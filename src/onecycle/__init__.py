"""onecycle: ResNet image classifiers trained with the One Cycle policy, as a DVC pipeline tracked in MLflow."""

__version__ = "0.1.0"
