"""The bottom layer, used by every other: user-facing errors (``errors``), credential masking (``redact``),
atomic file writes (``files``), the workspace's artifact paths (``paths``), counts in words (``words``), what a
value must be where it goes (``values``), a validation error as one line (``validation``), the registries of
swappable parts (``registry``) and which model file an evaluation measured (``measured``).
Imports nothing else of onecycle, and no third-party package at load time."""
