"""Augmentations, declared as data in params.yaml and built in one place.

``augment.train`` / ``augment.eval`` are lists of albumentations transforms, each either a bare name
(``HorizontalFlip``) or a one-key mapping ``{RandomCrop: {height: 28, width: 28}}``. An empty list means
the dataset's standard recipe (its record in :mod:`onecycle.data.catalog`). Normalization with the
per-channel statistics that ``fetch`` measured is always appended, so users never list it.

The eval pipeline has no randomness: :func:`check_spec` refuses random transforms there.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from onecycle.data import catalog
from onecycle.data.catalog import PadCropFlip, Spec

if TYPE_CHECKING:
    import torch


@functools.cache
def _albumentations():
    import albumentations as A  # noqa: N812  (3 s import; only loaded when transforms are built)

    return A


@functools.cache
def transform_names() -> tuple[str, ...]:
    """Every albumentations transform class name users may list."""
    A = _albumentations()  # noqa: N806
    base = (A.BasicTransform,)
    return tuple(
        sorted(n for n, obj in vars(A).items() if inspect.isclass(obj) and issubclass(obj, base) and not n.startswith("_"))
    )


def _split(item: dict[str, Any] | str, where: str) -> tuple[str, dict[str, Any]]:
    if isinstance(item, str):
        return item, {}
    if not isinstance(item, dict) or len(item) != 1:
        raise ValueError(f"{where} must be a transform name or a one-key mapping {{Name: {{arg: value}}}}, got {item!r}")
    (name, args), = item.items()
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise ValueError(f"{where}.{name} arguments must be a mapping, got {args!r}")
    return str(name), dict(args)


def _build_one(name: str, args: dict[str, Any], where: str):
    A = _albumentations()  # noqa: N806
    names = transform_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see albumentations' transform list"
        raise ValueError(f"{where} unknown transform {name!r}{hint}")
    cls = getattr(A, name)
    params = inspect.signature(cls.__init__).parameters
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
    allowed = [p for p in params if p not in ("self", "args", "kwargs")]
    unknown = [k for k in args if k not in allowed]
    if unknown and not takes_kwargs:
        raise ValueError(f"{where}.{name} has no argument {unknown[0]!r} (allowed: {', '.join(allowed)})")
    # albumentations takes tuples where YAML gives lists.
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            return cls(**args)
    except Exception as exc:  # albumentations validates with pydantic; keep its first complaint on one line
        # albumentations re-raises its pydantic ValidationError as a ValueError; the original is the cause.
        cause = exc if hasattr(exc, "errors") else exc.__cause__
        errors = getattr(cause, "errors", None)
        if callable(errors) and errors():  # a pydantic ValidationError: name the argument, drop the jargon
            err = errors()[0]
            arg = ".".join(str(p) for p in err.get("loc", ()) if "[" not in str(p))  # drop union members
            msg = err["msg"].removeprefix("Value error, ")
            msg = msg[:1].lower() + msg[1:]
            if err["type"] == "missing":
                detail = f"{arg} is required"
            else:
                detail = f"{arg}: {msg}" + ("" if "got" in msg else f", got {err.get('input')!r}")
        else:
            detail = " ".join(str(exc).split())
        raise ValueError(f"{where}.{name} bad arguments: {detail[:300]}") from None


def check_spec(spec: Spec, where: str, *, deterministic: bool = False) -> None:
    """Build every transform of ``spec`` once to validate names and arguments; raise ValueError naming the key."""
    for i, item in enumerate(spec):
        name, args = _split(item, f"{where}[{i}]")
        t = _build_one(name, args, f"{where}[{i}]")
        if deterministic and _is_random(t):
            raise ValueError(f"{where}[{i}] {name} is random; the eval pipeline must be deterministic")


def _is_random(t) -> bool:
    if getattr(t, "p", 1.0) < 1.0:
        return True
    name = type(t).__name__
    if name.startswith("Random") or name in ("HorizontalFlip", "VerticalFlip", "CoarseDropout", "GridDropout",
                                               "Affine", "ShiftScaleRotate", "ColorJitter", "GaussNoise"):
        return True
    # Most albumentations transforms draw their parameters at random even with p=1 (Rotate, GaussianBlur,
    # Sharpen, ...), and no attribute says so: run it under a few seeds and see whether the output changes.
    return _varies_with_seed(t)


def _varies_with_seed(t, seeds: tuple[int, ...] = (0, 1, 2)) -> bool:
    A = _albumentations()  # noqa: N806
    probe = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    outs = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for seed in seeds:
                pipeline = A.Compose([t])
                pipeline.set_random_seed(seed)
                outs.append(np.asarray(pipeline(image=probe)["image"]))
    except Exception:  # cannot run on a 256x256 RGB probe (e.g. needs one channel): judge by name alone
        return False
    return any(o.shape != outs[0].shape or not np.array_equal(o, outs[0]) for o in outs[1:])


def _compose(spec: Spec, where: str, mean: list[float], std: list[float]):
    A = _albumentations()  # noqa: N806
    steps = [_build_one(*_split(item, f"{where}[{i}]"), f"{where}[{i}]") for i, item in enumerate(spec)]
    steps.append(A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0))
    return A.Compose(steps)


def build_train_transforms(augment, dataset: str, image_size: int, mean: list[float], std: list[float]):
    """The training pipeline: ``augment.train`` (or the dataset default), then normalization."""
    spec = augment.train or catalog.kind(dataset).train_spec(image_size)
    return _compose(spec, "augment.train", mean, std)


def build_eval_transforms(augment, dataset: str, mean: list[float], std: list[float], image_size: int | None = None):
    """The eval pipeline (no randomness): ``augment.eval`` (or the dataset default, for an image folder of
    ``image_size``), then normalization."""
    spec = augment.eval or catalog.kind(dataset).eval_spec(image_size)
    return _compose(spec, "augment.eval", mean, std)


def apply(transform, image: np.ndarray) -> np.ndarray:
    """Run an albumentations pipeline on one HWC uint8 image; return a CHW float32 array."""
    out = transform(image=image)["image"]
    if out.ndim == 2:
        out = out[:, :, None]
    return np.ascontiguousarray(out.transpose(2, 0, 1), dtype=np.float32)


class BatchAugment:
    """The standard pad/crop/flip (and CIFAR's 8x8 cutout) recipe, applied to a whole uint8 batch with torch ops.

    Used instead of the per-image albumentations pipeline when ``augment.train`` / ``augment.eval`` are left
    empty on an array dataset: the same distribution of crops, flips and holes (hole fully inside the image,
    as albumentations' CoarseDropout), about 10x less CPU per image. Any listed pipeline still goes through
    albumentations. ``train=False`` only normalizes.
    """

    def __init__(self, recipe: PadCropFlip, mean: list[float], std: list[float], train: bool):
        import torch  # here, not at the top: a served model that runs albumentations needs no torch

        self.train = train
        self.pad = recipe.pad
        self.pad_mode = "reflect" if recipe.reflect else "constant"  # reflect = albumentations' BORDER_REFLECT_101
        self.hole = recipe.hole
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255.0

    def __call__(self, images: np.ndarray | torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """uint8 B x H x W x C (a NumPy array, or a tensor on any device) -> normalized float32 B x C x H x W.

        Random draws come from ``generator``, on the images' device: on the CPU the same batch and seed give
        the same result bit for bit whether the images came as an array or a tensor.
        """
        import torch

        if not isinstance(images, torch.Tensor):
            images = torch.from_numpy(np.ascontiguousarray(images))
        x = images.permute(0, 3, 1, 2).float()
        dev = x.device
        if self.train:
            b, _, h, w = x.shape
            p = self.pad
            x = torch.nn.functional.pad(x, (p, p, p, p), mode=self.pad_mode)
            oy = torch.randint(0, 2 * p + 1, (b,), generator=generator, device=dev)
            ox = torch.randint(0, 2 * p + 1, (b,), generator=generator, device=dev)
            rows = (oy[:, None] + torch.arange(h, device=dev))[:, None, :, None]  # B,1,H,1
            cols = (ox[:, None] + torch.arange(w, device=dev))[:, None, None, :]  # B,1,1,W
            x = x[torch.arange(b, device=dev)[:, None, None, None],
                  torch.arange(x.shape[1], device=dev)[None, :, None, None], rows, cols]
            flip = torch.rand(b, generator=generator, device=dev) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
            if self.hole:
                cy = torch.randint(0, h - self.hole + 1, (b,), generator=generator, device=dev)[:, None, None, None]
                cx = torch.randint(0, w - self.hole + 1, (b,), generator=generator, device=dev)[:, None, None, None]
                r = torch.arange(h, device=dev)[None, None, :, None]
                c = torch.arange(w, device=dev)[None, None, None, :]
                inside = (r >= cy) & (r < cy + self.hole) & (c >= cx) & (c < cx + self.hole)
                x = x.masked_fill(inside, 0.0)
        return ((x - self.mean.to(dev)) / self.std.to(dev)).contiguous()


def batch_pipeline(augment, dataset: str, mean: list[float], std: list[float], train: bool) -> BatchAugment | None:
    """The batched fast path for a dataset's standard recipe, or None when albumentations must run."""
    spec = augment.train if train else augment.eval
    recipe = catalog.kind(dataset).batch_recipe
    if spec or recipe is None:
        return None
    return BatchAugment(recipe, mean, std, train)
