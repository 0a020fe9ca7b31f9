"""The shape of a training recipe: every section a mapping, every key one the trainer knows,
of the type of its default. A mistyped YAML file then fails with a message naming the file,
the key and what was expected, instead of a TypeError or AttributeError deep in the trainer.

Only types are checked here; the values' ranges are checked where they are used.
"""

from __future__ import annotations

import os
from dataclasses import MISSING, fields

# keys whose default (None) does not say what they take; None stays allowed (optim.trainable
# has a check of its own in load_config)
_NULLABLE_KINDS = {
    "model.checkpoint": "path",
    "model.config": "mapping",
    "model.warm_start": "path",
    "optim.encoder_lr": "number",
    "train.threads": "integer",
    "data.synthetic.overlap": "number",
    "data.synthetic.edge_level": "list",
    "data.synthetic.elongation": "number",
}
# keys read with a default of their own rather than from DEFAULTS
_EXTRA_KEYS = {"val": {"source": "synthetic"}}

_KINDS = {
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "integer": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "number": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    "string": (lambda v: isinstance(v, str), "a string"),
    "path": (lambda v: isinstance(v, (str, os.PathLike)), "a file path"),
    "list": (lambda v: isinstance(v, (list, tuple)), "a list"),
    "mapping": (lambda v: isinstance(v, dict), "a mapping"),
}


def _kind_of(default) -> str | None:
    if isinstance(default, bool):
        return "bool"
    if isinstance(default, int):
        return "integer"
    if isinstance(default, float):
        return "number"
    if isinstance(default, str):
        return "string"
    if isinstance(default, (list, tuple)):
        return "list"
    if isinstance(default, dict):
        return "mapping"
    return None


def dataclass_defaults(cls) -> dict:
    """Field name -> default value of a config dataclass."""
    out = {}
    for f in fields(cls):
        if f.default is not MISSING:
            out[f.name] = f.default
        elif f.default_factory is not MISSING:
            out[f.name] = f.default_factory()
        else:
            out[f.name] = None
    return out


def _section_schemas(defaults: dict) -> dict[str, dict]:
    """Dotted section name -> {key: default} for every section whose keys are known."""
    from .adversaries import AdversaryConfig
    from .data import DataConfig
    from .losses import LossConfig
    from .prompts import PromptConfig
    from .synthetic import SynthConfig

    schemas = {k: {**v, **_EXTRA_KEYS.get(k, {})} for k, v in defaults.items() if isinstance(v, dict) and v}
    schemas["data"] = dataclass_defaults(DataConfig)
    schemas["data.synthetic"] = dataclass_defaults(SynthConfig)
    schemas["data.prompts"] = dataclass_defaults(PromptConfig)
    schemas["loss"] = dataclass_defaults(LossConfig)
    schemas["adversaries"] = dataclass_defaults(AdversaryConfig)
    return schemas


def _shown(value) -> str:
    text = repr(value)
    return (text if len(text) <= 60 else text[:57] + "...") + f" ({type(value).__name__})"


def check_recipe(raw: dict, defaults: dict, where: str) -> dict:
    """Check a recipe (before it is merged over ``defaults``); returns it with empty sections
    (``data:`` with nothing under it: None) as empty mappings. ``where`` names the file (or
    "training config") in messages; raises ValueError."""
    schemas = _section_schemas(defaults)
    out = {}
    for key, value in raw.items():
        if value is None and isinstance(defaults.get(key), dict):
            value = {}
        _check_value(key, value, defaults.get(key), schemas, where)
        out[key] = value
    return out


def _check_value(key: str, value, default, schemas: dict, where: str) -> None:
    kind = _NULLABLE_KINDS.get(key) if default is None else _kind_of(default)
    if kind is None or (default is None and value is None):
        return
    accepts, what = _KINDS[kind]
    if not accepts(value):
        if key in schemas:
            what += f" of keys such as {', '.join(list(schemas[key])[:3])} (indented under it)"
        raise ValueError(f"{where}: {key} must be {what}, got {_shown(value)}")
    if kind == "list" and isinstance(default, (list, tuple)) and default:
        element = _kind_of(default[0])
        if element in ("integer", "number"):
            accepts, what = _KINDS[element]
            for i, item in enumerate(value):
                if not accepts(item):
                    raise ValueError(f"{where}: {key}[{i}] must be {what}, got {_shown(item)}")
    if kind == "mapping" and key in schemas:
        known = schemas[key]
        for k in value:
            if k not in known:
                raise ValueError(f"{where}: unknown key {key}.{k}; expected some of {sorted(known)}")
            _check_value(f"{key}.{k}", value[k], known[k], schemas, where)
