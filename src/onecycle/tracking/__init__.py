"""MLflow: where the store is (``store``, the one place ``mlflow`` is imported), what every run carries and how
it is logged (``runs``), the registry's aliases, version tags and versions (``registry``), the LR finder's own run
(``lr_find_run``) and what evaluate adds to the training's run (``evaluation``). May import ``core``, ``data``,
``training.records`` and ``onecycle.config``."""
