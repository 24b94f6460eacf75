"""The optimizers (``optimizer.name``): each a function that builds a torch optimizer from parameter groups, the
starting LR and the ``optimizer`` section, registered in :data:`OPTIMIZERS`, whose names are the values the config
accepts. Each entry also says which of its settings the schedule cycles as momentum (SGD's momentum, Adam's beta1).

``muon`` is airbench94_muon's pairing as one torch optimizer (:func:`muon_sgd`), so the schedule, gradient scaling
and clipping, and checkpoints (one ``state_dict``) treat it like any other: Muon (``torch.optim.Muon``'s update) for
the conv and hidden linear weights at ``optimizer.muon_lr_ratio`` x the schedule's LR, SGD for the rest (norms,
biases, the classifier head) at the schedule's LR. The schedule sets one LR and one momentum for every group (the
ratio applies inside the step), so the LR range test sweeps both kinds together and its suggestion is the SGD
groups' peak LR, with the Muon groups at the ratio x it.

Adding an optimizer is one function here, decorated with ``@optimizer("name")``, and its test. torch is imported
inside the builders, so params load without it.
"""

from __future__ import annotations

import functools
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
    return muon_sgd()(muon_param_groups(groups, cfg.muon_lr_ratio), lr=lr, momentum=cfg.momentum,
                      nesterov=cfg.nesterov and cfg.momentum > 0)


def muon_param_groups(groups: list[dict], lr_ratio: float) -> list[dict]:
    """``groups`` (the weight-decay groups) split into Muon groups (``muon: True``) of every weight with 2 dimensions
    or more but the classifier head, and SGD groups of the rest (norms, biases, the head), each keeping its decay.

    The head is the last such weight in parameter order: every built-in model (and torchvision's) registers it
    last. It stays with SGD, as in airbench94_muon and as ``torch.optim.Muon``'s documentation advises.
    """
    matrices = [p for g in groups for p in g["params"] if p.ndim >= 2]
    head = matrices[-1] if matrices else None
    out = []
    for group in groups:
        is_muon = [p.ndim >= 2 and p is not head for p in group["params"]]
        muon_params = [p for p, m in zip(group["params"], is_muon, strict=True) if m]
        rest = [p for p, m in zip(group["params"], is_muon, strict=True) if not m]
        if muon_params:
            out.append({**group, "params": muon_params, "muon": True, "lr_ratio": lr_ratio})
        if rest:
            out.append({**group, "params": rest, "muon": False, "lr_ratio": 1.0})
    return out


@functools.cache
def muon_sgd() -> type:
    """The ``muon`` optimizer class, made on first use (torch is imported then): ``MuonSGD(groups, lr, momentum,
    nesterov)`` steps a group marked ``muon: True`` with ``torch.optim.Muon``'s update (its functional ``muon``: the
    same coefficients, 5 Newton-Schulz steps, decoupled weight decay) at ``lr * lr_ratio``, every other group as
    ``torch.optim.SGD`` (its functional ``sgd``: L2 weight decay in the gradient) at ``lr``.

    ``torch.optim.Muon`` takes 2-D parameters only: a convolution's ``(out, in, kh, kw)`` filters are updated as the
    ``(out, in * kh * kw)`` matrix airbench flattens them to (written back into the weight, whatever its memory
    format), and their momentum buffer is kept in that shape.
    """
    import torch
    from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, DEFAULT_NS_STEPS, EPS
    from torch.optim._muon import muon as muon_update
    from torch.optim.sgd import sgd as sgd_update

    class MuonSGD(torch.optim.Optimizer):
        """Muon for the groups marked ``muon: True`` (at ``lr * lr_ratio``), SGD for the others (at ``lr``)."""

        def __init__(self, groups: list[dict], lr: float, momentum: float, nesterov: bool):
            defaults = {"lr": lr, "momentum": momentum, "nesterov": nesterov, "weight_decay": 0.0, "muon": False,
                        "lr_ratio": 1.0}
            super().__init__(groups, defaults)

        @torch.no_grad()
        def step(self, closure=None):
            """One step of every group (Muon's or SGD's); ``closure`` re-evaluates the loss, as torch's optimizers."""
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            for group in self.param_groups:
                if group["muon"]:
                    self._muon_step(group)
                else:
                    self._sgd_step(group)
            return loss

        def _muon_step(self, group: dict) -> None:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.reshape(p.shape[0], -1)  # the filters as one matrix (a copy for channels_last)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(grad, memory_format=torch.contiguous_format)
                matrix = p.reshape(p.shape[0], -1)  # a view of p when its memory allows, else a copy written back
                muon_update([matrix], [grad], [state["momentum_buffer"]], lr=group["lr"] * group["lr_ratio"],
                            weight_decay=group["weight_decay"], momentum=group["momentum"],
                            nesterov=group["nesterov"], ns_coefficients=(DEFAULT_A, DEFAULT_B, DEFAULT_C),
                            ns_steps=DEFAULT_NS_STEPS, eps=EPS, adjust_lr_fn=None, has_complex=False)
                if matrix.untyped_storage().data_ptr() != p.untyped_storage().data_ptr():
                    p.copy_(matrix.view(p.shape))

        def _sgd_step(self, group: dict) -> None:
            params, grads, buffers = [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                params.append(p)
                grads.append(p.grad)
                if group["momentum"] != 0:
                    buffers.append(self.state[p].get("momentum_buffer"))
            if not params:
                return
            sgd_update(params, grads, buffers, weight_decay=group["weight_decay"], momentum=group["momentum"],
                       lr=group["lr"], dampening=0.0, nesterov=group["nesterov"], maximize=False)
            if group["momentum"] != 0:
                for p, buf in zip(params, buffers, strict=True):
                    self.state[p]["momentum_buffer"] = buf

    return MuonSGD
