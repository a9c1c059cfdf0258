"""GPTQ rounding and the separate int8 embedding table: the algorithm, the byte layout, and exports that use them."""

import json

import numpy as np
import pytest
import torch

from edgeft.artifacts import Run
from edgeft.errors import ConfigError
from edgeft.export import embeddings, gptq
from edgeft.export.dequantize import nbits_weight
from edgeft.export.onnx import ExportConfig, export
from tests.helpers import merged


def _correlated_inputs(n=512, k=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) * torch.linspace(0.1, 3.0, k)  # uneven, correlated features
    return torch.randn(n, k, generator=g, dtype=torch.float64) @ mix.double()


def _dequantize(codes, scales, zeros, block):
    rows, cols = codes.shape
    c = codes.double().reshape(rows, cols // block, block)
    return ((c - zeros.double()[..., None]) * scales.double()[..., None]).reshape(rows, cols)


@pytest.mark.parametrize("act_order,bound", [(True, 0.7), (False, 0.95)])
def test_gptq_moves_outputs_less_than_plain_rounding(act_order, bound):
    X = _correlated_inputs()
    W = torch.randn(48, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    codes, scales, zeros = gptq.quantize(W, X.T @ X, 32, act_order=act_order)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15 and scales.shape == zeros.shape == (48, 2)
    rtn_scales, rtn_zeros = gptq._block_grid(W.reshape(48 * 2, 32), 15)
    rtn = torch.clamp(torch.round(W.reshape(96, 32) / rtn_scales[:, None]) + rtn_zeros[:, None], 0, 15)
    rtn_w = ((rtn - rtn_zeros[:, None]) * rtn_scales[:, None]).reshape(48, 64)
    gptq_error = torch.linalg.norm(X @ (W - _dequantize(codes, scales, zeros, 32)).T)
    rtn_error = torch.linalg.norm(X @ (W - rtn_w).T)
    assert gptq_error < bound * rtn_error  # measured over seeds: 0.61 with act-order, 0.88 without


def test_gptq_handles_dead_inputs_and_refuses_ragged_blocks():
    X = _correlated_inputs(k=64)
    X[:, 5] = 0  # an input that never fires
    W = torch.randn(8, 64, dtype=torch.float64)
    codes, _, _ = gptq.quantize(W, X.T @ X, 32)
    assert codes.shape == (8, 64)
    with pytest.raises(Exception, match="multiple of the block size"):
        gptq.quantize(torch.randn(8, 48), torch.eye(48), 32)


def test_pack_is_matmulnbits_layout():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, (6, 96)).astype(np.uint8)
    zeros = rng.integers(0, 16, (6, 3)).astype(np.uint8)
    scales = rng.random((6, 3)).astype(np.float32)
    packed, packed_zeros = gptq.pack(codes, zeros, 32)
    assert packed.shape == (6, 3, 16) and packed_zeros.shape == (6, 2)
    assert packed[0, 0, 0] == codes[0, 0] | (codes[0, 1] << 4)  # low nibble first
    expected = ((codes.reshape(6, 3, 32).astype(np.float32) - zeros[..., None]) * scales[..., None]).reshape(6, 96)
    unpacked = nbits_weight(
        packed, scales.ravel(), packed_zeros, n=6, k=96, bits=4, block=32
    )  # as the kernel reads them
    np.testing.assert_allclose(unpacked, expected)


def test_int8_table_round_trips():
    table = np.random.default_rng(0).normal(size=(10, 64)).astype(np.float32)
    codes, scales, zeros = embeddings.quantize_int8(table, 32)
    back = ((codes.reshape(10, 2, 32).astype(np.float32) - zeros[..., None]) * scales[..., None]).reshape(10, 64)
    assert np.abs(back - table).max() <= scales.max() / 2 + 1e-6


def _int4_weights(folder) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(folder / "model.onnx"))
    names = {
        n.input[1]
        for n in model.graph.node
        if n.op_type == "MatMulNBits" and any(a.name == "bits" and a.i == 4 for a in n.attribute)
    }
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name in names}


def test_int4_export_with_gptq_and_a_separate_int8_table(tiny_llama_run, tmp_path):
    """The tiny Llama ties its embedding to the head, like SmolLM2; its run has training data to calibrate on."""
    import onnx

    out = export(merged(tiny_llama_run), ExportConfig(verify_samples=2, int8_matmuls="none", embeddings="int8"))
    record = Run.open(tiny_llama_run).stage("export")
    assert record["rounding"] == "gptq" and record["embeddings"] == "int8"
    assert record["gptq"]["matmuls"] == 2 * 5  # per layer: the fused qkv, o, gate, up, down (the head keeps k_quant)
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    lookup = next(n for n in graph.node if n.op_type == "GatherBlockQuantized")
    assert {a.name: a.i for a in lookup.attribute}["bits"] == 8
    assert embeddings.shared_lookup(graph) is None  # the head's int4 matrix is no longer read by the lookup
    assert record["verification"]["samples"] == 2

    plain = export(
        tiny_llama_run,
        ExportConfig(
            verify=False,
            int8_matmuls="none",
            quant_method="k_quant",
            embeddings="same",
            block_size=32,  # the auto block size, so that the same weights sit under the same names
            output=str(tmp_path / "k"),
        ),
    )
    assert json.loads((plain / "edgeft-export.json").read_text())["rounding"] == "k_quant"
    rounded, reference = _int4_weights(out), _int4_weights(plain)
    changed = [
        name
        for name in rounded
        if not name.startswith("lm_head") and not np.array_equal(rounded[name], reference[name])
    ]
    assert len(changed) == record["gptq"]["matmuls"]

    from edgeft.runtime import ChatModel

    reply = ChatModel.load(out).chat([{"role": "user", "content": "hi"}], max_tokens=4, temperature=0)
    assert reply.usage["completion_tokens"] >= 1


