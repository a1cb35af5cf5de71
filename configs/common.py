"""Helpers shared by the config files."""

from __future__ import annotations

import ast

import ml_collections


def parse_arg(arg: str | None, lazy: bool = False, **spec) -> ml_collections.ConfigDict:
    """Parses `--config=file.py:k1=v1,k2=v2,flag` against typed defaults.

    `spec` gives each known key its default; values are converted to the default's type and an
    unknown key is an error (so a typo never passes silently). A bare `flag` sets a bool True.
    """
    out = ml_collections.ConfigDict(dict(spec))
    if not arg:
        return out
    for item in arg.split(","):
        if not item:
            continue
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in spec:
            raise ValueError(f"unknown config argument {key!r} in {arg!r}; known: {sorted(spec)}")
        default = spec[key]
        if not _:
            if not isinstance(default, bool):
                raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
            out[key] = True
        elif isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"config argument {key}={value!r} is not a bool")
            out[key] = value.lower() in ("true", "1")
        elif isinstance(default, int):
            out[key] = int(value)
        elif isinstance(default, float):
            out[key] = float(value)
        elif isinstance(default, str):
            out[key] = value
        else:
            out[key] = ast.literal_eval(value)
    return out
