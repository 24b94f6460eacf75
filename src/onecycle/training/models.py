"""The networks: the built-in ResNets (the DAWNBench ResNet9 and torchvision's ResNet-18 ... ResNet-152), each a
factory :data:`onecycle.training.model_registry.MODELS` registers, and :func:`build_model`, which builds what
``model.name`` names: a registered model, or a user's own ``"package.module:factory"``.

``resnet9`` is the "custom ResNet" of the DAWNBench CIFAR-10 entries (Myrtle.ai): prep 64, layer1 128
with a residual block, layer2 256, layer3 512 with a residual block, global max-pool, linear with the
output scaled by 1/8. ``model.width`` scales every channel count; ``model.whiten`` swaps the prep convolution
for airbench's frozen whitening convolution (``init_whitening`` sets it from training patches). The deeper ones are torchvision's own
implementations, with the first convolution and max-pool swapped for a 3x3 stride-1 stem when
``model.stem`` is ``cifar``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from onecycle.core.errors import ConfigError
from onecycle.training import model_registry

WHITEN_KERNEL = 3  # the whitening convolution's patch size: 2 x channels x 3 x 3 filters (18 for grey images)
WHITEN_EPS = 5e-4  # added to the patch covariance's eigenvalues (airbench94)


def _conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class Residual(nn.Module):
    """x + f(x), where f is two conv-bn-relu blocks of the same width."""

    def __init__(self, channels: int, zero_init: bool = False):
        super().__init__()
        self.res1 = _conv_bn(channels, channels)
        self.res2 = _conv_bn(channels, channels)
        if zero_init:
            nn.init.zeros_(self.res2[1].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.res2(self.res1(x))


class ResNet9(nn.Module):
    """DAWNBench ResNet9; ``width`` scales the 64-128-256-512 channel counts."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0, stem: str = "cifar",
                 zero_init_residual: bool = False, whiten: bool = False):
        super().__init__()
        c = [max(1, round(w * width)) for w in (64, 128, 256, 512)]
        if whiten:  # the eigenvectors of the patch covariance and their negatives, frozen; BatchNorm and ReLU after
            c[0] = 2 * in_channels * WHITEN_KERNEL ** 2
            conv = nn.Conv2d(in_channels, c[0], kernel_size=WHITEN_KERNEL, padding=WHITEN_KERNEL // 2, bias=False)
            conv.weight.requires_grad_(False)
            self.prep = nn.Sequential(conv, nn.BatchNorm2d(c[0]), nn.ReLU(inplace=True))
        elif stem == "imagenet":
            self.prep = nn.Sequential(
                nn.Conv2d(in_channels, c[0], kernel_size=7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(c[0]), nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2, padding=1),
            )
        else:
            self.prep = _conv_bn(in_channels, c[0])
        self.layer1 = nn.Sequential(_conv_bn(c[0], c[1]), nn.MaxPool2d(2), Residual(c[1], zero_init_residual))
        self.layer2 = nn.Sequential(_conv_bn(c[1], c[2]), nn.MaxPool2d(2))
        self.layer3 = nn.Sequential(_conv_bn(c[2], c[3]), nn.MaxPool2d(2), Residual(c[3], zero_init_residual))
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(c[3], num_classes, bias=False)
        # The DAWNBench entries scale the logits by 1/8 so that the initial loss is near log(classes).
        self.logit_scale = 0.125

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.prep(x))))
        return self.fc(torch.flatten(self.pool(x), 1)) * self.logit_scale


def resnet9(num_classes: int, in_channels: int, *, width: float, stem: str, zero_init_residual: bool,
            whiten: bool) -> nn.Module:
    """The registered ``resnet9``: :class:`ResNet9`."""
    return ResNet9(num_classes, in_channels, width, stem, zero_init_residual, whiten)


