"""Optuna around the training: the search-space language of ``tune.space`` (``space``), storages, samplers,
pruners and studies (``studies``), the journal file guarded against torn records (``journal``), the study's plots
(``plots``), and writing the best values back into params.yaml (``params_edit``). May import ``core``, ``training``
and ``onecycle.config``."""
