"""params.yaml, loaded once into typed, validated objects.

Every section of params.yaml is a frozen pydantic model that forbids unknown keys. A
wrong key, type or value raises :class:`ConfigError` whose message is one line naming the dotted key
and what is allowed, for example ``schedule.pct_start must be in (0, 1), got 1.5``. The CLI turns it
into exit code 2 before anything is written.
"""

from __future__ import annotations

import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from onecycle.core import values
from onecycle.core.errors import ConfigError
from onecycle.core.validation import describe_errors
from onecycle.data import catalog
from onecycle.training import model_registry
from onecycle.training.optimizers import OPTIMIZERS
from onecycle.training.policies import POLICIES
from onecycle.training.suggest import SUGGESTERS


class _Section(BaseModel):
    # allow_inf_nan=False: every float key is finite; every int key fits what torch and NumPy take (core.values)
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False, validate_default=True, allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _usable_ints(cls, v: Any, info: ValidationInfo) -> Any:
        return values.check_int(v, cls.model_fields[info.field_name].metadata)


class DataConfig(_Section):
    """``data``: which dataset, where it comes from, the validation split and how batches are loaded."""
    dataset: Literal[catalog.DATASETS] = "fashion_mnist"  # one record each in onecycle.data.catalog
    # Where the raw dataset is read from: a folder (Debian package, a download, an image folder).
    # null = the dataset's default (Debian's package directory for fashion_mnist, else a download).
    source: str | None = None
    # Examples held out of the training split for model selection, the LR finder and Optuna: a count, a fraction of
    # the training split (0.1), or auto = a tenth of it, at most 5000 (onecycle.data.store.val_count).
    val_size: int | float | Literal["auto"] = "auto"
    # Use only the first N (shuffled, seeded) training examples; null = all.
    train_subset: int | None = Field(None, gt=0)
    # Examples a step (the global batch under DDP), or auto = 256, fewer on small data so that an epoch has at least
    # 8 steps (onecycle.data.store.batch_count).
    batch_size: int | Literal["auto"] = "auto"
    # DataLoader worker processes; 0 loads in the main process (fastest on 2 cores, docs: explanation/performance).
    num_workers: int = Field(0, ge=0, le=256)  # each one a process
    # Hold an array dataset on the training device as uint8 and augment whole batches there (no DataLoader).
    on_device: bool = False
    # Folder that fetch writes data/<dataset>/ under.
    root: str = "data"

    @field_validator("val_size", "batch_size")
    @classmethod
    def _count_or_auto(cls, v: Any, info: ValidationInfo) -> Any:
        if isinstance(v, float) and not 0 < v < 1:  # val_size only (batch_size takes no float)
            raise ValueError(f"must be a count (5000), a fraction of the training split in (0, 1) (0.1) or auto, "
                             f"got {v:g}")
        if isinstance(v, int) and v < (info.field_name == "batch_size"):
            raise ValueError(f"must be {'> 0' if info.field_name == 'batch_size' else '>= 0'} or auto, got {v}")
        return v

    @model_validator(mode="after")
    def _image_folder_needs_source(self) -> DataConfig:
        if not catalog.kind(self.dataset).image_folder:
            return self
        if not self.source:
            raise ValueError(f"data.source: must name a folder with train/ and val/ when data.dataset is {self.dataset}")
        # A relative folder is the workspace's (images/<name>): fetch checks it there, where it runs.
        source = Path(self.source).expanduser()
        if source.is_absolute() and not source.is_dir():
            raise ValueError(f"data.source must be an existing folder with train/ and val/ when data.dataset is "
                             f"{self.dataset}; {self.source!r} is not a folder")
        return self


