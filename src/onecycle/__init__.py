"""onecycle: ResNet image classifiers trained with the One Cycle policy, as a DVC pipeline tracked in MLflow."""

import os

__version__ = "0.1.0"

# Offline by default: importing onecycle (every command, DVC stage and test does, before any dependency) turns
# off the network calls nobody asked for. albumentations checks PyPI for a newer release on import; MLflow
# sends usage telemetry from every process that imports it. A value the user set already wins (setdefault), and
# ONECYCLE_TELEMETRY=1 leaves both libraries at their own defaults.
TELEMETRY_SWITCH = "ONECYCLE_TELEMETRY"
OFFLINE_DEFAULTS = {
    "NO_ALBUMENTATIONS_UPDATE": "1",  # albumentations 2.x: no update check against PyPI
    "MLFLOW_DISABLE_TELEMETRY": "true",  # MLflow 3.x: no usage telemetry
    "GRADIO_ANALYTICS_ENABLED": "False",  # gradio (onecycle demo): no analytics, no version check
    "HF_HUB_DISABLE_TELEMETRY": "1",  # huggingface_hub (gradio's dependency): no telemetry
}


def telemetry_allowed() -> bool:
    """Whether the user opted back into the libraries' telemetry and update checks (ONECYCLE_TELEMETRY=1)."""
    return os.environ.get(TELEMETRY_SWITCH, "").strip().lower() in {"1", "true", "yes", "on"}


def _stay_offline() -> None:
    if not telemetry_allowed():
        for name, value in OFFLINE_DEFAULTS.items():
            os.environ.setdefault(name, value)


_stay_offline()
