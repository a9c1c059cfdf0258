"""Runtime LoRA adapters: one int4 base export per base model, a small `.onnx_adapter` per run.

The onnxruntime-genai builder's own LoRA path (`adapter_path`) writes the adapter's weights into
the graph, so every run would carry its own copy of the base. Here the base is the ordinary int4
export of the base *as trained* (NF4 codes x scales for QLoRA: the weights the adapter learned
against), and every projection MatMul of every layer gets a branch `x @ A @ B` added to its
output. A and B are graph inputs whose defaults are empty (rank 0: the branch adds nothing), so
the base answers as the base; an adapter file supplies A and B by name (onnxruntime's LoRA adapter
format, run by onnxruntime-genai's Adapters). A and B stay fp32 with peft's scaling folded into B:
the adapter's contribution is the trained one, only the base weights are rounded.
A run trained on an export's own weights (export/dequantize.py) gets that export as its base: then
nothing is rounded after training.

Bases live in EDGEFT_HOME/bases, one per (base model weights, how training loaded them, export
options), and are reused by every run that shares them. The identity is written into the base
and, as the adapter format's model version, into each adapter file: a runtime refuses an adapter
made for another base instead of answering nonsense.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from edgeft import artifacts, models
from edgeft.artifacts import ADAPTER_FILE, ADAPTER_FOLDER, BASE_FILE, Run, model_version
from edgeft.errors import ConfigError, ExportError, RunError
from edgeft.export.matmuls import SLOT, SOURCES
from edgeft.export.options import ExportConfig

log = logging.getLogger(__name__)


_PEFT_KEY = re.compile(r"layers\.(\d+)\.(.+)\.lora_([AB])\.weight$")


def bases_dir() -> Path:
    return models.edgeft_home() / "bases"


# --- the base -------------------------------------------------------------------------------


def base_identity(trained, cfg: ExportConfig) -> str:
    """What makes two runs' bases the same: the base model's weights, how training loaded them
    (NF4 with or without quantized scales, or the storage precision) and the export options."""
    weights = sorted(trained.base.glob("*.safetensors")) or sorted(trained.base.glob("*.bin"))
    loaded = ("nf4", trained.double_quant) if trained.method == "qlora" else ("plain", trained.precision)
    options = {k: v for k, v in cfg.recorded().items() if k not in _NOT_IN_IDENTITY}
    blob = json.dumps(
        {"weights": [artifacts.sha256_file(p) for p in weights], "loaded": loaded, "options": options},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


_NOT_IN_IDENTITY = ("verify", "verify_samples", "allow_drift", "calibration", "as_adapter")


def ensure_base(trained, cfg: ExportConfig, identity: str, calibration: Path | None, *, run_name: str) -> Path:
    """The base export for `identity`: found in the cache, else built (a few minutes for SmolLM2)."""
    from edgeft.export.onnx import (
        UnsupportedByBuilder,
        build_genai,
        check_export_folder,
        finish_folder,
        rework_weights,
        rounding,
    )

    folder = bases_dir() / f"{trained.base.name}-{identity[:12]}"
    if (folder / BASE_FILE).is_file():
        try:
            check_export_folder(folder)
            log.info(f"Using the base export {folder} (shared by every run on this base).")
            return folder
        except ExportError as e:
            log.warning(f"The base export {folder} is damaged ({e}); building it again.")
    folder.parent.mkdir(parents=True, exist_ok=True)
    artifacts.check_free_space(folder.parent, artifacts.dir_size(trained.base) * 3, "building the base export")

    from edgeft.export.dequantize import source_export

    if (dequantized := source_export(trained.base)) is not None:
        return _base_from_export(dequantized, folder, identity)
    method = rounding(cfg, "genai", calibration)
    log.info(f"Building the shared base export {folder} from {trained.base.name} as trained...")
    start = time.perf_counter()
    with (
        tempfile.TemporaryDirectory(dir=folder.parent, prefix=".hf-") as hf,
        artifacts.staged_dir(folder, force=True, what="base export") as tmp,
    ):
        hf = Path(hf)
        _save_base_as_trained(trained, hf)
        try:
            build_genai(hf, tmp, replace(cfg, quant_method=method))
        except UnsupportedByBuilder as e:
            raise ExportError(
                f"runtime adapters need the onnxruntime-genai builder, which does not support this model ({e}). "
                "Export a merged model instead (without --as-adapter)."
            ) from None
        weights = rework_weights(hf, tmp, cfg, method, calibration)
        finish_folder(hf, tmp)
        _finish_base(
            tmp,
            start,
            identity=identity,
            base_model=str(trained.base),
            loaded="nf4" if trained.method == "qlora" else trained.precision,
            options=cfg.recorded(),
            rounding=method if cfg.precision == "int4" else None,
            calibration=f"{calibration} (from run {run_name})" if method == "gptq" else None,
            **weights,
        )
    return folder


def _finish_base(tmp: Path, start: float, **record) -> None:
    """An export folder made a base: the LoRA slots, the derived graphs, checked, and its record
    (`record` then the slots, the time it took and its size) in BASE_FILE."""
    from edgeft.export.onnx import check_export_folder, write_derived_graphs

    slots = add_lora_slots(tmp / "model.onnx")
    write_derived_graphs(tmp)  # after the slots: every graph takes the adapters
    check_export_folder(tmp)
    record.update(
        slots=slots,
        seconds=round(time.perf_counter() - start, 1),
        size_bytes=artifacts.dir_size(tmp),
        finished_at=artifacts.now(),
    )
    artifacts.write_json_atomic(tmp / BASE_FILE, record)


def _base_from_export(export: Path, folder: Path, identity: str) -> Path:
    """The base for a run trained on an export's own weights (export/dequantize.py): that export
    itself, with the LoRA slots, so the adapter runs on the weights it was trained against."""
    import shutil

    log.info(f"Making the base export {folder} from {export}, the export whose weights the run trained on...")
    start = time.perf_counter()
    with artifacts.staged_dir(folder, force=True, what="base export") as tmp:
        for file in export.iterdir():
            if (
                file.is_file()
                and (file.suffix != ".onnx" or file.name == "model.onnx")
                and file.name != "edgeft-export.json"
            ):
                shutil.copyfile(file, tmp / file.name)
        marker = export / "edgeft-export.json"
        exported = json.loads(marker.read_text()) if marker.is_file() else {}
        _finish_base(
            tmp,
            start,
            identity=identity,
            base_model=str(export),
            loaded=f"the export {export}, dequantized",
            options=exported.get("options"),
            rounding=exported.get("rounding"),
        )
    return folder


def _save_base_as_trained(trained, out: Path) -> None:
    """The base with the weights training saw (QLoRA: NF4 codes x scales in fp32), as a HF folder."""
    from edgeft.trained import load_base, save_merged, tokenizer_of

    save_merged(load_base(trained), tokenizer_of(trained), out)


def add_lora_slots(model_file: Path) -> dict[str, list[int]]:
    """Give every projection MatMul a LoRA branch with empty (rank 0) A and B defaults; returns the
    slots by name with their [in, out] sizes. The external weight data is not touched."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(model_file), load_external_data=False)
    graph, nodes, slots = model.graph, [], {}
    for node in graph.node:
        match = SLOT.match(node.name) if node.op_type in ("MatMul", "MatMulNBits") else None
        if not match or f"{match[2]}/{match[3]}" not in SOURCES:
            nodes.append(node)
            continue
        k, n = _matmul_size(node, graph)
        slot = f"model.layers.{match[1]}.{match[2]}.{match[3]}"
        prefix, out = node.name.rsplit("/", 1)[0], node.output[0]
        node.output[0] = f"{out}/base"
        nodes += [
            node,
            helper.make_node("MatMul", [node.input[0], f"{slot}.lora_A"], [f"{out}/lora_A"], name=f"{prefix}/lora_A"),
            helper.make_node("MatMul", [f"{out}/lora_A", f"{slot}.lora_B"], [f"{out}/lora_B"], name=f"{prefix}/lora_B"),
            helper.make_node("Add", [f"{out}/base", f"{out}/lora_B"], [out], name=f"{prefix}/lora_Add"),
        ]
        rank = f"{slot}.rank"
        for name, shape, empty in ((f"{slot}.lora_A", [k, rank], (k, 0)), (f"{slot}.lora_B", [rank, n], (0, n))):
            # An input with an initializer of the same name: the initializer is its default.
            graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
            graph.initializer.append(numpy_helper.from_array(np.zeros(empty, np.float32), name))
        slots[slot] = [k, n]
    if not slots:
        raise ExportError(f"{model_file} has no projection MatMuls named as the genai builder names them.")
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(model, str(model_file))
    return slots


