"""edgeft export: a merged model -> an ONNX folder that onnxruntime-genai runs on CPU.

Two backends, one output contract (`genai_config.json`, `model.onnx` + external data, tokenizer):
- genai (default): the onnxruntime-genai model builder. It emits fused attention, rotary and norm
  ops and quantizes while it writes; measured ~2x faster decode than the Optimum graph on CPU.
- optimum: Hugging Face Optimum exports a plain graph (`text-generation-with-past`), ONNX Runtime
  quantizes it, edgeft writes the `genai_config.json`. It also loads in `ORTModelForCausalLM`.
A model the builder does not support falls back to optimum with a message.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from edgeft import artifacts, fidelity, models
from edgeft.artifacts import Run
from edgeft.errors import ConfigError, ExportError, RunError
from edgeft.export import compact
from edgeft.export.options import (
    INT8_KINDS,
    ExportConfig,
    block_size,
    describe,
    embeddings_mode,
    int8_matmuls,
    lm_head_precision,
)
from edgeft.progress import run_with_heartbeat

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@dataclass
class Source:
    """What gets exported: a merged HF folder, and the run it belongs to (if any)."""

    model_dir: Path
    run: Run | None
    name: str


def export(target: str | Path, cfg: ExportConfig, *, force: bool = False) -> Path:
    """Export a merged run or a bare model; returns the ONNX folder."""
    if cfg.as_adapter:
        raise ConfigError("--as-adapter exports go through edgeft.export.adapters.export.")
    source = _source(target)
    with source.run.lock(f"export --{cfg.precision}") if source.run else contextlib.nullcontext():
        return _export(source, cfg, force=force)


def _export(source: Source, cfg: ExportConfig, *, force: bool) -> Path:
    out = (
        Path(cfg.output)
        if cfg.output
        else (source.run.export_dir(cfg.precision) if source.run else Path(f"{source.name}-onnx-{cfg.precision}"))
    )
    if cfg.allow_drift and (accepted := _accept_kept_drift(out, source, cfg)) is not None:
        return accepted
    check_output(out, force=force)
    merged_size = artifacts.dir_size(source.model_dir)
    artifacts.check_free_space(out.parent if out.parent.exists() else Path("."), merged_size * 3, "exporting")
    calibration = _calibration_file(cfg, source.run)
    method = rounding(cfg, cfg.backend, calibration)  # refuses impossible options before minutes of work
    start = time.perf_counter()
    backend, weights = cfg.backend, {}
    with artifacts.staged_dir(out, force=True, what="export") as tmp:
        if backend == "genai":
            try:
                build_genai(source.model_dir, tmp, replace(cfg, quant_method=method))
            except UnsupportedByBuilder as e:
                log.warning(
                    f"The onnxruntime-genai builder does not support this model ({e}); using the optimum backend instead."
                )
                shutil.rmtree(tmp)
                tmp.mkdir()
                backend = "optimum"
                method = rounding(cfg, backend, calibration, fallback=True)
        if backend == "optimum":
            from edgeft.export.quantize import build_optimum

            build_optimum(source.model_dir, tmp, replace(cfg, quant_method=method))
        else:
            weights = rework_weights(source.model_dir, tmp, cfg, method, calibration, _held_out(source.run))
        finish_folder(source.model_dir, tmp)
        if backend == "genai":
            write_derived_graphs(tmp)
        check_export_folder(tmp)
        seconds = time.perf_counter() - start
        verification = None
        if cfg.verify:
            from edgeft.export.verify import verify

            log.info("Verifying the export against the model as trained...")
            verification = verify(
                source.model_dir,
                tmp,
                replace(cfg, quant_method=method),
                check_files=_check_files(source.run),
                reference=_as_trained(source.run),
            )
        drifted = bool(verification) and not verification["gate"]["passed"] and not cfg.allow_drift
        model_config = json.loads((source.model_dir / "config.json").read_text())
        record = {
            "status": "drift" if drifted else "done",
            "path": recorded_path(out, source.run),
            "precision": cfg.precision,
            "backend": backend,
            "options": cfg.recorded(),
            "rounding": method if cfg.precision == "int4" else None,
            "block_size": block_size(replace(cfg, quant_method=method)) if cfg.precision != "fp32" else None,
            "int8_matmuls": int8_matmuls(cfg, model_config),  # the MatMuls kept in int8 ("none" unless int4)
            **weights,
            "seconds": round(seconds, 1),
            "size_bytes": artifacts.dir_size(tmp),
            "merged_size_bytes": merged_size,
            "verification": verification,
            "finished_at": artifacts.now(),
        }
        # the marker goes in with the folder, in the same rename: an export is never seen without it
        artifacts.write_json_atomic(tmp / "edgeft-export.json", {"source": str(source.model_dir), **record})
    if source.run:
        source.run.record_stage("export", whole=True, **record)
    if drifted:
        raise_drift(f"The {cfg.precision} export", out, verification, replace(cfg, quant_method=method), model_config)
    return out


def _accept_kept_drift(out: Path, source: Source, cfg: ExportConfig) -> Path | None:
    """The same export again with --allow-drift, after the gate failed and kept it: the export on
    disk, made from the same model (not changed since) with the same options, is accepted as it is
    rather than made again (minutes). None when there is no such export."""
    marker = out / "edgeft-export.json"
    if not marker.is_file():
        return None
    record = json.loads(marker.read_text())
    made = marker.stat().st_mtime
    if (
        record.get("status") != "drift"
        or record.get("source") != str(source.model_dir)
        or {**(record.get("options") or {}), "allow_drift": True} != cfg.recorded()
        or any(p.stat().st_mtime > made for p in source.model_dir.iterdir() if p.is_file())
    ):
        return None
    record.update(status="done", options=cfg.recorded(), finished_at=artifacts.now())
    record["verification"]["gate"]["accepted"] = True
    artifacts.write_json_atomic(marker, record)
    if source.run:
        source.run.record_stage("export", whole=True, **{k: v for k, v in record.items() if k != "source"})
    log.info(f"Accepting the export {out} the fidelity gate failed on (--allow-drift); it is not made again.")
    for line in fidelity.table(record["verification"]):
        log.info(line)
    return out


def recorded_path(out: Path, run: Run | None) -> str:
    """Inside the run: its name there (the run can move); elsewhere (--output): the absolute path."""
    if run and out.resolve().parent == run.path.resolve():
        return out.name
    return str(out.resolve())


def check_output(out: Path, *, force: bool) -> None:
    if out.exists() and not force:
        raise ExportError(f"{out} already exists. Pass --force to export again.")
    if out.exists() and not (out / "edgeft-export.json").is_file():
        # --force replaces an earlier export, never a run directory or a folder of someone else's.
        raise ExportError(
            f"{out} exists and is not an edgeft export (no edgeft-export.json in it); refusing to replace "
            "it. Choose another --output."
        )


def raise_drift(what: str, out: Path, verification: dict, cfg: ExportConfig, model_config: dict) -> None:
    """Show the fidelity table and fail: the export is on disk, recorded as a drift. `cfg` has the
    rounding that ran (auto resolved)."""
    from edgeft.export.verify import advice

    for line in fidelity.table(verification):
        log.info(line)
    message = fidelity.drift_message(what, str(out), verification["gate"]["problems"], advice(cfg, model_config))
    raise fidelity.DriftError(message)


def _as_trained(run: Run | None):
    """The model the export must match: for a run, its base as training loaded it + the adapter."""
    if run is None or not (run.adapter_dir / "adapter_config.json").is_file():
        return None
    from edgeft.trained import Trained, as_trained_model

    return as_trained_model(Trained.of(run))


def _source(target: str | Path) -> Source:
    path = Path(target)
    if Run.is_run(path):
        run = Run.open(path)
        if not run.has_merged():
            raise RunError(
                f"run {run.path} has no merged model yet. Merge it first: edgeft merge {run.path} "
                "(the `edgeft export` command does this for you)."
            )
        return Source(run.merged_dir, run, run.path.name)
    resolved = models.resolve_model(str(target))
    return Source(resolved.path, None, Path(resolved.spec).name)


def _calibration_file(cfg: ExportConfig, run: Run | None) -> Path | None:
    if cfg.calibration:
        path = Path(cfg.calibration)
        if not path.is_file():
            raise ConfigError(
                f"calibration = {cfg.calibration!r}: no such file. Pass a chat JSONL file, such as the training data."
            )
        return path
    record = _tune_record(run)
    return record.data if record else None


def rounding(cfg: ExportConfig, backend: str, calibration: Path | None, *, fallback: bool = False) -> str:
    """The int4 rounding that runs: `auto` is gptq where it can run (calibration data, the builder's graph), else k_quant."""
    method = cfg.quant_method
    if method == "auto":
        return "gptq" if calibration and backend == "genai" else "k_quant"
    if method == "gptq" and cfg.precision == "int4" and (calibration is None or backend != "genai"):
        why = (
            "it needs the genai backend"
            if backend != "genai"
            else "there is no calibration data: pass --calibration FILE (chat JSONL, such as the training data)"
        )
        if fallback:
            log.warning(f"GPTQ is not possible ({why}); rounding with k_quant instead.")
            return "k_quant"
        raise ConfigError(f"--quant-method gptq: {why}.")
    return method


def rework_weights(
    model_dir: Path,
    folder: Path,
    cfg: ExportConfig,
    method: str,
    calibration: Path | None,
    held_out: Path | None = None,
) -> dict:
    """After the builder: the int8 embedding table (tied models), GPTQ rounding (never calibrated on
    `held_out`, the data the export is checked on), then the compact storage. Returns what was done."""
    if cfg.precision != "int4":
        return {}
    from edgeft.export import embeddings, gptq

    done = {}
    mode = embeddings_mode(cfg)
    if mode == "int8":
        log.info("Giving the embedding lookup its own int8 table...")
        done["embeddings"] = "int8" if embeddings.separate_int8(model_dir, folder) else "own"
    elif mode == "int8-shared":
        log.info("Giving the embedding lookup and the head one int8 matrix...")
        done["embeddings"] = "int8-shared" if embeddings.share_int8(model_dir, folder) else "own"
    if method == "gptq" and calibration:
        log.info(f"Rounding the int4 weights with GPTQ, calibrated on {calibration}...")
        done["gptq"] = gptq.apply(model_dir, folder, calibration, held_out)
    done["compacted_bytes"] = compact.compact_weights(folder, json.loads((model_dir / "config.json").read_text()))
    return done


def _tune_record(run: Run | None):
    """The run's tune record (its data files), or None for a base model or a run not trained here."""
    return run.tune_record() if run else None


def _held_out(run: Run | None) -> Path | None:
    record = _tune_record(run)
    return record.held_out if record else None


def _check_files(run: Run | None) -> list[Path]:
    record = _tune_record(run)
    return record.check_files() if record else []


# --- the genai builder --------------------------------------------------------------------


class UnsupportedByBuilder(Exception):
    pass


def builder_options(cfg: ExportConfig, model_config: dict) -> list[str]:
    # GPTQ rounds every int4 weight again afterwards: the builder's plain rounding stands in (8 s
    # against k_quant's 23 s on SmolLM2), asymmetric so that it writes the zero points GPTQ fills.
    gptq = cfg.precision == "int4" and cfg.quant_method == "gptq"
    options = [
        f"block_size={block_size(cfg)}",
        f"accuracy_level={cfg.accuracy_level}",
        f"is_symmetric={str(cfg.symmetric and not gptq).lower()}",
    ]
    head = lm_head_precision(cfg, model_config)
    mixed = []
    if cfg.precision == "int4":
        algo = "rtn" if gptq else "k_quant" if cfg.quant_method == "auto" else cfg.quant_method
        options.append(f"algo_config={algo}")
        mixed += ["last_matmul:int8"] if head == "int8" else []
        mixed += ["mixed_layers:int8"] if int8_matmuls(cfg, model_config) == "mixed" else []
    if mixed:
        options.append("matmul_mixed_precision=" + ",".join(mixed))
    if cfg.precision in ("int4", "int8") and head == "fp32":
        options.append("nodes_to_exclude=/lm_head/MatMul")
    if model_config.get("tie_word_embeddings") and head == "same":
        options.append("shared_embeddings=true")  # one quantized matrix for embedding and head: smaller folder
    return options


def build_genai(model_dir: Path, out: Path, cfg: ExportConfig) -> None:
    """Run the onnxruntime-genai model builder in a subprocess (it prints a progress line per tensor)."""
    model_config = json.loads((model_dir / "config.json").read_text())
    cache = out / ".builder-cache"
    mode = int8_matmuls(cfg, model_config)
    kinds = ",".join(INT8_KINDS[mode]) if mode != "mixed" else "-"  # the builder places mixed layers itself
    cmd = [
        sys.executable,
        "-m",
        "edgeft.export.genai_builder",
        kinds,
        "-i",
        str(model_dir),
        "-o",
        str(out),
        "-p",
        cfg.precision,
        "-e",
        "cpu",
        "-c",
        str(cache),
        "--extra_options",
        *builder_options(cfg, model_config),
    ]
    log.info(f"Exporting with the onnxruntime-genai model builder ({describe(cfg, model_config)})...")
    proc = run_with_heartbeat(cmd, desc="the onnxruntime-genai model builder")
    shutil.rmtree(cache, ignore_errors=True)
    if proc.returncode != 0:
        text = proc.stdout + proc.stderr
        if "not currently supported" in text or "NotImplementedError" in text:
            raise UnsupportedByBuilder(model_config.get("model_type", "unknown architecture"))
        tail = "\n".join(line for line in text.splitlines()[-12:] if "it/s" not in line)
        raise ExportError(f"the onnxruntime-genai model builder failed on {model_dir}:\n{tail}\nTry --backend optimum.")


# --- the shared output contract -----------------------------------------------------------


def finish_folder(model_dir: Path, out: Path) -> None:
    """Our repaired tokenizer (with the chat template inside), and every end-of-turn id as a stop id."""
    for name in TOKENIZER_FILES:
        if (model_dir / name).exists():
            shutil.copyfile(model_dir / name, out / name)
    tokenizing = out / "tokenizer_config.json"
    settings = json.loads(tokenizing.read_text()) if tokenizing.exists() else {"chat_template": None}
    if "chat_template" not in settings and (template := models.chat_template(model_dir, settings)):
        artifacts.write_json_atomic(tokenizing, {**settings, "chat_template": template})  # was in chat_template.jinja
    for stale in ("vocab.json", "merges.txt", "chat_template.jinja", "added_tokens.json"):
        (out / stale).unlink(missing_ok=True)  # tokenizer.json and tokenizer_config.json say it all
    if (out / "tokenizer.json").exists():
        compact.minify_json(out / "tokenizer.json")
    stops = _stop_ids(model_dir)
    path = out / "genai_config.json"
    config = json.loads(path.read_text())
    config["model"]["eos_token_id"] = stops
    artifacts.write_json_atomic(path, config)


def write_derived_graphs(folder: Path) -> bool:
    """Two more graphs of the same model (the same weights file) beside model.onnx, whose head
    computes the vocabulary's logits at every position of a chunk:

    - the generation graph, which the folder's genai_config.json names: the head sees only the last
      position. A prompt pass otherwise computes logits at every prompt position, where generating
      reads only the last: for SmolLM2 (49k-token vocabulary) a fifth of a 512-token prefill's work
      (measured: TTFT 0.38 -> 0.31 s, the same greedy answers);
    - the scoring graph (`ChatModel.load(..., scoring=True)`): the head sees the last
      SCORE_POSITIONS positions of a chunk, zeros stand for the others. Scoring a reference feeds it
      in pieces that short and reads every position, while the prompt before it needs only its last
      (eval's retrieval row, 640-token prompts on the AVX2 code paths: 1.09 -> 0.96 s a request
      against model.onnx, the same answers and reference NLL).

    False if the graph has no such head (the folder keeps model.onnx alone)."""
    import onnx

    from edgeft.runtime.engine import ALL_LOGITS_GRAPH, GENERATE_GRAPH, SCORE_GRAPH

    for name, feed in ((GENERATE_GRAPH, _last_position), (SCORE_GRAPH, _last_positions)):
        model = onnx.load(str(folder / ALL_LOGITS_GRAPH), load_external_data=False)
        if (head := _head(model)) is None:
            return False
        feed(model.graph, head)
        onnx.save(model, str(folder / name))  # initializers still point into the same weights file
    path = folder / "genai_config.json"
    config = json.loads(path.read_text())
    config["model"]["decoder"]["filename"] = GENERATE_GRAPH
    artifacts.write_json_atomic(path, config)
    return True


def _head(model):
    """The node that computes the graph output `logits` from the last hidden states, if a MatMul."""
    head = next((n for n in model.graph.node if "logits" in n.output), None)
    if head is None or head.op_type not in ("MatMul", "MatMulNBits"):
        return None
    return head if "logits" in [o.name for o in model.graph.output] else None


def _last_position(graph, head) -> None:
    from onnx import TensorProto, helper

    hidden = head.input[0]
    graph.initializer.append(helper.make_tensor("last_position", TensorProto.INT64, [1], [-1]))
    # indices of shape [1] keep the axis: [batch, positions, hidden] -> [batch, 1, hidden]
    last = helper.make_node("Gather", [hidden, "last_position"], [f"{hidden}/last_position"], axis=1)
    head.input[0] = last.output[0]
    graph.node.insert(list(graph.node).index(head), last)


def _last_positions(graph, head) -> None:
    """The head over the last min(positions, SCORE_POSITIONS) hidden states, its logits padded in
    front with zeros to [batch, positions, vocab]: the shape onnxruntime-genai binds for the output."""
    from onnx import TensorProto, helper

    from edgeft.fidelity import SCORE_POSITIONS

    hidden, tail = head.input[0], f"{head.input[0]}/scored"
    for name, value in (("scored_positions", SCORE_POSITIONS), ("scored/zero", 0), ("scored/axis", 1)):
        graph.initializer.append(helper.make_tensor(name, TensorProto.INT64, [1], [value]))
    graph.initializer.append(helper.make_tensor("scored/zeros", TensorProto.INT64, [4], [0, 0, 0, 0]))
    nodes = [
        helper.make_node("Shape", [hidden], ["scored/length"], start=1, end=2),
        helper.make_node("Min", ["scored/length", "scored_positions"], ["scored/kept"]),
        helper.make_node("Sub", ["scored/length", "scored/kept"], ["scored/skipped"]),
        helper.make_node("Slice", [hidden, "scored/skipped", "scored/length", "scored/axis"], [tail]),
        helper.make_node("Concat", ["scored/zero", "scored/skipped", "scored/zeros"], ["scored/pads"], axis=0),
    ]
    at = list(graph.node).index(head)
    for node in reversed(nodes):
        graph.node.insert(at, node)
    head.input[0] = tail
    head.output[list(head.output).index("logits")] = "logits/scored"
    pad = helper.make_node("Pad", ["logits/scored", "scored/pads"], ["logits"], mode="constant")
    graph.node.insert(list(graph.node).index(head) + 1, pad)


def _stop_ids(model_dir: Path) -> list[int]:
    generation = model_dir / "generation_config.json"
    ids = json.loads(generation.read_text()).get("eos_token_id") if generation.exists() else None
    if ids is None:
        ids = json.loads((model_dir / "config.json").read_text()).get("eos_token_id")
    return sorted(set(ids if isinstance(ids, list) else [ids]))


def check_export_folder(folder: Path) -> None:
    """Every file the runtime needs is there (the runtime's own check), and the model's external data too."""
    import onnx

    from edgeft.errors import ModelError
    from edgeft.runtime.engine import check_export

    try:
        check_export(folder)
    except ModelError as e:
        raise ExportError(str(e)) from None
    config = json.loads((folder / "genai_config.json").read_text())
    model_file = folder / config["model"]["decoder"]["filename"]

    for tensor in onnx.load(str(model_file), load_external_data=False).graph.initializer:
        location = next((e.value for e in tensor.external_data if e.key == "location"), None)
        if location and not (folder / location).is_file():
            raise ExportError(f"the export in {folder} is incomplete: {location} is missing.")