class AugmentConfig(_Section):
    """``augment``: the training and evaluation transforms (albumentations specs; empty = the dataset's recipe)."""
    # Lists of albumentations transforms, each a one-key mapping {Name: {arg: value}}.
    # Empty = the dataset's standard recipe (see onecycle.transforms).
    train: list[dict[str, Any] | str] = Field(default_factory=list)
    eval: list[dict[str, Any] | str] = Field(default_factory=list)

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _items_are_transforms(cls, v: Any, info: ValidationInfo) -> Any:
        for i, item in enumerate(v if isinstance(v, list) else []):
            if not isinstance(item, str | dict):
                raise ValueError(f"augment.{info.field_name}[{i}] must be a transform name or a one-key mapping "
                                 f"{{Name: {{arg: value}}}}, got {item!r}")
        return v

    @model_validator(mode="after")
    def _transforms_exist(self) -> AugmentConfig:
        if not self.train and not self.eval:
            return self  # the standard recipes: nothing to check, and no torch/albumentations import for it
        import importlib.util

        if importlib.util.find_spec("albumentations") is None:
            return self  # a serving environment (predict, demo): the stages that build the transforms need it
        from onecycle.data.transforms import check_spec

        check_spec(self.train, "augment.train")
        check_spec(self.eval, "augment.eval", deterministic=True)
        return self


class ModelConfig(_Section):
    """``model``: a registered model or a user's ``package.module:factory``, and the ResNet options."""
    # A registered model (onecycle.training.model_registry: resnet9, resnet18 ... resnet152) or your own, as an
    # import path "package.module:factory" (factory(num_classes, in_channels) -> torch.nn.Module, from the workspace).
    name: str = "resnet9"
    # Multiplies every layer's channel count (resnet9: 1.0 = 64-128-256-512; 0.25 = 16-32-64-128).
    width: float = Field(0.25, gt=0, le=8)
    # cifar: 3x3 stride-1 conv, no max-pool (small images); imagenet: 7x7/2 conv + max-pool.
    stem: Literal["cifar", "imagenet"] = "cifar"
    zero_init_residual: bool = False
    # resnet9 with the cifar stem: airbench's frozen whitening convolution (from training patches) as the prep
    # layer (its gain is measured in docs: explanation/performance). Read as false for models without that layer.
    whiten: bool = True

    @field_validator("name")
    @classmethod
    def _registered_or_import_path(cls, v: str) -> str:
        return model_registry.check_name(v)

    @model_validator(mode="after")
    def _options_the_model_takes(self) -> ModelConfig:
        takes = model_registry.options_of(self.name)
        if model_registry.WHITEN not in takes or self.stem != "cifar":
            # only resnet9's cifar prep conv has a whitening form: params.yaml's `whiten: true` must not stop
            # `-S model.name=resnet50`, and the logged params say what was trained
            object.__setattr__(self, "whiten", False)
        if model_registry.WIDTH not in takes and ("width" not in self.model_fields_set
                                                  or model_registry.is_import_path(self.name)):
            # the default width is resnet9's; the built-ins are full width, and a user's factory builds its own
            # (it takes num_classes and in_channels only): params.yaml's resnet9 width must not stop it
            object.__setattr__(self, "width", 1.0)
        if model_registry.WIDTH not in takes and self.width != 1.0:
            scaled = [n for n, kind in model_registry.MODELS.items() if model_registry.WIDTH in kind.options]
            raise ValueError(f"model.width must be 1 for {self.name} (only {', '.join(scaled)} scales its width), "
                             f"got {self.width:g}")
        for key in (model_registry.STEM, model_registry.ZERO_INIT):  # a user's factory takes neither: not ignored
            default = type(self).model_fields[key].default
            if key not in takes and getattr(self, key) != default:
                raise ValueError(f"model.{key} must be {str(default).lower()} for {self.name} (it is built as "
                                 f"factory(num_classes, in_channels)), got {getattr(self, key)!r}")
        return self


class OptimizerConfig(_Section):
    """``optimizer``: a registered optimizer and its settings."""
    name: Literal[OPTIMIZERS.names()] = "sgd"  # one entry each in onecycle.training.optimizers
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0)
    # Exempt normalization weights and biases from weight decay.
    no_decay_norm_bias: bool = True
    # Adam/AdamW only: (beta1, beta2). With cycle_momentum, beta1 follows the momentum cycle.
    betas: tuple[float, float] = (0.9, 0.999)
    # muon only: the Muon parameters (conv and hidden linear weights) step at this x the schedule's LR; the rest
    # (norms, biases, the classifier head) at the schedule's LR itself.
    muon_lr_ratio: float = Field(1.0, gt=0)

    @field_validator("betas", mode="before")
    @classmethod
    def _betas_in_range(cls, v: Any) -> Any:
        ok = isinstance(v, list | tuple) and len(v) == 2 and all(
            isinstance(b, int | float) and not isinstance(b, bool) and 0 <= b < 1 for b in v)
        if not ok:
            raise ValueError(f"must be two numbers in [0, 1), got {list(v) if isinstance(v, tuple) else v!r}")
        return v