def _matmul_size(node, graph) -> tuple[int, int]:
    attrs = {a.name: a.i for a in node.attribute}
    if node.op_type == "MatMulNBits":
        return attrs["K"], attrs["N"]
    weight = next(t for t in graph.initializer if t.name == node.input[1])
    return int(weight.dims[0]), int(weight.dims[1])


# --- the adapter ----------------------------------------------------------------------------


def adapter_parameters(adapter_dir: Path, slots: dict[str, list[int]], model_config: dict) -> dict:
    """The run's peft adapter as the base's slot inputs: A (in x r) and B (r x out, scaled), fp32.

    A fused slot (qkv_proj) gets the modules' A side by side and their B block-diagonal, so
    x @ A @ B is each module's own LoRA in its own output columns; a module the run did not train
    contributes zero columns."""
    import numpy as np
    import torch
    from safetensors.torch import load_file

    config = _adapter_config(adapter_dir)
    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    modules: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for key, tensor in weights.items():
        match = _PEFT_KEY.search(key)
        if not match:
            raise ConfigError(
                f"the adapter in {adapter_dir} trains {key}, which a runtime adapter cannot carry (only the "
                "attention and MLP projections). Export a merged model instead (without --as-adapter)."
            )
        modules.setdefault((int(match[1]), match[2]), {})[match[3]] = tensor.to(torch.float32).numpy()
    widths = _output_widths(model_config)
    params, used = {}, set()
    for slot, (k, n) in slots.items():
        layer, kind = int(slot.split(".")[2]), slot.split(".", 3)[3].replace(".", "/")
        # the alternative this adapter trained, if any
        sources = next((c for c in SOURCES[kind] if any((layer, m) in modules for m, _ in c)), None)
        if sources is None:
            continue
        a_parts, blocks = [], []  # blocks: (B part or None, output width)
        for module, half in sources:
            pair = modules.get((layer, module))
            if pair is None:  # a module of a fused slot that the run did not train: zero columns
                blocks.append((None, widths[module]))
                continue
            b = pair["B"].T * _scaling(config, pair["A"].shape[0])
            if half is not None:
                width = b.shape[1] // 2
                b = b[:, half * width : (half + 1) * width]
            a_parts.append(pair["A"].T)
            blocks.append((b, b.shape[1]))
            used.add((layer, module))
        a = np.ascontiguousarray(np.concatenate(a_parts, axis=1), dtype=np.float32)
        b = np.zeros((a.shape[1], sum(width for _, width in blocks)), np.float32)
        row = col = 0
        for block, width in blocks:
            if block is not None:
                b[row : row + block.shape[0], col : col + width] = block
                row += block.shape[0]
            col += width
        if a.shape[0] != k or b.shape[1] != n:
            raise ConfigError(
                f"the adapter in {adapter_dir} does not fit the base export at {slot} ({a.shape[0]}x{b.shape[1]} vs "
                f"{k}x{n}): it was trained on another base model."
            )
        params[f"{slot}.lora_A"], params[f"{slot}.lora_B"] = a, b
    missing = sorted(f"layers.{layer}.{module}" for layer, module in set(modules) - used)
    if missing:
        raise ConfigError(
            f"the adapter in {adapter_dir} trains modules the base export has no slot for ({', '.join(missing[:4])}). "
            "Export a merged model instead (without --as-adapter)."
        )
    return params


