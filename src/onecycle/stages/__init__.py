"""The commands, one module each: the DVC stages (``fetch``, ``lr_find``, ``train``, ``evaluate``) and
``predict``, ``promote``, ``tune``, ``demo``; ``command`` runs any of them (arguments, params, one-line errors).
A stage imports the layers below it and never another stage; ``onecycle.cli`` dispatches to them."""
