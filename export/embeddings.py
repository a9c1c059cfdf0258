"""The embedding table of int4 exports of models that tie it to the head (SmolLM2, Llama 3.2 1B).

The builder shares one int4 matrix between the embedding lookup and the output head. The head is a
MatMul, whose rounding errors average out over 576 inputs; a lookup hands each token's rounded row
to the first layer as is. Measured on the recipe sample (200 answers, SmolLM2-135M fine-tuned, in
PyTorch with the export's dequantized weights): int4 head alone 82.5% exact match, int4 embedding
alone 75.5%, fp32 80.5%. Two ways out:
- `share_int8` (the default): one int8 matrix for both, as llama.cpp's Q8_0 token embedding; the
  head's MatMulNBits reads it at 8 bits and the lookup reads the same bytes. The size of one int8
  table, about 13 MB more than the int4 matrix for SmolLM2-135M.
- `separate_int8`: the lookup gets its own int8 table and the head keeps the int4 matrix (+15 MB
  over `share_int8`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeft.errors import ExportError
from edgeft.export.compact import fp16_exact, save_model

EMBEDDING_KEYS = ("model.embed_tokens.weight", "transformer.wte.weight", "model.embed_in.weight")


def shared_lookup(graph):
    """The GatherBlockQuantized node that reads the head's int4 matrix, or None."""
    heads = {name for node in graph.node if node.op_type == "MatMulNBits" for name in node.input[1:]}
    for node in graph.node:
        if node.op_type == "GatherBlockQuantized" and _lookup_sources(graph, node) & heads:
            return node
    return None


def embedding_table(model_dir: Path) -> np.ndarray:
    from safetensors import safe_open

    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            names = set(f.keys())  # safe_open has keys() but no `in`
            for key in EMBEDDING_KEYS:
                if key in names:
                    return f.get_tensor(key).float().numpy()
    raise ExportError(
        f"no token-embedding table ({' or '.join(EMBEDDING_KEYS)}) in the safetensors files of {model_dir}."
    )


def quantize_int8(table: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Symmetric int8 per block of `block_size` along a row, as GatherBlockQuantized reads it: (code - 128) * scale.
    Scales are values fp16 holds exactly: the folder stores them so (see compact.py)."""
    rows, cols = table.shape
    blocks = table.reshape(rows, cols // block_size, block_size)
    scales = fp16_exact(np.abs(blocks).max(axis=-1) / 127.0)
    codes = np.clip(np.round(blocks / scales[..., None]), -127, 127) + 128
    zeros = np.full(scales.shape, 128, dtype=np.uint8)
    return codes.astype(np.uint8).reshape(rows, cols), scales.astype(np.float32), zeros


def separate_int8(model_dir: Path, folder: Path) -> bool:
    """Give the embedding lookup its own int8 table; False when the export shares none."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    node = shared_lookup(proto.graph)
    if node is None:
        return False
    attrs = {a.name: a for a in node.attribute}
    codes, scales, zeros = quantize_int8(embedding_table(model_dir), attrs["block_size"].i)
    onnx.load_external_data_for_model(proto, str(folder))
    names = ("model.embed_tokens.weight_Q8", "model.embed_tokens.weight_scale", "model.embed_tokens.weight_zp")
    proto.graph.initializer.extend(numpy_helper.from_array(a, n) for a, n in zip((codes, scales, zeros), names))
    old_data = node.input[0]
    node.input[0], node.input[2] = names[0], names[1]
    if len(node.input) > 3:
        node.input[3] = names[2]
    else:
        node.input.append(names[2])
    attrs["bits"].i = 8
    _drop_unread(proto.graph, [old_data])  # the Reshape that viewed the head's matrix as a table
    save_model(proto, folder)
    return True


def share_int8(model_dir: Path, folder: Path) -> bool:
    """Make the matrix the lookup and the head share int8 (llama.cpp's Q8_0 token embedding): the
    lookup gets int8 rows and the head int8 weights, at the size of one int8 table. False when the
    export shares none."""
    import onnx
    from onnx import helper, numpy_helper

    proto = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    graph = proto.graph
    lookup = shared_lookup(graph)
    if lookup is None:
        return False
    head = next(
        n for n in graph.node if n.op_type == "MatMulNBits" and set(n.input[1:]) & set(_lookup_sources(graph, lookup))
    )
    head_attrs = {a.name: a for a in head.attribute}
    block_size, rows, cols = head_attrs["block_size"].i, head_attrs["N"].i, head_attrs["K"].i
    codes, scales, zeros = quantize_int8(embedding_table(model_dir), block_size)
    if codes.shape != (rows, cols):
        raise ExportError(f"{folder}: the head is {rows}x{cols} but the embedding table is {codes.shape}.")
    onnx.load_external_data_for_model(proto, str(folder))
    base = head.input[1].split(".MatMul.weight_Q4")[0]
    names = (f"{base}.MatMul.weight_Q8G{block_size}", f"{base}.MatMul.weight_scale8", f"{base}.MatMul.weight_zp8")
    arrays = (codes.reshape(rows, cols // block_size, block_size), scales, zeros)
    graph.initializer.extend(numpy_helper.from_array(a, n) for a, n in zip(arrays, names))
    shape = numpy_helper.from_array(np.array([rows, cols], dtype=np.int64), f"{base}.table_shape")
    graph.initializer.append(shape)
    table = f"{base}.table"
    graph.node.insert(0, helper.make_node("Reshape", [names[0], shape.name], [table], name=f"{table}/Reshape"))
    old = list(head.input[1:]) + [lookup.input[0]]
    head.input[1:] = list(names)
    head_attrs["bits"].i = 8
    lookup.input[0], lookup.input[2] = table, names[1]
    lookup.input[3:] = [names[2]]
    {a.name: a for a in lookup.attribute}["bits"].i = 8
    _drop_unread(graph, old)
    save_model(proto, folder)
    return True


def _lookup_sources(graph, lookup) -> set[str]:
    producers = {out: node for node in graph.node for out in node.output}
    data = producers.get(lookup.input[0])
    return set(lookup.input[2:]) | (set(data.input) if data is not None else set())


def _drop_unread(graph, names: list[str]) -> None:
    """Remove the nodes and initializers among `names` (and their producers) nothing reads any more."""
    while True:
        read = {name for n in graph.node for name in n.input}
        nodes = [n for n in graph.node if not set(n.output) & read and set(n.output) & set(names)]
        for node in nodes:
            graph.node.remove(node)
            names = names + list(node.input)
        if not nodes:
            break
    read = {name for n in graph.node for name in n.input}
    for tensor in [t for t in graph.initializer if t.name in names and t.name not in read]:
        graph.initializer.remove(tensor)
