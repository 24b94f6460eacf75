"""Muon for the weight matrices and SGD for the rest, as one torch optimizer (``optimizer.name: muon``).

airbench94_muon trains CIFAR-10's convolution filters with Muon (momentum, then the update orthogonalized by a
Newton-Schulz iteration) and everything else with SGD-Nesterov. :class:`MuonSGD` does both in one
``torch.optim.Optimizer``, so the schedule (which sets every group's ``lr`` and ``momentum``), gradient scaling and
clipping, and checkpoints (one ``state_dict``) treat it like any other optimizer:

- A group with ``muon: True`` steps with ``torch.optim.Muon``'s update (its functional ``muon``, same
  coefficients, 5 Newton-Schulz steps, decoupled weight decay) at ``lr * lr_ratio``. ``torch.optim.Muon`` takes
  2-D parameters only: a convolution's ``(out, in, kh, kw)`` filters are updated as the ``(out, in * kh * kw)``
  matrix airbench flattens them to, and the momentum buffer is kept in that 2-D shape.
- Every other group steps as ``torch.optim.SGD`` (its functional ``sgd``: L2 weight decay in the gradient,
  Nesterov's momentum when ``nesterov``) at ``lr``.
"""

from __future__ import annotations

import torch
from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, DEFAULT_NS_STEPS, EPS, muon
from torch.optim.sgd import sgd

NS_COEFFICIENTS = (DEFAULT_A, DEFAULT_B, DEFAULT_C)


def muon_param_groups(groups: list[dict], lr_ratio: float) -> list[dict]:
    """``groups`` (the weight-decay groups) split into Muon groups, of every weight with 2 dimensions or more but
    the classifier head, and SGD groups of the rest (norms, biases, the head), each keeping its weight decay.

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
            matrix = p.reshape(p.shape[0], -1)  # a view of p when its memory allows, else a copy written back below
            muon([matrix], [grad], [state["momentum_buffer"]], lr=group["lr"] * group["lr_ratio"],
                 weight_decay=group["weight_decay"], momentum=group["momentum"], nesterov=group["nesterov"],
                 ns_coefficients=NS_COEFFICIENTS, ns_steps=DEFAULT_NS_STEPS, eps=EPS, adjust_lr_fn=None,
                 has_complex=False)
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
        sgd(params, grads, buffers, weight_decay=group["weight_decay"], momentum=group["momentum"], lr=group["lr"],
            dampening=0.0, nesterov=group["nesterov"], maximize=False)
        if group["momentum"] != 0:
            for p, buf in zip(params, buffers, strict=True):
                self.state[p]["momentum_buffer"] = buf

