"""A comment-preserving params.yaml editor: ``onecycle tune --apply`` writes the chosen trial's values with it.

Only the given dotted keys change; comments, order and formatting stay, the write is atomic, and nothing
is written unless the result reads back with the same values. Which trial: the best (one objective), the best score
on the Pareto front (several), or with ``--target`` the cheapest trial whose score reached it
(:mod:`onecycle.tuning.objectives`). With several objectives or a target the trial's ``train.epochs`` is written
too: its score and cost were measured in that many epochs.
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


def apply_chosen(study, params, goals, path: Path, target: float | None) -> str:
    """``--apply [--target T]``: write the chosen trial's values into the params file at ``path``; the line that says
    which trial, its score and cost, and what changed. OneCycleError in one line when there is no such trial."""
    from onecycle.tuning.objectives import COST_ATTRS, best_scoring, cheapest_reaching, cost_of, describe
    from onecycle.tuning.report import best_values

    if target is None:
        trial = best_scoring(study, goals)
        if trial is None:
            raise OneCycleError(f"--apply: study {study.study_name} has no complete trial yet")
        why = "the best trial" if len(goals) == 1 else f"the best {goals[0].metric} on the Pareto front"
    else:
        trial = cheapest_reaching(study, goals, target)
        why = (f"the cheapest by {cost_of(trial, goals)[0]} whose {goals[0].metric} reached "
               f"{'>=' if goals[0].maximize else '<='} {target:g}")
    values = best_values(params, trial)
    if len(goals) > 1 or target is not None:
        epochs = trial.user_attrs.get(COST_ATTRS["train/epochs"])
        values.setdefault("train.epochs", int(epochs) if epochs is not None else params.tune.epochs)
    cost_txt = ""
    if len(goals) == 1 and target is not None:
        name, cost = cost_of(trial, goals)
        cost_txt = f", {name} {cost:.1f}"
    changed = apply_best(Path(path), values)
    return (f"--apply{f' --target {target:g}' if target is not None else ''}: trial {trial.number}, {why}: "
            f"{describe(goals, trial.values)}{cost_txt}; wrote {len(changed)} key(s) into {path}"
            + (": " + "; ".join(changed) if changed else " (already these values)"))