class LRFindConfig(_Section):
    """``lr_find``: the LR range test's sweep and which suggestion ``schedule.max_lr: auto`` uses."""
    # 30 steps from 1e-3: the default ResNet9's loss is flat below 1e-3, and this short sweep suggests what a long
    # one from 1e-7 does at a third of the cost (docs: explanation/performance). Adam's range lies lower: start it at 1e-7.
    start_lr: float = Field(1e-3, gt=0)
    end_lr: float = Field(10.0, gt=0)
    num_iter: int = Field(30, ge=10)
    # exp: lr_i = start_lr * (end_lr/start_lr) ** (i/(num_iter-1)); linear: evenly spaced.
    mode: Literal["exp", "linear"] = "exp"
    # Alternative to end_lr: multiply the LR by this factor each step (exp mode only).
    step_mult: float | None = Field(None, gt=1)
    # Weight of the running average in the loss EMA (0 = no smoothing; fastai uses 0.98 over more steps), bias corrected.
    smooth: float = Field(0.9, ge=0, lt=1)
    # Stop when the smoothed loss exceeds diverge x the best smoothed loss.
    diverge: float = Field(5.0, gt=1)
    # Which suggestion schedule.max_lr auto uses: one entry each in onecycle.training.suggest (robust: between the
    # steepest descent and the bottom of the loss smoothed both ways, stable to noise)
    suggestion: Literal[SUGGESTERS.names()] = "steepest"

    @model_validator(mode="after")
    def _range(self) -> LRFindConfig:
        if self.step_mult is not None and self.mode != "exp":
            raise ValueError(f"lr_find.step_mult only applies when lr_find.mode is exp (got {self.mode}); set it to null")
        if self.step_mult is None and self.start_lr >= self.end_lr:
            raise ValueError(f"lr_find.start_lr: must be below lr_find.end_lr ({self.end_lr:g}), got {self.start_lr:g}")
        if self.step_mult is not None and (why := values.sweep_end_problem(self.start_lr, self.step_mult, self.num_iter)):
            raise ValueError(why)
        return self

    @property
    def resolved_end_lr(self) -> float:
        """end_lr, or start_lr * step_mult ** (num_iter - 1) when step_mult is given."""
        if self.step_mult is not None:
            return self.start_lr * self.step_mult ** (self.num_iter - 1)
        return self.end_lr


class ScheduleConfig(_Section):
    """``schedule``: the LR policy, its peak (``max_lr``) and One Cycle's knobs."""
    # The LR policy, one entry each in onecycle.training.policies: one_cycle (LR and momentum cycled), cosine or linear
    # (linear warm-up over pct_start, then down to the final LR), step (/10 at 50% and 75%), constant (max_lr).
    policy: Literal[POLICIES.names()] = "one_cycle"
    # Peak learning rate of the cycle, or "auto" = lr_find's chosen suggestion.
    max_lr: float | Literal["auto"] = "auto"
    # Fraction of total steps spent warming up; ignored when peak_epoch is set.
    pct_start: float = Field(0.25, gt=0, lt=1)
    # Alternative to pct_start: the epoch (may be fractional) at which the LR peaks.
    peak_epoch: float | None = Field(None, gt=0)
    # initial_lr = max_lr / div_factor
    div_factor: float = Field(25.0, gt=0)
    # final_lr = initial_lr / final_div_factor (1 = end at the initial LR, "no annihilation").
    final_div_factor: float = Field(1e4, gt=0)
    three_phase: bool = False
    anneal_strategy: Literal["cos", "linear"] = "cos"
    cycle_momentum: bool = True
    base_momentum: float = Field(0.85, ge=0, lt=1)
    max_momentum: float = Field(0.95, ge=0, lt=1)

    @field_validator("max_lr")
    @classmethod
    def _positive_lr(cls, v: float | str) -> float | str:
        if v != "auto" and not (v > 0 and math.isfinite(v)):
            raise ValueError(f"must be a positive number or auto, got {v}")
        return v

    @model_validator(mode="after")
    def _momenta(self) -> ScheduleConfig:
        if self.cycle_momentum and self.base_momentum > self.max_momentum:
            raise ValueError(
                f"schedule.base_momentum: must not exceed schedule.max_momentum ({self.max_momentum}), "
                f"got {self.base_momentum}"
            )
        return self


