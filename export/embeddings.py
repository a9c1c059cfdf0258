"""An int8 token-embedding table of its own for int4 exports of models that tie it to the head.

The builder shares one int4 matrix between the embedding lookup and the output head. The head is a
MatMul, whose rounding errors average out over 576 inputs; a lookup hands each token's rounded row
to the first layer as is. Measured on the recipe sample (200 answers, SmolLM2-135M fine-tuned, in
PyTorch with the export's dequantized weights): int4 head alone 82.5% exact match, int4 embedding
alone 75.5%, fp32 80.5%. So the head stays int4 and the table gets its own int8 copy (+30 MB for
SmolLM2-135M; decode speed unchanged, a lookup reads a few rows).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeft.errors import ExportError

EMBEDDING_KEYS = ("model.embed_tokens.weight", "transformer.wte.weight", "model.embed_in.weight")


def shared_lookup(graph):
    """The GatherBlockQuantized node that reads the head's int4 matrix, or None."""
    heads = {name for node in graph.node if node.op_type == "MatMulNBits" for name in node.input[1:]}
    producers = {out: node for node in graph.node for out in node.output}
    for node in graph.node:
        if node.op_type != "GatherBlockQuantized":
            continue
        data = producers.get(node.input[0])
        sources = set(node.input[2:]) | (set(data.input) if data is not None else set())
        if sources & heads:
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
    """Symmetric int8 per block of `block_size` along a row, as GatherBlockQuantized reads it: (code - 128) * scale."""
    rows, cols = table.shape
    blocks = table.reshape(rows, cols // block_size, block_size)
    scales = np.abs(blocks).max(axis=-1) / 127.0
    scales[scales == 0] = 1.0
    codes = np.clip(np.round(blocks / scales[..., None]), -127, 127) + 128
    zeros = np.full(scales.shape, 128, dtype=np.uint8)
    return codes.astype(np.uint8).reshape(rows, cols), scales.astype(np.float32), zeros


def separate_int8(model_dir: Path, folder: Path) -> bool:
    """Give the embedding lookup its own int8 table; False when the export shares none."""
    import onnx
    from onnx import numpy_helper

    model_file = folder / "model.onnx"
    proto = onnx.load(str(model_file), load_external_data=False)
    node = shared_lookup(proto.graph)
    if node is None:
        return False
    attrs = {a.name: a for a in node.attribute}
    block_size = attrs["block_size"].i
    codes, scales, zeros = quantize_int8(embedding_table(model_dir), block_size)
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
    still_read = {name for n in proto.graph.node for name in n.input}
    for producer in [n for n in proto.graph.node if old_data in n.output and old_data not in still_read]:
        proto.graph.node.remove(producer)  # the Reshape that viewed the head's matrix as a table
    data_file = folder / "model.onnx.data"
    locations = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    if locations - {data_file.name}:
        raise ExportError(f"{folder}: the export keeps weights in {sorted(locations)}, expected {data_file.name} only.")
    data_file.unlink()  # every tensor is in memory now; onnx would append to the old file
    onnx.save_model(
        proto,
        str(model_file),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data_file.name,
        size_threshold=1024,
    )
    return True
