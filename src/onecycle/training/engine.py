"""The pieces lr_find, train and tune share, so that all three train the same way.

Device and precision, the optimizer, the loss, one training step and one evaluation pass live here
and nowhere else. Mixed precision has one code path: ``autocast(enabled=...)`` plus
``GradScaler(enabled=...)``.
"""

from __future__ import annotations

import contextlib
import logging
import random
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from onecycle.config import AugmentConfig, DataConfig, ModelConfig, TrainConfig
from onecycle.core.errors import OneCycleError
from onecycle.data.loaders import build_split, make_device_loader, make_loader
from onecycle.data.store import DatasetInfo, load_info, sized
from onecycle.training.checkpoint import rng_state, set_rng_state
from onecycle.training.models import build_model, init_whitening, tta_logits

log = logging.getLogger(__name__)


class DivergenceError(OneCycleError):
    """The training loss became NaN or infinite."""


def resolve_device(name: str) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; an explicit device that is absent is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise OneCycleError("train.device is cuda but no CUDA GPU is visible; use auto or cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise OneCycleError("train.device is mps but MPS is not available; use auto or cpu")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    """A device as provenance records it: the GPU's name, or the CPU's and its thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        import platform

        return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return device.type


def cpu_bf16() -> str | None:
    """How this CPU computes bf16 natively, as torch's cpuinfo reports it: ``"AMX"`` (bf16 tiles: Intel Sapphire
    Rapids and later), ``"AVX512-BF16"`` (bf16 dot products: AMD Zen 4 and later, Intel Cooper Lake), or None.

    Where either is present oneDNN runs bf16 convolutions and matmuls faster than fp32 (measured: 1.5-2.1x on a 2-core
    AMD EPYC with AVX512-BF16, 1.7-1.9x on an Intel Xeon with AMX; docs: explanation/performance); without them autocast only
    adds conversions."""
    caps = getattr(torch.cpu, "get_capabilities", None)
    if caps is None:
        return None
    found = caps()
    if found.get("amx_bf16") and found.get("amx_tile"):
        return "AMX"
    return "AVX512-BF16" if found.get("avx512_bf16") else None


def cuda_has_bf16() -> bool:
    """Whether the CUDA device computes bf16 natively (compute capability 8.0 and later)."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


_UNSET = object()


def choose_precision(amp, device: torch.device, on_cpu: bool = False, *, cpu_bf16_kind=_UNSET,
                     cuda_bf16: bool | None = None) -> tuple[torch.dtype | None, str]:
    """The autocast dtype for ``train.amp`` on ``device`` (None = fp32) and why, e.g. ``bf16 (auto: CPU with AMX)``.

    ``auto``: bf16 on a CPU that computes it natively (AMX or AVX512-BF16: autocast is faster than fp32 there; on
    other CPUs it only adds conversions), bf16 on a CUDA GPU that has it, else fp16 with a GradScaler, fp32
    elsewhere (MPS included: this code runs no autocast there). An explicit ``fp16``/``bf16``/``true`` (= fp16)
    applies on CUDA, and on CPU only with ``train.amp_on_cpu``. ``cpu_bf16_kind`` (``"AMX"``, ``"AVX512-BF16"`` or
    None) and ``cuda_bf16`` default to this machine's (:func:`cpu_bf16`, :func:`cuda_has_bf16`); tests pass them.
    """
    if amp == "auto":
        if device.type == "cuda":
            bf16 = cuda_has_bf16() if cuda_bf16 is None else cuda_bf16
            return (torch.bfloat16, "bf16 (auto: CUDA with bf16)") if bf16 else \
                (torch.float16, "fp16 (auto: CUDA without bf16, with GradScaler)")
        if device.type == "cpu":
            kind = cpu_bf16() if cpu_bf16_kind is _UNSET else cpu_bf16_kind
            return (torch.bfloat16, f"bf16 (auto: CPU with {kind})") if kind else \
                (None, "fp32 (auto: CPU without native bf16)")
        return None, f"fp32 (auto: {device.type}, no mixed precision there)"
    if amp is False:
        return None, "fp32 (train.amp false)"
    name = "bf16" if amp == "bf16" else "fp16"
    if device.type == "cuda" or (device.type == "cpu" and on_cpu):
        return (torch.bfloat16 if name == "bf16" else torch.float16), f"{name} (train.amp {amp})"
    why = "train.amp_on_cpu is false" if device.type == "cpu" else f"no mixed precision on {device.type}"
    return None, f"fp32 (train.amp {amp} ignored: {why})"


def autocast(device: torch.device, dtype: torch.dtype | None):
    """torch's autocast for ``dtype`` on ``device`` (off when ``dtype`` is None: fp32)."""
    return torch.autocast(device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def make_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """A GradScaler that is active only for fp16 (bf16 and fp32 need no loss scaling)."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch; ``deterministic`` also asks torch for deterministic algorithms."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def param_groups(model: nn.Module, weight_decay: float, no_decay_norm_bias: bool) -> list[dict]:
    """Parameters split into decayed and (optionally) undecayed norm weights and biases."""
    if not no_decay_norm_bias or weight_decay == 0:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            is_norm = isinstance(module, nn.modules.batchnorm._NormBase | nn.GroupNorm | nn.LayerNorm)
            (no_decay if is_norm or name == "bias" else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(opt_cfg, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """The registered optimizer ``optimizer.name`` (:mod:`onecycle.training.optimizers`) over ``model``'s
    parameters, with weight decay per ``optimizer.*``."""
    from onecycle.training.optimizers import OPTIMIZERS

    groups = param_groups(model, opt_cfg.weight_decay, opt_cfg.no_decay_norm_bias)
    return OPTIMIZERS.lookup(opt_cfg.name).build(groups, lr, opt_cfg)


def to_device(images: torch.Tensor, labels: torch.Tensor, device: torch.device, channels_last: bool):
    """A batch moved to ``device`` (images in channels_last when asked)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return (images.to(device, non_blocking=True, memory_format=fmt), labels.to(device, non_blocking=True))


def train_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, loss_fn: nn.Module, device: torch.device, dtype: torch.dtype | None,
               grad_clip: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on one batch; returns (loss, logits), detached. The LR is not touched here."""
    with autocast(device, dtype):
        logits = model(images)
        loss = loss_fn(logits, labels)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip is not None:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return loss.detach(), logits.detach()


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, dtype: torch.dtype | None, channels_last: bool = False,
             collect: bool = False, tta: str = "none") -> dict:
    """Loss, top-1 and top-5 over ``loader`` (sums, so the result is exact for any batch size).

    With ``collect``, also returns every prediction's logits and label (for the evaluate stage). With
    ``tta="flip"`` each image's class probabilities are averaged with its horizontal mirror's (fastai's
    ``tta``); the "logits" are then the log of the averaged probabilities.
    """
    was_training = model.training
    model.eval()
    loss_sum, top1, top5, n = 0.0, 0, 0, 0
    all_logits, all_labels = [], []
    for images, labels in loader:
        images, labels = to_device(images, labels, device, channels_last)
        with autocast(device, dtype):
            logits = tta_logits(model, images, tta)
        loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        k = min(5, logits.shape[1])
        topk = logits.topk(k, dim=1).indices
        top1 += (topk[:, 0] == labels).sum().item()
        top5 += (topk == labels[:, None]).any(dim=1).sum().item()
        n += labels.numel()
        if collect:
            all_logits.append(logits.cpu())
            all_labels.append(labels.cpu())
    model.train(was_training)
    from onecycle.training import distributed as dist

    loss_sum, top1, top5, n = dist.sum_(loss_sum, top1, top5, n)  # the whole split, not one rank's shard
    n = int(n)
    out = {"loss": loss_sum / max(n, 1), "top1": top1 / max(n, 1), "top5": top5 / max(n, 1), "n": n}
    if collect:
        out["logits"] = torch.cat(all_logits) if all_logits else torch.empty(0)
        out["labels"] = torch.cat(all_labels) if all_labels else torch.empty(0, dtype=torch.long)
    return out


@dataclass
class Setup:
    """Everything built from params that a training-like stage needs.

    ``model`` is what trains (wrapped in DistributedDataParallel under torchrun); ``net`` is the plain
    network inside it, whose ``state_dict`` checkpoints and models store.
    """

    info: DatasetInfo
    device: torch.device
    dtype: torch.dtype | None
    model: nn.Module
    loss_fn: nn.Module
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader | None
    net: nn.Module | None = None
    precision: str = ""  # what :func:`choose_precision` chose and why, e.g. "bf16 (auto: CPU with AMX)"

    def __post_init__(self):
        if self.net is None:
            self.net = self.model


def configure_threads(threads: int) -> None:
    """Set torch's intra-op threads (0 = leave torch's default, one per core)."""
    if threads:
        torch.set_num_threads(threads)


WHITEN_IMAGES = 5000  # training images whose 3x3 patches set model.whiten's filters


def whitening_batches(data: DataConfig, augment: AugmentConfig, info: DatasetInfo, seed: int):
    """The first ``WHITEN_IMAGES`` training images, in batches of 500, as training normalizes them, without
    augmentation (no randomness drawn)."""
    ds = build_split(data, augment, info, "train", train_augment=False, seed=seed)
    n = 0
    for x, _ in make_loader(ds, 500, shuffle=False, seed=0, num_workers=0):
        yield x[:WHITEN_IMAGES - n]
        n += x.shape[0]
        if n >= WHITEN_IMAGES:
            return


def build_setup(data: DataConfig, augment: AugmentConfig, model: ModelConfig, train: TrainConfig, *,
                with_val: bool = True, root=None) -> Setup:
    """Dataset, device, model (seeded), loss and loaders, exactly as ``train`` uses them, from the params sections
    that say them.

    A relative ``data.root`` is taken from ``root`` (default: the cwd). Under ``torchrun`` this joins the process
    group, shards the data (``data.batch_size`` stays the global batch) and wraps the model in
    DistributedDataParallel (SyncBatchNorm with ``train.sync_bn``).
    """
    from onecycle.training import distributed as dist

    info = load_info(data, root)
    data = sized(data, info.num_train, train.nproc_per_node)  # val_size, batch_size: auto and fractions as counts
    tcfg = train  # short: read on most lines below
    configure_threads(tcfg.threads)
    device = resolve_device(tcfg.device)
    device = dist.init(device.type) or device
    rank, world = dist.rank(), dist.world_size()
    dist.per_process_batch(data.batch_size)
    dtype, precision = choose_precision(tcfg.amp, device, tcfg.amp_on_cpu)
    seed_everything(tcfg.seed, tcfg.deterministic)  # the same seed on every rank: identical initial weights
    if device.type == "cuda" and not tcfg.deterministic:
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick the fastest kernels
    net = build_model(model, info.num_classes, info.in_channels)
    if model.whiten:
        init_whitening(net, whitening_batches(data, augment, info, tcfg.seed))
    if world > 1 and tcfg.sync_bn:
        if device.type != "cuda":
            raise OneCycleError("train.sync_bn needs CUDA devices (PyTorch's SyncBatchNorm has no CPU version)")
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    net = net.to(device)
    if tcfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
    step_model = net
    if world > 1:
        step_model = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda"
                                                         else None)
    pin = device.type == "cuda"
    train_ds = build_split(data, augment, info, "train", train_augment=True, seed=tcfg.seed)
    on_device = data.on_device and train_ds.batch_transform is not None
    if data.on_device and not on_device:
        log.warning("data.on_device needs an array dataset with the standard augmentation (augment.train empty); "
                    "loading through the DataLoader instead")

    def loader(ds, shuffle: bool, seed: int):
        if on_device:
            return make_device_loader(ds, data.batch_size, shuffle=shuffle, seed=seed, device=device,
                                      rank=rank, world=world)
        return make_loader(ds, data.batch_size, shuffle=shuffle, seed=seed, num_workers=data.num_workers,
                           pin_memory=pin, rank=rank, world=world)

    train_loader = loader(train_ds, True, tcfg.seed)
    val_loader = None
    if with_val and data.val_size > 0:
        val_loader = loader(build_split(data, augment, info, "val", train_augment=False, seed=tcfg.seed), False, 0)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=tcfg.label_smoothing)
    return Setup(info, device, dtype, step_model, loss_fn, train_loader, val_loader, net, precision)


@contextlib.contextmanager
def preserved_state(model: nn.Module, optimizer: torch.optim.Optimizer | None = None):
    """Restore the model's weights and buffers, the optimizer and every RNG exactly on exit."""
    import copy

    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(optimizer.state_dict()) if optimizer is not None else None
    saved_rng = rng_state()
    was_training = model.training
    try:
        yield
    finally:
        model.load_state_dict(saved_model)
        if optimizer is not None:
            optimizer.load_state_dict(saved_opt)
        set_rng_state(saved_rng)
        model.train(was_training)
