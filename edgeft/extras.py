"""Which optional extra a command needs, checked before any work: a base `pip install edgeft` (the
runtime only) answers a training or export command with one line naming the install."""

from __future__ import annotations

import importlib.util

from edgeft.errors import EdgeftError

# The import names of what pyproject.toml's extras bring and the commands import (matplotlib is left
# out: without it a command only skips its charts). `export` includes `train`.
MODULES = {
    "train": ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "safetensors", "gguf", "bm25s"),
    "export": ("optimum", "onnx", "onnx_ir", "onnxscript"),
}
NAMES = {"train": "training", "export": "export"}


def missing(extra: str) -> list[str]:
    """The modules of `extra` (and of what it includes) that are not installed."""
    needed = MODULES["train"] + (MODULES["export"] if extra == "export" else ())
    return [m for m in needed if importlib.util.find_spec(m) is None]


def require_extra(command: str, extra: str) -> None:
    """Raise an EdgeftError naming the install when `edgeft COMMAND` needs `extra` and it is missing."""
    if absent := missing(extra):
        raise EdgeftError(
            f"edgeft {command} needs the {NAMES[extra]} extra ({absent[0]} is not installed): "
            f'pip install "edgeft[{extra}]"'
        )
