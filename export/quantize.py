"""The optimum backend: Optimum exports the graph, ONNX Runtime quantizes it, edgeft writes genai_config.json."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import warnings
from pathlib import Path

from edgeft.errors import ExportError

log = logging.getLogger(__name__)


def build_optimum(model_dir: Path, out: Path, cfg) -> None:
    """Export with `text-generation-with-past`, quantize (int4 MatMulNBits or dynamic int8), describe it for genai."""
    raw = out / ".optimum-fp32"
    log.info("Exporting the graph with Optimum (text-generation-with-past)...")
    _optimum_export(model_dir, raw)
    if cfg.precision == "fp32":
        _save(_load(raw / "model.onnx"), out / "model.onnx")
    elif cfg.precision == "int4":
        from edgeft.export.options import describe

        model_config = json.loads((model_dir / "config.json").read_text())
        log.info(f"Quantizing to int4 (MatMulNBits, {describe(cfg, model_config)})...")
        quantize_int4(raw / "model.onnx", out / "model.onnx", cfg, model_config)
    else:
        log.info("Quantizing to int8 (dynamic, per-channel weights)...")
        quantize_int8(raw / "model.onnx", out / "model.onnx")
    for name in ("config.json", "generation_config.json"):  # ORTModelForCausalLM reads these
        shutil.copyfile(raw / name if (raw / name).exists() else model_dir / name, out / name)
    shutil.rmtree(raw)
    write_genai_config(model_dir, out)


def _optimum_export(model_dir: Path, raw: Path) -> None:
    import torch
    from optimum.exporters.onnx import main_export
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    for name in ("optimum", "torch.onnx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with warnings.catch_warnings():
        # the tracer's notes on Python control flow and on lowering aten ops: torch's business, not the user's
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Exporting aten::")
        try:
            main_export(
                str(model_dir),
                raw,
                task="text-generation-with-past",
                device="cpu",
                do_validation=False,
                local_files_only=True,
            )
        except Exception as e:
            raise ExportError(
                f"Optimum could not export {model_dir}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
            ) from None


def _load(path: Path):
    import onnx

    return onnx.load(str(path), load_external_data=True)


def _save(model, path: Path) -> None:
    import onnx

    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=path.name + ".data",
        size_threshold=1024,
    )


def _head_node(model) -> str | None:
    """The MatMul that produces the logits: the output head."""
    producers = {o: n for n in model.graph.node for o in n.output}
    node = producers.get("logits")
    while node is not None and node.op_type != "MatMul":
        node = producers.get(node.input[0])
    return node.name if node is not None else None


def quantize_int4(src: Path, dst: Path, cfg, model_config: dict) -> None:
    """MatMulNBits int4, with the same head and int8 MatMul choices as the builder path."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        KQuantWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
        RTNWeightOnlyQuantConfig,
    )

    from edgeft.export.options import INT8_KINDS, block_size, int8_block, int8_layers, int8_matmuls

    # each says a line per MatMul (k_quant's: "consider install cupy to speed up on CUDA")
    for name in ("onnxruntime.quantization.matmul_nbits_quantizer", "neural_compressor"):
        logging.getLogger(name).setLevel(logging.WARNING)
    model = _load(src)
    head = _head_node(model)
    head_precision = "int8" if cfg.lm_head == "auto" else cfg.lm_head
    mode = int8_matmuls(cfg, model_config)
    layers = int8_layers(mode, model_config.get("num_hidden_layers", 0))
    kinds = {m.rsplit("/", 1)[-1] for m in INT8_KINDS[mode]}  # Optimum nests them under other parents
    int8 = [n.name for n in model.graph.node if n.op_type == "MatMul" and _layer_kind(n.name, layers, kinds)]
    int8 += [head] if head and head_precision == "int8" else []
    exclude = [head] if head and head_precision == "fp32" else []
    common = dict(block_size=block_size(cfg), is_symmetric=cfg.symmetric, accuracy_level=cfg.accuracy_level)
    if cfg.quant_method == "default":  # MLAS rounding takes one bit width (and block) per pass, as in the builder
        passes = [(4, DefaultWeightOnlyQuantConfig(bits=4, **common), dict(nodes_to_exclude=exclude + int8))]
        if int8:
            passes.append((8, DefaultWeightOnlyQuantConfig(bits=8, **common), dict(nodes_to_include=int8)))
    else:
        # int8 layer MatMuls symmetric, in blocks as large as their input size allows; the head keeps
        # int4's blocks (as the builder path)
        weights = {t.name: t.dims for t in model.graph.initializer}
        inputs = {n.name: weights[n.input[1]][0] for n in model.graph.node if n.input[1:2] and n.input[1] in weights}
        wide = {n: {"group_size": int8_block(inputs.get(n, 32)), "scheme": "sym"} for n in int8 if n != head}
        layout = {n: {"bits": 8, **wide.get(n, {})} for n in int8}
        algo = KQuantWeightOnlyQuantConfig if cfg.quant_method == "k_quant" else RTNWeightOnlyQuantConfig
        passes = [(4, algo(customized_weight_config=layout), dict(nodes_to_exclude=exclude))]
    for bits, algo_config, nodes in passes:
        quantizer = MatMulNBitsQuantizer(model, bits=bits, algo_config=algo_config, **common, **nodes)
        with contextlib.redirect_stdout(io.StringIO()):  # k_quant draws its own progress bar on stdout
            quantizer.process()
        model = quantizer.model.model
    _save(model, dst)


