"""Training, without MLflow, paths or the cwd: the networks (``models``), device/precision/optimizer and one
step (``engine``), the One Cycle schedule's arithmetic (``schedule``), the epoch loop (``loop``) and the records
it leaves (``records``), weight averaging, checkpoints, resume rules, DDP, the LR range test (``rangetest``)
and its report's reader (``lr_report``). May import ``core``, ``data`` and ``onecycle.config``."""
