"""Where every artifact lives, in one place: ``Workspace(root)`` names the files each stage reads and writes.

``dvc.yaml`` lists the same paths (relative to the workspace root) as the stages' deps and outs; a test
checks that the two agree. Stages take a ``Workspace`` so that they can run in any folder (tests pass
``tmp_path``), never assuming the working directory beyond the default ``Workspace(Path("."))``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Workspace:
    """The project folder a stage runs in; every path below is relative to ``root``."""

    root: Path = Path(".")

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @property
    def params(self) -> Path:
        """The repository's params file (what ``dvc repro`` and ``dvc exp run -S`` read and edit)."""
        return self.root / "params.yaml"

    # reports
    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def lr_find_json(self) -> Path:
        return self.reports / "lr_find.json"

    @property
    def lr_find_csv(self) -> Path:
        return self.reports / "lr_find.csv"

    @property
    def lr_find_png(self) -> Path:
        return self.reports / "lr_find.png"

    @property
    def train_json(self) -> Path:
        return self.reports / "train.json"

    @property
    def history_csv(self) -> Path:
        return self.reports / "history.csv"

    @property
    def runs_json(self) -> Path:
        """The MLflow run ids of the current outputs (not a DVC metric: ids are no numbers to compare)."""
        return self.reports / "runs.json"

    @property
    def schedule_csv(self) -> Path:
        """The LR and momentum of every optimizer step of the last training (downsampled above a limit)."""
        return self.reports / "schedule.csv"

    @property
    def metrics_json(self) -> Path:
        return self.reports / "metrics.json"

    @property
    def evaluated_model_json(self) -> Path:
        """Which models/model.pt (its digest) and test-time augmentation metrics.json measured (publish checks it)."""
        return self.reports / "evaluated_model.json"

    @property
    def publish_json(self) -> Path:
        """The registered version the publish stage made of the evaluated model (not a metric: an id)."""
        return self.reports / "publish.json"

    @property
    def per_class_csv(self) -> Path:
        return self.reports / "per_class.csv"

    @property
    def predictions_csv(self) -> Path:
        return self.reports / "predictions.csv"

    @property
    def confusion_png(self) -> Path:
        return self.reports / "confusion_matrix.png"

    @property
    def misclassified_png(self) -> Path:
        return self.reports / "misclassified.png"

    # model and checkpoints
    @property
    def model(self) -> Path:
        return self.root / "models" / "model.pt"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    # tune
    @property
    def tune_dir(self) -> Path:
        return self.reports / "tune"

    @property
    def journal(self) -> Path:
        return self.tune_dir / "study.journal"

    @property
    def best_params(self) -> Path:
        return self.tune_dir / "best_params.yaml"

    @property
    def trials_csv(self) -> Path:
        return self.tune_dir / "trials.csv"


# What each DVC stage writes, as dvc.yaml names it (tests compare the two).
STAGE_OUTPUTS = {
    "lr_find": ("lr_find_json", "lr_find_csv", "lr_find_png"),
    "train": ("model", "checkpoints", "train_json", "history_csv", "runs_json", "schedule_csv"),
    "evaluate": ("metrics_json", "per_class_csv", "predictions_csv", "confusion_png", "misclassified_png",
                 "evaluated_model_json"),
    "publish": ("publish_json",),
}
