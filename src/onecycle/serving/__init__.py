"""A trained model, used: its file format (``modelfile``), from an image to class probabilities
(``inference``, ``preprocessing``), the served classifier (``classifier``) and its MLflow pyfunc wrapper
(``pyfunc_model``), the raw network train logs (``network``) and the registered classifier the publish stage logs
(``publish``). May import ``core``, ``data``, ``training`` and ``tracking``."""