def _adapter_config(adapter_dir: Path) -> dict:
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    unsupported = [
        why
        for why, bad in (
            ("DoRA (its magnitude vector rescales the base weights)", config.get("use_dora")),
            ("modules_to_save (whole modules trained)", config.get("modules_to_save")),
            ("per-module alpha (alpha_pattern)", config.get("alpha_pattern")),
            ("trained biases", config.get("bias", "none") != "none"),
        )
        if bad
    ]
    if unsupported:
        raise ConfigError(
            f"the adapter in {adapter_dir} uses {', '.join(unsupported)}, which a runtime adapter cannot carry. "
            "Export a merged model instead (without --as-adapter)."
        )
    return config


def _scaling(config: dict, rank: int) -> float:
    alpha = config.get("lora_alpha", 8)
    return alpha / rank**0.5 if config.get("use_rslora") else alpha / rank


def _output_widths(model_config: dict) -> dict[str, int]:
    heads = model_config["num_attention_heads"]
    head_dim = model_config.get("head_dim") or model_config["hidden_size"] // heads
    kv = model_config.get("num_key_value_heads") or heads
    return {"self_attn.q_proj": heads * head_dim, "self_attn.k_proj": kv * head_dim, "self_attn.v_proj": kv * head_dim}


def write_adapter(params: dict, path: Path, identity: str) -> None:
    import onnxruntime as ort

    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(1)
    adapter.set_model_version(model_version(identity))
    adapter.set_parameters({name: ort.OrtValue.ortvalue_from_numpy(value) for name, value in params.items()})
    adapter.export_adapter(str(path))