class TrainConfig(_Section):
    """``train``: epochs, seed, device, precision, checkpoints, processes and the other training switches."""
    epochs: int = Field(4, gt=0)
    seed: int = Field(0, ge=0, le=values.SEED_MAX)
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    # Precision: auto = what fits the machine (bf16 on a CPU with AMX or AVX512-BF16, bf16 or else fp16 + GradScaler on
    # CUDA, fp32 elsewhere: other CPUs, where autocast is slower than fp32, and MPS); false = fp32; fp16, bf16 (true = fp16)
    # force autocast on CUDA, and on CPU only when amp_on_cpu is true.
    amp: Literal["auto", False, True, "fp16", "bf16"] = "auto"
    # Let an explicit amp (fp16/bf16/true) autocast on CPU too (e.g. tests of the mixed-precision path); auto ignores it.
    amp_on_cpu: bool = False
    channels_last: bool = True
    compile: bool = False
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    # Clip the global gradient norm to this value; null = no clipping.
    grad_clip: float | None = Field(None, gt=0)
    # Write a resumable checkpoint every N epochs (the best-val checkpoint is always kept).
    checkpoint_every: int = Field(1, gt=0)
    # Continue from checkpoints/last.pt when it holds the same configuration.
    resume: bool = True
    # Deterministic algorithms (bit-reproducible on CPU; slower on GPU).
    deterministic: bool = False
    # torch intra-op threads; 0 = one per physical core torch detects.
    threads: int = Field(0, ge=0, le=1024)
    # Processes to train with (DDP). >1 re-launches `onecycle train` under torchrun on this machine.
    nproc_per_node: int = Field(1, gt=0, le=256)
    # Under DDP: synchronize BatchNorm statistics across processes.
    sync_bn: bool = False
    # Optimizer steps between NaN/inf and stop-request checks (each is one device sync + one all-reduce).
    check_every: int = Field(25, gt=0)
    # Weight averaging: none, lookahead (airbench94's: every 5 steps, strongest at the end of the cycle) or ema
    # (an exponential moving average of the weights); the final network is the averaged one.
    average: Literal["none", "lookahead", "ema"] = "none"
    # ema only: the average's decay per optimizer step (horizon about 1 / (1 - decay) steps).
    ema_decay: float = Field(0.995, gt=0, lt=1)

    @field_validator("amp", mode="before")
    @classmethod
    def _amp_words(cls, v: Any) -> Any:
        if isinstance(v, str) and v.lower() in ("false", "none", "off", "no"):
            return False
        if isinstance(v, str) and v.lower() in ("true", "on", "yes"):
            return True
        return v


class MLflowConfig(_Section):
    """``mlflow``: the experiment, the registered model's name and what a run logs."""
    experiment: str = Field("onecycle", min_length=1)
    # Register the evaluated model under this name; auto = onecycle-<dataset> (an image folder: onecycle-<its folder's
    # name>), so each dataset's versions are compared only with each other; null = do not register.
    registered_model: str | None = "auto"
    log_checkpoints: Literal["none", "best", "all"] = "best"
    # MLflow system metrics (CPU, memory, GPU via nvidia-ml-py) for training runs.
    system_metrics: bool = True

    @field_validator("experiment", "registered_model", mode="before")
    @classmethod
    def _names_mlflow_takes(cls, v: Any, info: ValidationInfo) -> Any:
        return values.checked_name(v, f"mlflow.{info.field_name}")


class EvaluateConfig(_Section):
    """``evaluate``: test-time augmentation."""
    # Test-time augmentation: average the class probabilities of each image and its horizontal flip.
    tta: Literal["none", "flip"] = "flip"


