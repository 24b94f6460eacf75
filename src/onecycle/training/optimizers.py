"""The optimizers (``optimizer.name``): each a function that builds a torch optimizer from parameter groups, the
starting LR and the ``optimizer`` section, registered in :data:`OPTIMIZERS`, whose names are the values the config
accepts. Each entry also says which of its settings the schedule cycles as momentum (SGD's momentum, Adam's beta1).

``muon`` (:mod:`onecycle.training.muon`) is one optimizer with two kinds of group: Muon for the conv and hidden
linear weights at ``optimizer.muon_lr_ratio`` x the schedule's LR, SGD for the rest at the schedule's LR. The
schedule sets one LR and one momentum for every group (the ratio applies inside the step), so the LR range test
sweeps both kinds together and its suggestion is the SGD groups' peak LR, with the Muon groups at the ratio x it.

Adding an optimizer is one function here, decorated with ``@optimizer("name")``, and its test. torch is imported
inside the builders, so params load without it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from onecycle.core.registry import Registry

Builder = Callable[[list[dict], float, Any], Any]  # (param groups, lr, optimizer section) -> torch optimizer


@dataclass(frozen=True)
class OptimizerEntry:
    """A registered optimizer: its builder, and the momentum it starts with (what a schedule that does not cycle
    momentum leaves in place)."""

    build: Builder
    momentum: Callable[[Any], float]


OPTIMIZERS: Registry[OptimizerEntry] = Registry("optimizer.name")


def optimizer(name: str, momentum: Callable[[Any], float]) -> Callable[[Builder], Builder]:
    """Decorator: register the decorated ``build(groups, lr, cfg)`` as ``optimizer.name: name``."""
    def add(build: Builder) -> Builder:
        OPTIMIZERS.register(name)(OptimizerEntry(build, momentum))
        return build

    return add


def _sgd_momentum(cfg) -> float:
    return cfg.momentum


def _beta1(cfg) -> float:
    return cfg.betas[0]


@optimizer("sgd", momentum=_sgd_momentum)
def sgd(groups: list[dict], lr: float, cfg):
    """SGD with ``momentum`` (Nesterov's when ``nesterov`` and momentum > 0)."""
    import torch

    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)


@optimizer("adam", momentum=_beta1)
def adam(groups: list[dict], lr: float, cfg):
    """Adam with ``betas`` (its weight decay is L2 in the gradient)."""
    import torch

    return torch.optim.Adam(groups, lr=lr, betas=cfg.betas)


@optimizer("adamw", momentum=_beta1)
def adamw(groups: list[dict], lr: float, cfg):
    """AdamW with ``betas`` (decoupled weight decay)."""
    import torch

    return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas)


@optimizer("muon", momentum=_sgd_momentum)
def muon(groups: list[dict], lr: float, cfg):
    """Muon (``torch.optim.Muon``'s update, conv filters flattened to matrices) for the weights of 2 dimensions or
    more but the classifier head, at ``muon_lr_ratio`` x lr; SGD (Nesterov's when ``nesterov``) for the rest; both
    with ``momentum``."""
    from onecycle.training.muon import MuonSGD, muon_param_groups

    return MuonSGD(muon_param_groups(groups, cfg.muon_lr_ratio), lr=lr, momentum=cfg.momentum,
                   nesterov=cfg.nesterov and cfg.momentum > 0)
