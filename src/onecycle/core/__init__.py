"""The bottom layer, used by every other: user-facing errors (``errors``), credential masking (``redact``),
atomic file writes (``files``) and the workspace's artifact paths (``paths``). Imports nothing else of
onecycle, and no third-party package at load time."""
