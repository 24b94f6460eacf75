"""MLflow: where the store is (``store``, the one place ``mlflow`` is imported), what every run carries and how
it is logged (``runs``), and the registry's aliases and version tags (``registry``). May import ``core``,
``data``, ``training.records`` and ``onecycle.config``."""
