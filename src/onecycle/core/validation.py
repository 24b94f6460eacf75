"""A pydantic validation error as one line a params.yaml author reads: the dotted key, what it must be, what it got,
and for an unknown key the closest allowed one. Imports pydantic only when called."""

from __future__ import annotations

import difflib
from typing import Any

# What a value must be, per pydantic error type, in words a params.yaml author uses.
_NOUNS = {
    "int_parsing": "an integer", "int_type": "an integer", "int_from_float": "a whole number",
    "float_parsing": "a number", "float_type": "a number", "finite_number": "a finite number",
    "bool_parsing": "true or false", "bool_type": "true or false", "string_type": "a string",
    "list_type": "a list", "tuple_type": "a list", "dict_type": "a mapping", "model_type": "a mapping",
    "model_attributes_type": "a mapping", "none_required": "null",
}


def _walk_loc(loc: tuple[Any, ...], root) -> tuple[str, Any]:
    """(dotted key, the section model holding its last part) of a pydantic error location.

    pydantic adds union members ("float", "literal['auto']", "dict[str,any]") to the location; they are
    not keys, so only field names (and unknown keys, for extra_forbidden) and list indices are kept.
    """
    from pydantic import BaseModel

    key, model, parent = "", root, None
    for part in loc:
        if isinstance(part, int):
            key += f"[{part}]"
            model = None
            continue
        fields = getattr(model, "model_fields", None) if isinstance(model, type) else None
        if fields is None:
            continue  # a union member tag below a leaf field
        key = f"{key}.{part}" if key else str(part)
        parent = model
        ann = fields[part].annotation if part in fields else None
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return key, parent


def _num(x: Any) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def describe_errors(errors: list[dict[str, Any]], root) -> str:
    """One line for the first of a pydantic validation's ``errors`` of the ``root`` model, naming its dotted key the way
    params.yaml spells it."""
    err = errors[0]
    key, parent = _walk_loc(err["loc"], root)
    kind = err["type"]
    got = err.get("input")
    ctx = err.get("ctx") or {}
    if kind == "extra_forbidden":
        where, _, name = key.rpartition(".")
        allowed = list(getattr(parent, "model_fields", {}))
        close = difflib.get_close_matches(name, allowed, n=1, cutoff=0.6)
        hint = f"; did you mean {where + '.' if where else ''}{close[0]}?" if close else ""
        return f"unknown key {key}{hint} (allowed in {where or 'the top level'}: {', '.join(allowed)})"
    if kind == "value_error":
        msg = " ".join(str(ctx.get("error", err["msg"])).split())
        head = msg.split(" ", 1)[0].rstrip(":")
        if "." in head and head.split(".")[0] in root.model_fields:
            return head + msg[len(msg.split(" ", 1)[0]):]  # the validator already named the key
        return f"{key} {msg}".strip()
    # A union (e.g. max_lr: number | auto) fails once per member, at the same key: list them all.
    nouns = []
    for e in errors:
        if _walk_loc(e["loc"], root)[0] != key:
            continue
        if e["type"] == "literal_error":
            # pydantic writes the choices as Python ("False or 'auto'"); YAML spells booleans lower case.
            choices = str((e.get("ctx") or {}).get("expected", "")).replace(" or ", ", ")
            choices = choices.replace("False", "false").replace("True", "true")
            nouns.append(f"one of {choices}" if ", " in choices else choices)
        elif e["type"] in _NOUNS:
            nouns.append(_NOUNS[e["type"]])
        else:
            nouns = []
            break
    if nouns:
        if len(nouns) == 1 and kind == "literal_error":
            return f"{key} must be {nouns[0]}; got {got!r}"
        return f"{key} must be {' or '.join(dict.fromkeys(nouns))}, got {got!r}"
    bounds = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
    if kind in bounds:
        limit = next(iter(v for k, v in ctx.items() if k in ("gt", "ge", "lt", "le")), "")
        return f"{key} must be {bounds[kind]} {_num(limit)}, got {got!r}"
    if kind == "missing":
        return f"{key} is required"
    return f"{key}: {err['msg'][0].lower()}{err['msg'][1:]}, got {got!r}"
