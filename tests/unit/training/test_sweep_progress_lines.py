"""Without a terminal (no progress bar), the LR range test prints a line a fifth of the way through its sweep."""

from __future__ import annotations

import itertools

import torch

from onecycle.config import LRFindConfig
from onecycle.training.rangetest import fitted_num_iter, range_test


def _sweep(progress: bool):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = itertools.repeat((torch.zeros(1, 2), torch.zeros(1, dtype=torch.long)))
    losses = iter(2.0 - 0.01 * i for i in range(100))
    return range_test(model, optimizer, batches, lambda x, y: next(losses), LRFindConfig(num_iter=20),
                      progress=progress)


def test_a_sweep_without_a_terminal_prints_a_line_every_fifth_of_its_steps(capsys):
    _sweep(progress=True)  # pytest's captured stdout is no terminal: tqdm draws nothing
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split(":")[1] for ln in lines] == [" step 4 of 20", " step 8 of 20", " step 12 of 20", " step 16 of 20"]
    assert all(ln.startswith("lr_find: step ") and ", smoothed loss " in ln for ln in lines)


def test_no_lines_when_progress_is_off(capsys):
    _sweep(progress=False)
    assert capsys.readouterr().out == ""


def test_the_sweep_is_capped_to_four_passes_over_small_data_and_never_below_ten_steps():
    assert fitted_num_iter(30, 215) == 30  # Fashion-MNIST: 215 batches an epoch, the sweep as asked
    assert fitted_num_iter(30, 5) == 20  # a small folder: 5 batches an epoch, 4 passes
    assert fitted_num_iter(30, 1) == 10  # one batch an epoch: lr_find.num_iter's least
