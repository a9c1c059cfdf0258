"""Config helpers every stage uses: dataclass fields that carry their CLI help, choices checked in
one place, and TOML files merged under the flags the user typed.

Precedence: defaults < `--config FILE.toml` < command-line flags. The resolved config is saved in
the run manifest, so a run can always be reproduced or resumed.
"""

from __future__ import annotations

import tomllib
from dataclasses import field, fields
from pathlib import Path
from typing import Any

from edgeft.errors import ConfigError


def opt(default: Any, help: str, *, choices: tuple[str, ...] | None = None, flag: str | None = None, **kw) -> Any:
    """A dataclass field with CLI metadata: help text, allowed choices, optional flag name."""
    meta = {"help": help, "choices": choices, "flag": flag}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


def check_choices(config) -> None:
    """Every field with `choices` holds one of them; the message names the field, the value and the choices."""
    for f in fields(config):
        choices = f.metadata.get("choices")
        if choices and getattr(config, f.name) not in choices:
            raise ConfigError(f"{f.name} = {getattr(config, f.name)!r} is invalid: choose one of {', '.join(choices)}.")


_TYPES = {"int": int, "float": (int, float), "bool": bool, "str": str}


def load_config(cls, path: str | Path | None, overrides: dict[str, Any]):
    """Build a config from a TOML file (optional) and explicit overrides (the flags the user gave)."""
    values: dict[str, Any] = {}
    if path:
        path = Path(path)
        try:
            values = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except (UnicodeDecodeError, IsADirectoryError, PermissionError) as e:
            raise ConfigError(f"config file {path} is not a readable TOML text file ({e}).") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
        section = getattr(cls, "TOML_SECTION", None)  # e.g. a [tune] table; a flat file works too
        values = values.get(section, values) if section else values
    values.update(overrides)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        import difflib

        hints = [f"{u} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(u, names, 1)) else u for u in unknown]
        raise ConfigError(f"unknown setting(s) in {path or 'options'}: {', '.join(hints)}.")
    for f in fields(cls):
        if f.name not in values:
            continue
        value, want = values[f.name], _TYPES[f.type]
        if not isinstance(value, want) or (f.type != "bool" and isinstance(value, bool)):
            raise ConfigError(f"{f.name} = {value!r} in {path or 'options'} has the wrong type: expected {f.type}.")
        if f.type == "float":
            values[f.name] = float(value)
    try:
        return cls(**values)
    except TypeError as e:
        raise ConfigError(f"bad setting in {path or 'options'}: {e}") from None