def test_gptq_needs_calibration_data_and_the_builder(tiny_phi3, tiny_llama_run, tmp_path):
    merged(tiny_llama_run)
    with pytest.raises(ConfigError, match="--calibration"):
        export(tiny_phi3, ExportConfig(quant_method="gptq", output=str(tmp_path / "a")))
    with pytest.raises(ConfigError, match="genai backend"):
        export(tiny_llama_run, ExportConfig(quant_method="gptq", backend="optimum", output=str(tmp_path / "b")))
    with pytest.raises(ConfigError, match="no such file"):
        export(tiny_llama_run, ExportConfig(calibration=str(tmp_path / "missing.jsonl"), output=str(tmp_path / "c")))
    bare = export(tiny_phi3, ExportConfig(verify=False, output=str(tmp_path / "d")))  # auto: nothing to calibrate on
    assert json.loads((bare / "edgeft-export.json").read_text())["rounding"] == "k_quant"


def _linear_inputs(model, names, batches) -> dict:
    """Each named Linear's input in each example, the model run on the examples one at a time."""
    inputs = {name: [] for name in names}
    handles = [
        model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: inputs[n].append(i[0][0])) for n in names
    ]
    with torch.no_grad():
        for ids in batches:
            model(torch.tensor([ids]))
    for handle in handles:
        handle.remove()
    return inputs


def test_hessians_are_each_layers_own(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    names = [f"model.layers.{i}.mlp.{kind}" for i in range(2) for kind in ("gate_proj", "up_proj", "down_proj")]
    batches = [[1, 5, 9, 3, 7], [2, 4, 6, 8, 10], [3, 3, 3, 11, 12]]
    H = gptq.hessians(model, names, batches)
    inputs = _linear_inputs(model, names, batches)
    for name in names:
        seen = sum((x.T @ x).double() for x in inputs[name])
        torch.testing.assert_close(H[name], seen, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(H["model.layers.0.mlp.gate_proj"], H["model.layers.1.mlp.gate_proj"])


def test_shared_prefix_leaves_each_example_a_token():
    assert gptq.shared_prefix([[1, 2, 3, 4], [1, 2, 3, 9], [1, 2, 5]]) == 2
    assert gptq.shared_prefix([[1, 2, 3], [1, 2, 3, 4]]) == 2  # the shorter keeps its last token
    assert gptq.shared_prefix([[7, 2], [1, 2]]) == 0
    assert gptq.shared_prefix([[1, 2, 3]]) == 0
    assert gptq.shared_prefix([[], [1, 2]]) == 0  # never negative


def _chats(path, examples):
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in examples))
    return path


def test_calibration_takes_more_short_examples_and_never_the_held_out_ones(tiny_llama, tmp_path):
    """64 short messages under one long system prompt hold few tokens of their own; the gate's prompts stay out."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    system = {"role": "system", "content": "Pick one label: " + ", ".join(f"label_{i}" for i in range(12))}
    short = [
        [system, {"role": "user", "content": f"message {i}"}, {"role": "assistant", "content": f"label_{i % 12}"}]
        for i in range(300)
    ]
    data, held = _chats(tmp_path / "short.jsonl", short), _chats(tmp_path / "held.jsonl", short[::15])
    every = gptq.calibration_ids(tokenizer, data)
    assert len(every) == 300
    kept = gptq.calibration_ids(tokenizer, data, held_out=held)
    assert len(kept) == 280 and not {tuple(ids) for ids in kept} & {tuple(ids) for ids in every[::15]}

    words = ["salt", "pepper", "flour", "butter", "sugar", "eggs", "milk", "water", "oil", "garlic", "onion", "basil"]
    long = [
        [
            {"role": "user", "content": " ".join(words[(i + j) % 12] + str(j) for j in range(80))},
            {"role": "assistant", "content": "ok"},
        ]
        for i in range(300)
    ]
    assert len(gptq.calibration_ids(tokenizer, _chats(tmp_path / "long.jsonl", long))) == 64


def test_a_prefix_every_example_shares_counts_once(tiny_llama):
    """A system prompt 64 examples repeat would outweigh what differs; its states are the same in each."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    names = ["model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    prompt = [4, 8, 15, 16, 23, 42]
    batches = [prompt + [5, 9], prompt + [7], prompt + [11, 12, 13]]
    H = gptq.hessians(model, names, batches)
    inputs = _linear_inputs(model, names, batches)
    for name in names:
        first, *rest = inputs[name]
        once = torch.cat([first] + [x[len(prompt) :] for x in rest]).double()
        torch.testing.assert_close(H[name], once.T @ once, rtol=1e-4, atol=1e-5)
        every = torch.cat(inputs[name]).double()
        assert not torch.allclose(H[name], every.T @ every, rtol=1e-3)


def test_every_int4_projection_is_rounded(tiny_run_dir):
    """Llama stacks q, k, v into the builder's qkv_proj; Phi-3 fuses gate and up in torch, which the builder splits."""
    export(merged(tiny_run_dir), ExportConfig(verify=False, int8_matmuls="none"))
    assert (
        Run.open(tiny_run_dir).stage("export")["gptq"]["matmuls"] == 2 * 5
    )  # qkv, o, gate, up, down in each of 2 layers
