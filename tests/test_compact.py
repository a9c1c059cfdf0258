"""Smaller int4 folders: fp16-stored scales, the int8 matrix shared by the lookup and the head, a
compact tokenizer. Each must leave what the model computes as it was."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper

from edgeft.export import compact, embeddings
from edgeft.export.onnx import ExportConfig, export
from tests.helpers import merged


def test_fp16_exact_scales_survive_fp16_and_are_never_zero():
    scales = np.array([0.0, 1e-9, 3e-3, 0.123456789, 7.5], dtype=np.float32)
    exact = compact.fp16_exact(scales)
    assert exact.dtype == np.float32 and (exact > 0).all()
    np.testing.assert_array_equal(exact.astype(np.float16).astype(np.float32), exact)
    assert abs(exact[3] / scales[3] - 1) <= 2**-11


@pytest.mark.parametrize("bits", [4, 8])
def test_onnx_runtime_assumes_the_zero_points_compaction_drops(bits):
    """MatMulNBits and GatherBlockQuantized without zero points compute as with 2^(bits-1) in every block."""
    from onnx import helper

    rows, cols, block = 64, 128, 32
    rng = np.random.default_rng(0)
    per_byte = 8 // bits
    packed = rng.integers(0, 256, (rows, cols // block, block // per_byte)).astype(np.uint8)
    middle = 2 ** (bits - 1)
    points = np.full(
        (rows, (cols // block + per_byte - 1) // per_byte), middle | (middle << 4) if bits == 4 else middle
    )
    scales = rng.random((rows, cols // block)).astype(np.float32)
    x = rng.random((1, cols)).astype(np.float32)

    def run(with_points):
        inits = [
            numpy_helper.from_array(packed, "B"),
            numpy_helper.from_array(scales, "S"),
            numpy_helper.from_array(np.array([rows, cols // per_byte], np.int64), "shape"),
        ]
        extra = ["Z"] if with_points else []
        if with_points:
            inits.append(numpy_helper.from_array(points.astype(np.uint8), "Z"))
        nodes = [
            helper.make_node(
                "MatMulNBits",
                ["A", "B", "S", *extra],
                ["Y"],
                domain="com.microsoft",
                K=cols,
                N=rows,
                bits=bits,
                block_size=block,
                accuracy_level=4,
            ),
            helper.make_node("Reshape", ["B", "shape"], ["T"]),
            helper.make_node(
                "GatherBlockQuantized",
                ["T", "ids", "S", *extra],
                ["E"],
                domain="com.microsoft",
                bits=bits,
                block_size=block,
                gather_axis=0,
                quantize_axis=1,
            ),
        ]
        graph = helper.make_graph(
            nodes,
            "g",
            [
                helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, cols]),
                helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 3]),
            ],
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("Y", "E")],
            inits,
        )
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)], ir_version=10
        )
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(None, {"A": x, "ids": np.array([[0, 5, 63]])})

    with_points, without = run(True), run(False)
    for a, b in zip(with_points, without):
        # the same values up to float32 summation order: on AVX2-only CPUs MLAS takes another kernel
        # without zero points (1e-7 apart); any other assumed zero point moves them by whole units
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert np.abs(with_points[1]).max() > 0


def _logits(folder, model_file="model.onnx"):
    """Logits of one prompt through ONNX Runtime (the decoder graph, an empty KV cache)."""
    session = ort.InferenceSession(str(folder / model_file), providers=["CPUExecutionProvider"])
    feeds = {}
    ids = np.array([[1, 5, 9, 14, 3, 22]], dtype=np.int64)
    for inp in session.get_inputs():
        if inp.name == "input_ids":
            feeds[inp.name] = ids
        elif inp.name == "attention_mask":
            feeds[inp.name] = np.ones_like(ids)
        elif inp.name == "position_ids":
            feeds[inp.name] = np.arange(ids.shape[1], dtype=np.int64)[None]
        else:  # past key/values: [batch, kv heads, 0, head size]
            head = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]["head_size"]
            sizes = {"batch_size": 1, "past_sequence_length": 0, "kv_cache_dim": head}
            feeds[inp.name] = np.zeros([sizes.get(d, d) for d in inp.shape], dtype=np.float32)
    return session.run(["logits"], feeds)[0]


def _scales_back_in_fp32(folder, out_file):
    """The same model with every fp16 scale an fp32 initializer again (no Cast): what the kernels
    computed with before scales were stored in fp16."""
    proto = onnx.load(str(folder / "model.onnx"))
    graph = proto.graph
    casts = [n for n in graph.node if n.op_type == "Cast" and n.input[0].endswith("_fp16")]
    by_name = {t.name: t for t in graph.initializer}
    for cast in casts:
        half = by_name[cast.input[0]]
        graph.initializer.remove(half)
        graph.initializer.append(
            numpy_helper.from_array(numpy_helper.to_array(half).astype(np.float32), cast.output[0])
        )
        graph.node.remove(cast)
    onnx.save_model(proto, str(folder / out_file))
    return len(casts)


def test_an_int4_export_stores_scales_in_fp16_and_computes_the_same(tiny_llama_run):
    out = export(merged(tiny_llama_run), ExportConfig(verify=False, int8_matmuls="attention"))
    record = json.loads((out / "edgeft-export.json").read_text())
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    initializers = {t.name: t for t in graph.initializer}
    quantized = [n for n in graph.node if n.op_type in compact.QUANTIZED_OPS]
    assert {n.op_type for n in quantized} == {"MatMulNBits", "GatherBlockQuantized"}
    for node in quantized:
        assert node.input[2] not in initializers, node.name  # scales come out of a Cast
        assert initializers[node.input[2] + "_fp16"].data_type == TensorProto.FLOAT16
    assert record["compacted_bytes"] > 0
    # Plain RoPE: the cos and sin tables are computed at load from the frequencies, not stored.
    assert not set(compact.ROTARY_TABLES) & set(initializers)
    assert {"cos_cache", "sin_cache"} <= {out for n in graph.node if n.op_type in ("Cos", "Sin") for out in n.output}
    # Bit for bit what fp32 scales of the same values give: the Cast changes the file, not the model.
    assert _scales_back_in_fp32(out, "fp32-scales.onnx") == len({n.input[2] for n in quantized})
    np.testing.assert_array_equal(_logits(out), _logits(out, "fp32-scales.onnx"))


def test_the_lookup_and_the_head_can_share_one_int8_matrix(tiny_llama_run):
    """The tiny Llama ties its embedding to the head, like SmolLM2 (and like llama.cpp's Q8_0 token_embd)."""
    from edgeft.runtime import ChatModel

    run = merged(tiny_llama_run)
    out = export(run, ExportConfig(verify=False, embeddings="int8-shared", int8_matmuls="none"))
    record = json.loads((out / "edgeft-export.json").read_text())
    assert record["embeddings"] == "int8-shared" and record["gptq"]["matmuls"] == 2 * 5  # the head is not GPTQ's
    proto = onnx.load(str(out / "model.onnx"))
    graph = proto.graph
    lookup = next(n for n in graph.node if n.op_type == "GatherBlockQuantized")
    head = next(n for n in graph.node if n.op_type == "MatMulNBits" and "lm_head" in n.name)
    bits = {n.name: {a.name: a.i for a in n.attribute}["bits"] for n in (lookup, head)}
    assert set(bits.values()) == {8}
    reshape = next(n for n in graph.node if lookup.input[0] in n.output)
    assert reshape.input[0] == head.input[1] and lookup.input[2:] == head.input[2:]  # one matrix, one set of scales
    assert not [t.name for t in graph.initializer if "lm_head" in t.name and "Q4" in t.name]  # the int4 copy is gone

    # The shared matrix is the model's own table to int8 precision.
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    casts = {n.output[0]: values[n.input[0]] for n in graph.node if n.op_type == "Cast" and n.input[0] in values}
    codes, scales = values[head.input[1]].astype(np.float32), casts[head.input[2]].astype(np.float32)
    table = embeddings.embedding_table(run / "merged")
    back = ((codes - 128) * scales[..., None]).reshape(table.shape)
    assert np.abs(back - table).max() <= scales.max() / 2 * 1.001

    same = export(
        run, ExportConfig(verify=False, embeddings="same", int8_matmuls="none", output=str(tiny_llama_run / "same"))
    )
    assert record["size_bytes"] > json.loads((same / "edgeft-export.json").read_text())["size_bytes"]
    reply = ChatModel.load(out).chat([{"role": "user", "content": "hi"}], max_tokens=4, temperature=0)
    assert reply.usage["completion_tokens"] >= 1


def test_the_exported_tokenizer_is_compact_and_the_same(tiny_llama_run):
    name = "tokenizer.json"
    run = merged(tiny_llama_run)
    out = export(run, ExportConfig(verify=False))
    source, written = (run / "merged" / name).read_text(), (out / name).read_text()
    assert json.loads(written) == json.loads(source) and len(written) < len(source)
    assert "\n" not in written


def test_rotary_tables_stay_stored_unless_onnx_runtime_reproduces_them(tiny_llama_run, monkeypatch):
    run = merged(tiny_llama_run)
    monkeypatch.setattr(compact, "_frequencies", lambda theta, dim: np.full(dim // 2, 0.5, np.float32))
    out = export(run, ExportConfig(verify=False))
    names = {t.name for t in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.initializer}
    assert set(compact.ROTARY_TABLES) <= names
