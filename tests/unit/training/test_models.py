"""The ResNet family: parameter counts, stems, input channels, zero-init residuals and the summary."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from onecycle.config import ModelConfig
from onecycle.training.models import ResNet9, build_model, count_parameters, model_summary


def record_shape(module: nn.Module, seen: dict, key: str) -> None:
    """Store the module's output shape in seen[key] on the next forward (the hook returns None: output kept)."""
    def hook(m, inputs, output):
        seen[key] = tuple(output.shape)

    module.register_forward_hook(hook)


def build(name: str, num_classes: int = 10, in_channels: int = 3, **kw) -> nn.Module:
    kw.setdefault("width", 1.0)  # the published architectures (params.yaml's default is a quarter width)
    torch.manual_seed(0)
    return build_model(ModelConfig(name=name, **kw), num_classes=num_classes, in_channels=in_channels)


@pytest.mark.parametrize(("name", "params"), [("resnet18", 11_689_512), ("resnet50", 25_557_032)])
def test_torchvision_resnets_with_the_imagenet_stem_have_the_published_size(name, params):
    model = build(name, num_classes=1000, in_channels=3, stem="imagenet")
    assert count_parameters(model) == params


def resnet9_params(width: float, in_channels: int, num_classes: int, whiten: bool = False) -> int:
    """Conv weights (no bias) + BatchNorm weight and bias of every conv, + the bias-free linear layer; with
    ``whiten`` the prep conv has 2 x 9 x in_channels filters and they are frozen (not trainable parameters)."""
    c0, c1, c2, c3 = (max(1, round(w * width)) for w in (64, 128, 256, 512))
    if whiten:
        c0 = 18 * in_channels
    convs = [(in_channels, c0), (c0, c1), (c1, c1), (c1, c1), (c1, c2), (c2, c3), (c3, c3), (c3, c3)]
    frozen = 9 * in_channels * c0 if whiten else 0
    return sum(9 * a * b + 2 * b for a, b in convs) + c3 * num_classes - frozen


@pytest.mark.parametrize("whiten", [False, True])
@pytest.mark.parametrize("width", [0.25, 1.0])
@pytest.mark.parametrize(("in_channels", "size"), [(1, 28), (3, 32)])
def test_resnet9_shapes_and_size(width, in_channels, size, whiten):
    model = build("resnet9", num_classes=10, in_channels=in_channels, width=width, whiten=whiten).eval()
    assert count_parameters(model) == resnet9_params(width, in_channels, 10, whiten)
    assert model.fc.in_features == round(512 * width)
    with torch.no_grad():
        out = model(torch.randn(2, in_channels, size, size))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_resnet9_width_1_is_the_dawnbench_network():
    assert count_parameters(ResNet9(10, 3, 1.0)) == 6_573_120


def test_cifar_stem_is_a_3x3_stride_1_conv_without_maxpool():
    model = build("resnet18", stem="cifar")
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1) and model.conv1.padding == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    seen = {}
    record_shape(model.layer4, seen, "layer4")
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert seen["layer4"] == (2, 512, 4, 4)  # 32 / 8: only layers 2-4 downsample


def test_imagenet_stem_is_torchvisions():
    model = build("resnet18", stem="imagenet")
    assert model.conv1.kernel_size == (7, 7) and model.conv1.stride == (2, 2)
    assert isinstance(model.maxpool, nn.MaxPool2d)


@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
def test_resnet18_takes_one_channel(stem):
    model = build("resnet18", in_channels=1, stem=stem).eval()
    assert model.conv1.in_channels == 1
    with torch.no_grad():
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_resnet9_imagenet_stem_downsamples_by_4_first():
    model = ResNet9(10, 3, 0.25, stem="imagenet").eval()
    seen = {}
    record_shape(model.prep, seen, "prep")
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 10)
    assert seen["prep"] == (1, 16, 56, 56)


def test_zero_init_residual_zeroes_the_last_bn_of_each_residual():
    r18 = build("resnet18", zero_init_residual=True)
    blocks = [b for layer in (r18.layer1, r18.layer2, r18.layer3, r18.layer4) for b in layer]
    assert len(blocks) == 8 and all(b.bn2.weight.abs().sum() == 0 for b in blocks)
    assert all(b.bn1.weight.abs().sum() > 0 for b in blocks)
    r50 = build("resnet50", zero_init_residual=True)
    blocks = [b for layer in (r50.layer1, r50.layer2, r50.layer3, r50.layer4) for b in layer]
    assert len(blocks) == 16 and all(b.bn3.weight.abs().sum() == 0 for b in blocks)
    assert all(b.bn2.weight.abs().sum() > 0 for b in blocks)
    r9 = build("resnet9", zero_init_residual=True, width=0.25)
    residuals = [r9.layer1[2], r9.layer3[2]]
    assert all(r.res2[1].weight.abs().sum() == 0 and r.res1[1].weight.abs().sum() > 0 for r in residuals)
    x = torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        assert torch.equal(residuals[0].eval()(x), x)  # a zero-initialized residual block starts as the identity


def test_without_zero_init_the_residual_bn_weights_are_one():
    r9 = build("resnet9", width=0.25)
    assert torch.all(r9.layer1[2].res2[1].weight == 1)
    r18 = build("resnet18")
    assert torch.all(r18.layer1[0].bn2.weight == 1)


def test_model_summary_reports_sizes_and_leaves_the_model_as_it_was():
    model = build("resnet9", in_channels=1, width=0.25).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    text = model_summary(model, (2, 1, 28, 28))
    assert "Total params" in text and f"{count_parameters(model):,}" in text
    assert "[2, 10]" in text  # the output shape
    assert model.training
    after = model.state_dict()
    for key, value in before.items():  # BN running stats (and weights) untouched
        assert torch.equal(value, after[key]), key


def test_model_summary_keeps_the_model_on_its_device():
    # torchinfo moves the model to the device it is given; a model on the GPU must stay there. The meta device
    # stands in for the GPU on a CPU-only machine (moving a meta model to the CPU fails).
    with torch.device("meta"):
        model = ResNet9(10, 1, 0.25)
    text = model_summary(model, (1, 1, 28, 28))
    assert "Total params" in text
    assert {p.device.type for p in model.parameters()} == {"meta"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_model_summary_keeps_a_cuda_model_on_the_gpu():
    model = ResNet9(10, 1, 0.25).cuda()
    model_summary(model, (1, 1, 28, 28))
    assert {p.device.type for p in model.parameters()} == {"cuda"}
