"""fetch stage: put ``data.dataset`` into ``data/<dataset>/`` in a fast-to-load, checksummed form.

The work is :func:`onecycle.data.fetchers.fetch`'s; this module is the command around it, and says when an
image folder lies where ``dvc repro`` cannot see images being added.
"""

from __future__ import annotations

from pathlib import Path

from onecycle.core.words import count
from onecycle.data import catalog
from onecycle.data.fetchers import fetch
from onecycle.data.store import load_info
from onecycle.stages.command import run_command

# dvc.yaml's fetch stage depends on this folder: image folders under it are re-indexed by `dvc repro`
# when images are added or removed (DVC cannot depend on a folder that only some configs name).
WATCHED_IMAGES = Path("images")


def _run(params, args) -> int:
    out, wrote = fetch(params.data)
    info = load_info(params.data)
    state = "fetched" if wrote else "up to date:"
    print(f"{state} {info.name} -> {out} ({info.num_train} train / {count(info.num_test, 'test image')}, "
          f"{count(info.num_classes, 'class', 'classes')}, {'x'.join(map(str, info.image_shape))}, from {info.source})")
    watched = WATCHED_IMAGES.resolve()
    source = Path(info.source)
    if catalog.kind(params.data.dataset).image_folder and watched != source and watched not in source.parents:
        print(f"note: {source} is outside {WATCHED_IMAGES}/, so `dvc repro` does not see images added there; "
              f"move it under {WATCHED_IMAGES}/ or run `dvc repro -f fetch` after changing it")
    return 0


def main(argv=None) -> int:
    return run_command("fetch", __doc__.splitlines()[0], argv, _run)


if __name__ == "__main__":
    raise SystemExit(main())
