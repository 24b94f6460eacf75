"""A trained model, used: its file format (``modelfile``), from an image to class probabilities
(``inference``), the served classifier (``classifier``) and its MLflow pyfunc wrapper (``pyfunc_model``),
and how train logs and registers it (``publish``). May import ``core``, ``data``, ``training`` and
``tracking``."""
