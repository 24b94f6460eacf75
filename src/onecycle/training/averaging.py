"""Weight averaging during the One Cycle run: airbench's lookahead and an exponential moving average (EMA).

Both keep a second copy of the network's floating-point state (parameters and BatchNorm running statistics)
and move it towards the trained weights after optimizer steps; ``finish`` copies the averaged state into
the network once the last step has run, so the final epoch's validation, the best checkpoint and the saved
model are the averaged network.

- ``lookahead`` (airbench94): every ``LOOKAHEAD_EVERY`` steps the slow copy moves towards the fast weights
  by ``1 - decay`` and the fast weights restart from it; ``decay`` grows as ``0.95**5 * (t / T)**3`` (t the
  step, T the run's steps), so it does nothing early and averages strongly at the end of the cycle.
- ``ema``: after every step the average moves towards the weights by ``1 - decay``, with decay warmed up as
  ``min(ema_decay, (1 + t) / (10 + t))`` so early weights do not linger; the network keeps training on its
  own weights.

The state round-trips through ``state_dict`` (checkpoints), so a resumed run averages exactly as one that
never stopped.
"""

from __future__ import annotations

import torch
from torch import nn

LOOKAHEAD_EVERY = 5  # optimizer steps between lookahead updates (airbench94)
LOOKAHEAD_DECAY = 0.95 ** 5  # the slow weights' decay at the end of the run


class WeightAverage:
    """The averaged copy of ``net``'s floating-point state; ``kind`` is ``lookahead`` or ``ema``."""

    def __init__(self, net: nn.Module, kind: str, total_steps: int, ema_decay: float = 0.0):
        if kind not in ("lookahead", "ema"):
            raise ValueError(f"unknown weight average {kind!r}")
        self.kind, self.total_steps, self.ema_decay = kind, max(1, int(total_steps)), float(ema_decay)
        floats = {k: v for k, v in net.state_dict().items() if v.is_floating_point()}
        self.names = list(floats)
        # state_dict's tensors share storage with the parameters and buffers (loading a checkpoint copies into
        # them in place), so these views stay live: no state_dict() per optimizer step
        self.live = list(floats.values())
        self.average = [v.detach().clone() for v in self.live]

    @torch.no_grad()
    def update(self, steps_done: int) -> None:
        """Call after each optimizer step; ``steps_done`` counts the steps of the whole run so far (1 = first)."""
        if self.kind == "lookahead":
            if steps_done % LOOKAHEAD_EVERY:
                return
            decay = LOOKAHEAD_DECAY * (steps_done / self.total_steps) ** 3
            torch._foreach_lerp_(self.average, self.live, 1.0 - decay)
            torch._foreach_copy_(self.live, self.average)  # the fast weights restart from the slow ones
        else:
            decay = min(self.ema_decay, (1 + steps_done) / (10 + steps_done))
            torch._foreach_lerp_(self.average, self.live, 1.0 - decay)

    @torch.no_grad()
    def finish(self) -> None:
        """After the run's last step: the network takes the averaged weights."""
        torch._foreach_copy_(self.live, self.average)

    def state_dict(self) -> dict:
        return {"kind": self.kind, "names": list(self.names), "average": [a.clone() for a in self.average]}

    def load_state_dict(self, state: dict) -> None:
        if state["kind"] != self.kind or list(state["names"]) != self.names:
            raise ValueError("the checkpoint's weight average does not match this configuration")
        torch._foreach_copy_(self.average, list(state["average"]))


def build_average(train_cfg, net: nn.Module, total_steps: int) -> WeightAverage | None:
    """The weight average ``train.average`` asks for, or None."""
    if train_cfg.average == "none":
        return None
    return WeightAverage(net, train_cfg.average, total_steps, train_cfg.ema_decay)