class TuneConfig(_Section):
    """``tune``: the Optuna study: trials, storage, sampler, pruner, objectives and search space."""
    n_trials: int = Field(12, gt=0)
    epochs: int = Field(2, gt=0)
    # null = a journal file reports/tune/... safe for several processes; or an RDB URL.
    storage: str | None = None
    study_name: str = Field("onecycle", min_length=1)
    sampler: Literal["tpe", "random"] = "tpe"
    pruner: Literal["median", "hyperband", "none"] = "median"
    # What a trial scores: a per-epoch metric (val/top1, val/loss ...; its best epoch) or a trial's cost
    # (train/seconds, train/epochs, train/images), or a list of them: a multi-objective study (Pareto front).
    metric: str | list[str] = "val/top1"
    # One direction per metric (a list when metric is a list).
    direction: Literal["maximize", "minimize"] | list[Literal["maximize", "minimize"]] = "maximize"
    seed: int = Field(0, ge=0, le=values.SEED_MAX)
    space: dict[str, Any] = Field(default_factory=dict)

    @field_validator("study_name", "storage", mode="before")
    @classmethod
    def _strings_optuna_takes(cls, v: Any, info: ValidationInfo) -> Any:
        if info.field_name == "storage" and isinstance(v, str) and (why := values.storage_problem(v)):
            raise ValueError(f"tune.storage {why}")
        return values.checked_name(v, "tune.study_name") if info.field_name == "study_name" else v

    @model_validator(mode="after")
    def _one_direction_per_metric(self) -> TuneConfig:
        if isinstance(self.metric, list):
            if not self.metric:
                raise ValueError("tune.metric must name one metric or a list of them, got []")
            twice = [m for i, m in enumerate(self.metric) if m in self.metric[:i]]
            if twice:
                raise ValueError(f"tune.metric names {twice[0]} twice")
        if len(self.metrics) != len(self.directions):
            raise ValueError(f"tune.direction must give one direction per tune.metric ({len(self.metrics)}: "
                             f"{', '.join(self.metrics)}), got {len(self.directions)}")
        return self

    @property
    def metrics(self) -> list[str]:
        """``metric`` as a list (one entry per objective)."""
        return list(self.metric) if isinstance(self.metric, list) else [self.metric]

    @property
    def directions(self) -> list[str]:
        """``direction`` as a list (one entry per objective)."""
        return list(self.direction) if isinstance(self.direction, list) else [self.direction]


