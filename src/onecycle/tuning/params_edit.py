"""A comment-preserving params.yaml editor: ``onecycle tune --apply`` writes the best values with it.

Only the given dotted keys change; comments, order and formatting stay, the write is atomic, and nothing
is written unless the result reads back with the same values.
"""

from __future__ import annotations

import io
import stat
from pathlib import Path
from typing import Any

from onecycle.core.errors import OneCycleError
from onecycle.core.files import atomic_write_text


def _yaml_rt(text: str):
    """A ruamel round-trip YAML that keeps ``text``'s indentation and writes values PyYAML reads back alike."""
    import yaml as pyyaml
    from ruamel.yaml import YAML
    from ruamel.yaml.util import load_yaml_guess_indent

    _, indent, block_seq_indent = load_yaml_guess_indent(text)
    rt = YAML()
    rt.preserve_quotes = True
    rt.width = 4096
    rt.indent(mapping=indent or 2, sequence=indent or 2, offset=block_seq_indent or 0)
    rt.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    # PyYAML's form (1.0e-05, not 1e-05, which a YAML 1.1 reader, PyYAML, would read as a string)
    rt.representer.add_representer(float, lambda r, v: r.represent_scalar(
        "tag:yaml.org,2002:float", pyyaml.safe_dump(v).splitlines()[0]))
    return rt


def apply_best(path: Path, values: dict[str, Any]) -> list[str]:
    """Write ``values`` (dotted keys) into the params file at ``path``, changing only those keys and keeping
    comments, order and formatting; atomically, and only if the result loads with the same values."""
    from onecycle.config import parse_params, read_yaml

    text = path.read_text()
    rt = _yaml_rt(text)
    doc = rt.load(text)
    if doc is None:
        from ruamel.yaml.comments import CommentedMap

        doc = CommentedMap()
    changed = []
    for key, value in values.items():
        section, field = key.split(".", 1)
        if doc.get(section) is None:
            from ruamel.yaml.comments import CommentedMap

            doc[section] = CommentedMap()
        old = doc[section].get(field)
        if old != value or field not in doc[section]:
            doc[section][field] = value
            changed.append(f"{key}: {old} -> {value}")
    buf = io.StringIO()
    rt.dump(doc, buf)
    new_text = buf.getvalue()
    reread = parse_params(read_yaml(path, new_text)).flat()  # as load_params and DVC read it
    wrong = [k for k, v in values.items() if reread.get(k) != v]
    if wrong:
        raise OneCycleError(f"--apply: {path} would not read back {wrong[0]} = {values[wrong[0]]!r}; not written")
    if changed:
        atomic_write_text(path, new_text, mode=stat.S_IMODE(path.stat().st_mode))  # params.yaml keeps its mode
    return changed
