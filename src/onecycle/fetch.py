"""fetch stage: put ``data.dataset`` into ``data/<dataset>/`` in a fast-to-load, checksummed form."""

from __future__ import annotations

from .cli import run_command
from .data import fetch


def _run(params, args) -> int:
    out, wrote = fetch(params.data)
    from .data import load_info

    info = load_info(params.data)
    state = "fetched" if wrote else "up to date:"
    print(f"{state} {info.name} -> {out} ({info.num_train} train / {info.num_test} test images, "
          f"{info.num_classes} classes, {'x'.join(map(str, info.image_shape))}, from {info.source})")
    return 0


def main(argv=None) -> int:
    return run_command("fetch", __doc__, argv, _run)


if __name__ == "__main__":
    raise SystemExit(main())