# --- edgeft export RUN --as-adapter ---------------------------------------------------------


def export(target: str | Path, cfg: ExportConfig, *, force: bool = False) -> Path:
    """`edgeft export RUN --as-adapter`: the run's adapter for its shared base; returns the adapter folder."""
    if not Run.is_run(Path(target)):
        raise ConfigError(
            f"--as-adapter exports a run's adapter for a shared base export; {target} is not a run directory."
        )
    run = Run.open(Path(target))
    with run.lock("export --as-adapter"):
        return export_adapter(run, cfg, force=force)


def export_adapter(run: Run, cfg: ExportConfig, *, force: bool = False) -> Path:
    """The run's adapter for the shared base export (built on first use); returns the adapter folder."""
    from edgeft.export.onnx import _calibration_file, _check_files, check_output, raise_drift, recorded_path
    from edgeft.trained import Trained

    out = Path(cfg.output) if cfg.output else run.path / ADAPTER_FOLDER
    check_output(out, force=force)
    if not (run.adapter_dir / "adapter_config.json").is_file():
        raise RunError(f"run {run.path} has no adapter yet. Train it first: edgeft tune (or --resume {run.path}).")
    trained = Trained.of(run)
    if trained.method == "dora":
        raise ConfigError(
            "DoRA adapters cannot run as runtime adapters (DoRA rescales the base weights themselves). "
            f"Export the merged model: edgeft export {run.path} --int4"
        )
    _adapter_config(trained.adapter)  # refuse what cannot be carried before minutes of work
    start = time.perf_counter()
    identity = base_identity(trained, cfg)
    base = ensure_base(trained, cfg, identity, _calibration_file(cfg, run), run_name=run.path.name)
    base_info = json.loads((base / BASE_FILE).read_text())
    model_config = json.loads((trained.base / "config.json").read_text())
    params = adapter_parameters(trained.adapter, base_info["slots"], model_config)
    verification = None
    with artifacts.staged_dir(out, force=True, what="adapter export") as tmp:
        write_adapter(params, tmp / ADAPTER_FILE, identity)
        if cfg.verify:
            from edgeft.export.verify import verify
            from edgeft.trained import as_trained_model, tokenizer_dir

            log.info("Verifying the base export + adapter against the model as trained...")
            verification = verify(
                tokenizer_dir(trained),
                base,
                cfg,
                check_files=_check_files(run),
                reference=as_trained_model(trained),
                adapter=tmp / ADAPTER_FILE,
            )
    drifted = bool(verification) and not verification["gate"]["passed"] and not cfg.allow_drift
    entry = {
        "status": "drift" if drifted else "done",
        "kind": "adapter",
        "path": recorded_path(out, run),
        "base": str(base),
        "base_identity": identity,
        "precision": cfg.precision,
        "options": cfg.recorded(),
        "parameters": len(params),
        "seconds": round(time.perf_counter() - start, 1),
        "size_bytes": (out / ADAPTER_FILE).stat().st_size,
        "base_size_bytes": artifacts.dir_size(base),
        "verification": verification,
        "finished_at": artifacts.now(),
    }
    run.record_stage("adapter", **entry)
    artifacts.write_json_atomic(out / "edgeft-export.json", {"source": str(run.path.resolve()), **entry})
    if drifted:
        rounded = replace(cfg, quant_method=base_info["rounding"] or cfg.quant_method)  # what the base ran
        raise_drift("The base export + adapter", out, verification, rounded, model_config)
    return out
