"""Smaller int4 folders holding the same model: quantization scales stored in fp16, no zero points
that repeat the default, rotary tables computed at load, the tokenizer without indentation.

MatMulNBits and GatherBlockQuantized take their scales in the activations' type (fp32 on CPU), so
an int4 folder spends 32 bits per block of 32 weights on scales: 1 bit a weight, 17 MB of the
previous 152 MB SmolLM2-135M folder. llama.cpp's Q4/Q8 blocks keep them in fp16. Here every scale
is rounded to a value fp16 holds exactly when it is chosen (GPTQ and the int8 tables round
against that value), stored as fp16 and cast back by a Cast node. ONNX Runtime folds a Cast of an
initializer when it loads the model, so the kernels get the same fp32 scales as before and
nothing runs per token (tests/test_compact.py: the same logits, bit for bit).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edgeft.errors import ExportError

QUANTIZED_OPS = ("MatMulNBits", "GatherBlockQuantized")  # inputs: weights, (indices,) scales, zero points
FP16_SMALLEST_NORMAL = 2.0**-14


def fp16_exact(scales):
    """Scales as the nearest values fp16 holds exactly (fp32 out; numpy or torch), never 0 or subnormal."""
    if isinstance(scales, np.ndarray):
        return np.maximum(scales, FP16_SMALLEST_NORMAL).astype(np.float16).astype(np.float32)
    import torch

    return torch.clamp(scales, min=FP16_SMALLEST_NORMAL).to(torch.float16).to(scales.dtype)


def compact_weights(folder: Path, model_config: dict) -> int:
    """Store the folder's quantization scales in fp16, drop zero points that only repeat the
    default, compute the rotary tables at load; returns the bytes saved."""
    import onnx

    proto = onnx.load(str(folder / "model.onnx"))
    graph = proto.graph
    saved = _drop_default_zero_points(graph) + _scales_to_fp16(graph) + _rotary_tables_at_load(graph, model_config)
    save_model(proto, folder)
    return saved


def _quantized_nodes(graph):
    return [node for node in graph.node if node.op_type in QUANTIZED_OPS]


def _scales_to_fp16(graph) -> int:
    """Every fp32 scale as fp16 behind a Cast. Scales not chosen as fp16 values (the builder's own
    k_quant ones) move by at most 2^-11 of themselves, far below an int4 step."""
    from onnx import TensorProto, helper, numpy_helper

    initializers = {t.name: t for t in graph.initializer}
    saved, casts = 0, []
    for name in sorted({node.input[2] for node in _quantized_nodes(graph)}):
        tensor = initializers.get(name)
        if tensor is None or tensor.data_type != TensorProto.FLOAT:
            continue
        scales = numpy_helper.to_array(tensor)
        half = fp16_exact(scales).astype(np.float16)
        graph.initializer.remove(tensor)
        graph.initializer.append(numpy_helper.from_array(half, f"{name}_fp16"))
        casts.append(helper.make_node("Cast", [f"{name}_fp16"], [name], name=f"{name}/Cast", to=TensorProto.FLOAT))
        saved += scales.nbytes - half.nbytes
    for cast in reversed(casts):
        graph.node.insert(0, cast)
    return saved


def _drop_default_zero_points(graph) -> int:
    """Symmetric blocks (the int8 tables and MatMuls) store a zero point of 2^(bits-1) for every
    block, which both ops assume when the input is left out (checked in tests/test_compact.py)."""
    from onnx import numpy_helper

    initializers = {t.name: t for t in graph.initializer}
    default = {}
    for node in _quantized_nodes(graph):
        bits = next(a.i for a in node.attribute if a.name == "bits")
        name = node.input[3] if len(node.input) > 3 else ""
        tensor = initializers.get(name)
        if tensor is None:
            continue
        points = numpy_helper.to_array(tensor)
        middle = 2 ** (bits - 1)
        expected = middle | (middle << 4) if bits == 4 else middle  # 4-bit points are packed two a byte
        default[name] = default.get(name, True) and bool((points == expected).all())
    saved = 0
    for node in _quantized_nodes(graph):
        if len(node.input) > 3 and default.get(node.input[3]):
            if len(node.input) > 4:
                node.input[3] = ""  # an optional input left out, before ones that are not
            else:
                del node.input[3]
    read = {name for node in graph.node for name in node.input}
    for name in [n for n, is_default in default.items() if is_default and n not in read]:
        saved += len(initializers[name].raw_data) or numpy_helper.to_array(initializers[name]).nbytes
        graph.initializer.remove(initializers[name])
    return saved


ROTARY_TABLES = ("cos_cache", "sin_cache")


def _rotary_tables_at_load(graph, model_config: dict) -> int:
    """The builder stores cos and sin of position x frequency for every position (8192 x 32 x 2 fp32
    for SmolLM2-135M: 2 MB). For plain RoPE the graph can compute them from the 32 frequencies
    instead, folded once at load like the scales' Casts. Kept only where ONNX Runtime reproduces the
    stored tables to 1e-6 (scaled RoPE variants, Phi-3's for one, keep their tables)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    tables = {t.name: t for t in graph.initializer if t.name in ROTARY_TABLES}
    head = model_config.get("head_dim") or model_config.get("hidden_size", 0) // max(
        1, model_config.get("num_attention_heads", 1)
    )
    theta = model_config.get("rope_theta")
    if len(tables) != 2 or not theta or model_config.get("rope_scaling"):
        return 0
    stored = {name: numpy_helper.to_array(t) for name, t in tables.items()}
    positions, half = stored["cos_cache"].shape
    if 2 * half != head:
        return 0
    frequencies = _frequencies(theta, head)
    nodes = [
        helper.make_node("Range", ["rotary/zero", "rotary/positions", "rotary/one"], ["rotary/t"], name="rotary/Range"),
        helper.make_node("Unsqueeze", ["rotary/t", "rotary/axis"], ["rotary/t_column"], name="rotary/Unsqueeze"),
        helper.make_node("Mul", ["rotary/t_column", "rotary/inv_freq"], ["rotary/angles"], name="rotary/Mul"),
        helper.make_node("Cos", ["rotary/angles"], ["cos_cache"], name="rotary/Cos"),
        helper.make_node("Sin", ["rotary/angles"], ["sin_cache"], name="rotary/Sin"),
    ]
    constants = [
        numpy_helper.from_array(np.array(0, np.float32), "rotary/zero"),
        numpy_helper.from_array(np.array(positions, np.float32), "rotary/positions"),
        numpy_helper.from_array(np.array(1, np.float32), "rotary/one"),
        numpy_helper.from_array(np.array([1], np.int64), "rotary/axis"),
        numpy_helper.from_array(frequencies, "rotary/inv_freq"),
    ]
    check = helper.make_model(
        helper.make_graph(
            nodes,
            "rotary",
            [],
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ROTARY_TABLES],
            constants,
        ),
        opset_imports=[helper.make_opsetid("", 21)],
        ir_version=10,
    )
    computed = ort.InferenceSession(check.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})
    if any(np.abs(c - stored[n]).max() > 1e-6 for c, n in zip(computed, ROTARY_TABLES)):
        return 0
    for tensor in tables.values():
        graph.initializer.remove(tensor)
    graph.initializer.extend(constants)
    for node in reversed(nodes):
        graph.node.insert(0, node)
    return sum(a.nbytes for a in stored.values()) - sum(len(c.raw_data) for c in constants)


def _frequencies(theta: float, dim: int) -> np.ndarray:
    """RoPE's inverse frequencies as the builder computes them (torch, fp32): bit for bit, since a
    frequency 1 ulp off moves the angle at position 8000 by up to 1e-3."""
    import torch

    return (1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))).numpy()


def minify_json(path: Path) -> None:
    """Rewrite a JSON file without indentation (transformers indents tokenizer.json: 3.4 MB -> 1.5 MB)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    path.write_text(json.dumps(data, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")


def save_model(proto, folder: Path) -> None:
    """Write a model whose tensors are all in memory back over the export's model.onnx(.data)."""
    import onnx

    data_file = folder / "model.onnx.data"
    locations = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    if locations - {data_file.name}:
        raise ExportError(f"{folder}: the export keeps weights in {sorted(locations)}, expected {data_file.name} only.")
    data_file.unlink()  # every tensor is in memory now; onnx would append to the old file
    onnx.save_model(
        proto,
        str(folder / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data_file.name,
        size_threshold=1024,
    )
