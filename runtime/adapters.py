"""Runtime LoRA adapters: finding an adapter file and checking it belongs to the base it is loaded on.

A base export made by `edgeft export RUN --as-adapter` has a LoRA slot (graph inputs A and B) on
every projection and an `edgeft-base.json` with its identity; each adapter file carries that
identity as its model version. Everything here is checked before onnxruntime-genai sees the file,
so a wrong or damaged adapter is a clear error and the models already loaded keep serving.
"""

from __future__ import annotations

import json
from pathlib import Path

from edgeft.artifacts import ADAPTER_FILE, ADAPTER_FOLDER, BASE_FILE, model_version
from edgeft.errors import ModelError

__all__ = ["ADAPTER_FILE", "ADAPTER_FOLDER", "BASE_FILE", "adapter_name", "check_adapter", "resolve_adapter"]


def resolve_adapter(path: str | Path) -> Path:
    """The adapter file for `path`: the file itself, an adapter folder, or a run directory."""
    from edgeft.artifacts import Run

    path = Path(path).expanduser()
    if not path.exists():
        raise ModelError(
            f"adapter {path} does not exist. Pass an .onnx_adapter file, its folder (runs/NAME/{ADAPTER_FOLDER}) "
            "or a run directory, after `edgeft export runs/NAME --as-adapter`."
        )
    if path.is_file():
        return path
    folder = path
    if Run.is_run(path):
        stage = Run.open(path).stage("adapter") or {}
        folder = path / stage.get("path", ADAPTER_FOLDER)
    if not (folder / ADAPTER_FILE).is_file():
        raise ModelError(f"{path} holds no {ADAPTER_FILE}. Make one with `edgeft export RUN --as-adapter`.")
    return folder / ADAPTER_FILE


def parse_adapter_spec(spec: str) -> tuple[str | None, str]:
    """`NAME=PATH` or just `PATH` (then the adapter's run names it)."""
    name, sep, path = spec.partition("=")
    if not sep or "/" in name or not name:
        return None, spec
    return name, path


def adapter_name(file: Path) -> str:
    """The name an adapter is served under by default: its run's name (runs/NAME/onnx-adapter/...)."""
    folder = file.parent
    return folder.parent.name if folder.name == ADAPTER_FOLDER else file.stem


def check_adapter(file: Path, base: Path) -> None:
    """Refuse an adapter that is damaged, or made for another base, before onnxruntime-genai loads it."""
    import onnxruntime as ort

    info = base / BASE_FILE
    if not info.is_file():
        raise ModelError(
            f"{base} has no LoRA slots, so it cannot run adapters: load the adapter on the base export named in its "
            f"edgeft-export.json (made by `edgeft export RUN --as-adapter`, kept in EDGEFT_HOME/bases)."
        )
    try:
        base_info = json.loads(info.read_text())
        identity, slots = base_info["identity"], base_info["slots"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(f"{info} is damaged ({e}). Export the adapter again to rebuild the base.") from None
    try:
        adapter = ort.AdapterFormat.read_adapter(str(file))
        params = adapter.get_parameters()
    except Exception as e:
        raise ModelError(
            f"{file} is not a readable adapter file (truncated or damaged?): {e}. "
            "Export it again with `edgeft export RUN --as-adapter`."
        ) from None
    if adapter.get_model_version() != model_version(identity):
        raise ModelError(
            f"the adapter {file} was made for another base model, not for {base} (its base identity does not "
            "match). Load it on the base named in its edgeft-export.json."
        )
    for name, value in params.items():
        slot, _, side = name.rpartition(".lora_")
        shape = list(value.shape())
        if slot not in slots or side not in ("A", "B") or len(shape) != 2:
            raise ModelError(f"the adapter {file} has a parameter {name!r} that {base} has no slot for.")
        k, n = slots[slot]
        if (side == "A" and shape[0] != k) or (side == "B" and shape[1] != n):
            raise ModelError(f"the adapter {file}'s {name} has shape {shape}, which does not fit {base} ({k}x{n}).")
