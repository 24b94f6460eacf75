"""Optuna around the training: the search-space language of ``tune.space`` (``space``), what a study optimizes
and which trial a user takes, its Pareto front and ``--target`` included (``objectives``), one trial
(``objective``), ``-S`` overrides (``overrides``), storages, samplers, pruners and studies (``studies``), the journal
file guarded against torn records (``journal``), the reports and plots (``report``, ``plots``), reproducing a trial
(``reproduce``), and writing the chosen values back into params.yaml (``params_edit``). May import ``core``,
``training``, ``tracking`` and ``onecycle.config``."""