def _layer_kind(name: str, layers: set[int], kinds: set[str]) -> bool:
    """A MatMul of one of `kinds` (projection names) in one of `layers` (Optimum's node names)."""
    parts = name.split("/")
    for part in parts[:-2]:
        if part.startswith("layers.") and part[7:].isdigit() and int(part[7:]) in layers:
            return parts[-2] in kinds
    return False


def quantize_int8(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = dst.with_name("int8-work.onnx")
    quantize_dynamic(
        str(src),
        str(tmp),
        weight_type=QuantType.QInt8,
        per_channel=True,
        op_types_to_quantize=["MatMul"],
        use_external_data_format=True,
    )
    _save(_load(tmp), dst)
    for leftover in dst.parent.glob("int8-work.onnx*"):
        leftover.unlink()


def write_genai_config(model_dir: Path, out: Path) -> None:
    """Describe the Optimum graph for onnxruntime-genai: it takes position_ids, and past/present are separate buffers."""
    import onnx

    config = json.loads((model_dir / "config.json").read_text())
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    inputs = {i.name for i in graph.input}
    heads = config["num_attention_heads"]
    hidden = config["hidden_size"]
    kv_heads = config.get("num_key_value_heads", heads)
    context = config.get("max_position_embeddings", 2048)
    names = {
        "input_ids": "input_ids",
        "attention_mask": "attention_mask",
        "past_key_names": "past_key_values.%d.key",
        "past_value_names": "past_key_values.%d.value",
    }
    if "position_ids" in inputs:
        names["position_ids"] = "position_ids"
    genai = {
        "model": {
            "bos_token_id": config.get("bos_token_id"),
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": "model.onnx",
                "head_size": config.get("head_dim") or hidden // heads,
                "hidden_size": hidden,
                "inputs": names,
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": heads,
                "num_hidden_layers": config["num_hidden_layers"],
                "num_key_value_heads": kv_heads,
            },
            "eos_token_id": config.get("eos_token_id"),
            "pad_token_id": config.get("pad_token_id")
            if config.get("pad_token_id") is not None
            else config.get("eos_token_id"),
            "type": config["model_type"],
            "vocab_size": config["vocab_size"],
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": context,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            # The Optimum graph concatenates past and new keys itself, so genai must not share one buffer.
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 50,
            "top_p": 1.0,
        },
    }
    (out / "genai_config.json").write_text(json.dumps(genai, indent=4))
