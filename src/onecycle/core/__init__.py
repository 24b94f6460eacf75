"""The bottom layer, used by every other: user-facing errors (``errors``), credential masking (``redact``),
atomic file writes (``files``), the workspace's artifact paths (``paths``) and counts in words (``words``).
Imports nothing else of onecycle, and no third-party package at load time."""
