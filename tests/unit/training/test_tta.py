"""Test-time augmentation (evaluate.tta: flip): each image's class probabilities averaged with its mirror's."""

from __future__ import annotations

import torch
from torch import nn

from onecycle.training.engine import evaluate


class Asymmetric(nn.Module):
    """Logits that depend on the left/right layout of the image, so a flip changes them."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_flip_tta_averages_the_probabilities_of_each_image_and_its_mirror():
    torch.manual_seed(0)
    model = Asymmetric()
    images, labels = torch.randn(10, 2, 4, 4), torch.randint(0, 3, (10,))
    loader = [(images[:6], labels[:6]), (images[6:], labels[6:])]
    plain = evaluate(model, loader, torch.device("cpu"), None, collect=True)
    tta = evaluate(model, loader, torch.device("cpu"), None, collect=True, tta="flip")
    with torch.no_grad():
        expected = (model(images).softmax(1) + model(images.flip(3)).softmax(1)) / 2
    torch.testing.assert_close(tta["logits"].exp(), expected)
    assert tta["top1"] == (expected.argmax(1) == labels).sum().item() / 10
    assert abs(tta["loss"] - nn.functional.nll_loss(expected.log(), labels).item()) < 1e-5
    assert not torch.allclose(plain["logits"].softmax(1), expected)  # the flip mattered for this model
    torch.testing.assert_close(plain["logits"], model(images).detach())  # tta="none" is the plain pass
