"""A trained model, used: its file format (``modelfile``), from an image to class probabilities
(``inference``, ``preprocessing``), the served classifier (``classifier``) and its MLflow pyfunc wrapper
(``pyfunc_model``), the raw network train logs (``network``), the registered classifier the publish stage logs
(``publish``), the demo's web page (``demo_app``) and its Hugging Face Space (``space_export``). May import
``core``, ``data``, ``training`` and ``tracking``."""