class Params(_Section):
    """All of params.yaml: one validated, frozen section per concern."""
    data: DataConfig = Field(default_factory=DataConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    lr_find: LRFindConfig = Field(default_factory=LRFindConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    mlflow: MLflowConfig = Field(default_factory=MLflowConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)

    @model_validator(mode="after")
    def _peak_inside_training(self) -> Params:
        peak = self.schedule.peak_epoch
        if peak is not None and peak >= self.train.epochs:
            raise ValueError(f"schedule.peak_epoch: must be below train.epochs ({self.train.epochs}), got {peak:g}")
        return self

    @property
    def registered_model(self) -> str | None:
        """The registered model's name (``mlflow.registered_model``; auto: onecycle-<dataset>), or None."""
        from onecycle.data.store import dataset_label

        name = self.mlflow.registered_model
        return f"onecycle-{dataset_label(self.data)}" if name == "auto" else name

    def for_data(self, root: Path | None = None, *, note: bool = True) -> Params:
        """These params with ``data.val_size`` and ``data.batch_size`` as the counts they come to on the fetched
        dataset under ``root`` (:func:`onecycle.data.store.sized`), as the stages record and use them."""
        from onecycle.data.store import load_info, sized

        data = sized(self.data, load_info(self.data, root).num_train, self.train.nproc_per_node, note=note)
        return self if data is self.data else self.model_copy(update={"data": data})

    def flat(self) -> dict[str, Any]:
        """All params as {dotted.key: value}, the form MLflow records."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict) and value:
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else str(k), v)
            else:
                out[prefix] = value

        walk("", self.model_dump(mode="json"))
        return out

    def replace(self, **sections: dict[str, Any]) -> Params:
        """A copy with some keys of some sections replaced, validated like a loaded file."""
        raw = self.model_dump(mode="python")
        for name, updates in sections.items():
            raw[name] = {**raw[name], **updates}
        return parse_params(raw)


# Bounds that read better as an interval than as two separate checks.
_INTERVALS = {"schedule.pct_start": "(0, 1)", "lr_find.smooth": "[0, 1)", "train.label_smoothing": "[0, 1)"}


def _takes_numbers_not_bools(annotation: Any) -> bool:
    """Whether a field's type is a number (or number | None, number | Literal[...]) with no boolean choice."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    members = typing.get_args(annotation) if union else (annotation,)
    numeric = False
    for m in members:
        if m is bool or (typing.get_origin(m) is Literal and any(isinstance(c, bool) for c in typing.get_args(m))):
            return False
        numeric = numeric or m in (int, float)
    return numeric


def parse_params(raw: Any) -> Params:
    """Validate a params mapping; raise ConfigError with one line naming the dotted key."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"params must be a mapping of sections, got {type(raw).__name__}")
    for section, value in raw.items():
        if value is None and section in Params.model_fields:
            raise ConfigError(f"{section} must be a mapping, got null")
        # pydantic reads true as 1 for a number; in YAML (where yes/on are true too) it is a mistake.
        fields = getattr(Params.model_fields.get(section), "annotation", None)
        fields = getattr(fields, "model_fields", {})
        for key, v in (value.items() if isinstance(value, dict) else ()):
            if isinstance(v, bool) and key in fields and _takes_numbers_not_bools(fields[key].annotation):
                raise ConfigError(f"{section}.{key} must be a number, got {str(v).lower()}")
            typed = key in fields and _takes_numbers_not_bools(fields[key].annotation)  # its bounds say more
            if key in fields and not typed and (problem := values.number_problem(v, f"{section}.{key}")):
                raise ConfigError(problem)  # a number in a list or mapping (augment.*, tune.space): finite, a C int
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        line = describe_errors(exc.errors(), Params)
        key = line.split(" ", 1)[0]
        if key in _INTERVALS and "must be" in line:
            line = f"{key} must be in {_INTERVALS[key]}, got {err.get('input')!r}"
        raise ConfigError(line) from None


def read_yaml(path: Path, text: str | None = None) -> Any:
    """A YAML file (params.yaml, a tune report) read as DVC reads and writes it: YAML 1.2, with ruamel.yaml.

    ``dvc exp run -S lr_find.start_lr=1e-7`` writes ``1e-07``, a float in YAML 1.2 (PyYAML's YAML 1.1 reads it
    as a string). A key given twice is an error, as is anything unreadable: one line naming the file and line.
    """
    from ruamel.yaml import YAML
    from ruamel.yaml.constructor import DuplicateKeyError
    from ruamel.yaml.error import YAMLError

    if text is None and Path(path).stat().st_size > 16 * 2**20:  # no params file or report is that large
        raise ConfigError(f"{path} is larger than 16 MiB: not a params file")
    try:  # bytes: UTF-8, or UTF-16/32 with a byte-order mark, as YAML allows; anything else is one line
        return YAML(typ="safe", pure=True).load(Path(path).read_bytes() if text is None else text)
    except YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        if isinstance(exc, DuplicateKeyError):  # 'found duplicate key "x" with value ...': name the key alone
            problem = f"duplicate key {problem.split(chr(34))[1]!r}" if problem.count(chr(34)) >= 2 else problem
        raise ConfigError(f"{path} is not valid YAML{where}: {problem}") from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file (a missing file means all defaults is NOT assumed: it is an error)."""
    path = Path(path)
    if not path.is_file():
        what = "is not a file" if path.exists() else "not found"
        raise ConfigError(f"params file {path} {what} (pass --params PATH)")
    raw = read_yaml(path)
    if raw is None or raw == {}:  # an empty (or comments-only) file would silently mean every default
        raise ConfigError(f"{path} is empty (or only comments): put the sections to use in it "
                          f"(the repository's: `git checkout {path.name}`)")
    if not isinstance(raw, dict):  # a text of another encoding, a list: not params
        raise ConfigError(f"{path} holds no params (a mapping of sections such as train: and data:), "
                          f"but a YAML {type(raw).__name__}")
    return parse_params(raw)