def torchvision_resnet(num_classes: int, in_channels: int, *, arch: str, stem: str,
                       zero_init_residual: bool) -> nn.Module:
    """The registered ``resnet18`` ... ``resnet152``: torchvision's ``arch``, its first convolution made for the
    stem (``cifar``: 3x3 stride 1, no max-pool) and the dataset's channels."""
    import torchvision  # 1.7 s: only for the torchvision ResNets

    model = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes,
                                              zero_init_residual=zero_init_residual)
    if stem == "cifar":
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    if model.conv1 is not None:
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


def build_model(model_cfg, num_classes: int, in_channels: int) -> nn.Module:
    """The network ``model.name`` names, sized for the dataset's classes and channels: a registered model, built
    with the ``model.*`` options it takes, or ``factory(num_classes, in_channels)`` of a user's import path (any
    failure to import, call it or get a torch.nn.Module is one line naming model.name)."""
    name = model_cfg.name
    kind = model_registry.MODELS.get(name)
    if kind is not None:
        options = {k: getattr(model_cfg, k) for k in kind.options}
        return kind.factory_function()(num_classes, in_channels, **options, **kind.fixed)
    net = model_registry.call_factory(name, model_registry.import_factory(name), num_classes, in_channels)
    if not isinstance(net, nn.Module):
        module, _, attr = name.partition(":")
        raise ConfigError(f"model.name {name!r}: {module}.{attr}({num_classes}, {in_channels}) returned a "
                          f"{type(net).__name__}, not a torch.nn.Module")
    return net


@torch.no_grad()
def init_whitening(net: nn.Module, batches) -> None:
    """Set a ``whiten`` ResNet9's first convolution from ``batches`` of images (N x C x H x W, normalized as
    training sees them): filters w_i = v_i / sqrt(lambda_i + eps) for the eigenpairs of the patches' covariance,
    then -w_i. The covariance is summed batch by batch (memory: one batch's patches, 100 MB for 500 RGB 32x32
    images in float64). Each eigenvector's sign is fixed (largest entry positive) so the filters do not depend
    on the solver's."""
    conv = net.prep[0]
    k, c = conv.kernel_size[0], conv.in_channels
    cov, n = torch.zeros(c * k * k, c * k * k, dtype=torch.float64), 0
    for images in batches:
        patches = F.unfold(images.double(), k).transpose(1, 2).reshape(-1, c * k * k)
        cov += patches.T @ patches
        n += patches.shape[0]
    eigenvalues, eigenvectors = torch.linalg.eigh(cov / n)
    signs = torch.sign(eigenvectors.gather(0, eigenvectors.abs().argmax(0, keepdim=True)))
    filters = (eigenvectors * signs).T / torch.sqrt(eigenvalues.clamp(min=0) + WHITEN_EPS)[:, None]
    filters = filters.reshape(-1, c, k, k)
    conv.weight.copy_(torch.cat([filters, -filters]).to(conv.weight.dtype))


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def model_summary(model: nn.Module, input_size: tuple[int, ...]) -> str:
    """A torchinfo summary (layers, output shapes, parameter counts, mult-adds) as text."""
    import torchinfo

    # torchinfo moves the model to ``device`` (in place); use the one it is on, so that summarising a model
    # on the GPU mid-training does not move it to the CPU.
    device = next(model.parameters(), torch.empty(0)).device
    stats = torchinfo.summary(model, input_size=input_size, verbose=0, device=device, mode="eval",
                              col_names=("output_size", "num_params", "mult_adds"))
    return str(stats)


TTA = ("none", "flip")  # evaluate.tta: test-time augmentation


def tta_logits(model: nn.Module, images: torch.Tensor, tta: str = "none") -> torch.Tensor:
    """The model's float32 logits for a batch, with test-time augmentation: ``"flip"`` averages each image's class
    probabilities with its horizontal mirror's (fastai's ``tta``) and returns their log. Evaluate, predict, the
    served model and the demo all score images through this one function (softmax of it: the probabilities)."""
    if tta not in TTA:
        raise ValueError(f"tta must be one of {TTA}, got {tta!r}")
    logits = model(images)
    if tta == "none":
        return logits.float()
    probs = (logits.float().softmax(1) + model(images.flip(3)).float().softmax(1)) / 2
    return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()
