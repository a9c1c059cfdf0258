"""export/dequantize.py: an int4 export's weights back in a transformers model compute what the
export computes (the int4 and int8 MatMuls, zero points or none, shared or own embedding table)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgeft.errors import ExportError
from edgeft.export import adapters
from edgeft.export.dequantize import nbits_weight, write_dequantized
from edgeft.export.gptq import pack_zero_points
from edgeft.export.onnx import ExportConfig, export

LAYOUTS = {
    "symmetric, int8 attention, int8 table shared with the head": {},
    "zero points, all int4, own int8 table": {"symmetric": False, "int8_matmuls": "none", "embeddings": "int8"},
}


def test_nbits_weight_reads_codes_as_the_kernel_does():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, size=(3, 2, 32))  # N=3 rows, K=40 in 2 blocks of 32 (the last one padded)
    zeros = rng.integers(0, 16, size=(3, 2))
    scales = rng.random((3, 2)).astype(np.float32)
    expected = ((codes - zeros[..., None]) * scales[..., None]).reshape(3, 64)[:, :40]
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    got = nbits_weight(packed, scales.ravel(), pack_zero_points(zeros.astype(np.uint8)), n=3, k=40, bits=4, block=32)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    symmetric = nbits_weight(packed, scales.ravel(), None, n=3, k=40, bits=4, block=32)
    np.testing.assert_allclose(symmetric, ((codes - 8) * scales[..., None]).reshape(3, 64)[:, :40], rtol=1e-6)
    eight = rng.integers(0, 256, size=(3, 2, 32)).astype(np.uint8)
    got = nbits_weight(eight, scales.ravel(), None, n=3, k=64, bits=8, block=32)
    np.testing.assert_allclose(got, ((eight.astype(np.float32) - 128) * scales[..., None]).reshape(3, 64), rtol=1e-6)


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_a_dequantized_export_computes_what_the_export_computes(tiny_model, tmp_path, layout):
    import torch
    from transformers import AutoModelForCausalLM

    from edgeft.export.verify import OnnxScorer
    from edgeft.fidelity import TorchScorer

    # accuracy level 1: the export's MatMuls in fp32, so only the weights can differ
    settings = {"accuracy_level": 1, "verify": False, "quant_method": "rtn", **layout}
    folder = export(str(tiny_model), ExportConfig(precision="int4", output=str(tmp_path / "int4"), **settings))
    hf = write_dequantized(folder, tiny_model, tmp_path / "hf")
    prompt, answer = [5, 17, 42, 9, 33, 2, 71], [12, 8, 40, 3]
    onnx_logits = OnnxScorer(folder).logits(prompt, answer)

    def difference(path):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        return float(np.abs(TorchScorer(model, 0).logits(prompt, answer) - onnx_logits).max())

    dequantized, original = difference(hf), difference(tiny_model)
    assert dequantized < 1e-4, dequantized  # float sums in another order, nothing more
    assert original > 100 * dequantized, (original, dequantized)  # the rounding itself, which the check must see


def test_an_adapter_trained_on_a_dequantized_export_runs_on_that_export(tiny_llama, tmp_path, monkeypatch):
    """Train on an export's own weights, export --as-adapter: the base is that export itself (not
    its weights rounded again), and base + adapter is the model as trained."""
    from edgeft.runtime.adapters import BASE_FILE
    from tests.helpers import tiny_run

    monkeypatch.setenv("EDGEFT_HOME", str(tmp_path / "home"))
    settings = {"precision": "int4", "quant_method": "rtn", "accuracy_level": 1}
    int4 = export(str(tiny_llama), ExportConfig(verify=False, output=str(tmp_path / "int4"), **settings))
    run = tiny_run(write_dequantized(int4, tiny_llama, tmp_path / "hf"), tmp_path / "r")
    out = adapters.export(run, ExportConfig(as_adapter=True, verify_samples=4, **settings))
    info = json.loads((out / "edgeft-export.json").read_text())
    base = Path(info["base"])
    assert json.loads((base / BASE_FILE).read_text())["loaded"] == f"the export {int4.resolve()}, dequantized"
    assert (base / "model.onnx.data").read_bytes() == (int4 / "model.onnx.data").read_bytes()  # the very weights
    assert info["verification"]["max_abs_logit_diff"] < 1e-3, info["verification"]
    assert info["verification"]["token_agreement"] == 1.0

    # the export it came from gone: a clear error, not a base rounded again behind the user's back
    for folder in (base, int4):
        shutil.rmtree(folder)
    with pytest.raises(ExportError, match="which is gone"):
        adapters.export(run, ExportConfig(as_adapter=True, verify=False, **settings), force=True)


def test_tune_on_an_export_then_export_and_chat_with_the_run(tiny_llama, tmp_path, monkeypatch):
    """The path in docs/adapters.md: `edgeft tune --model EXPORT` trains LoRA against the export's own
    weights (made into a model folder once per export), `edgeft export RUN` then gives the adapter for
    that very export, and `edgeft chat RUN` / ChatModel.load(RUN) answer with the base + adapter, as
    the model as trained does. What cannot work is refused in one line before any training."""
    from edgeft.artifacts import Run, dir_size
    from edgeft.export.dequantize import SOURCE_FILE, source_export
    from edgeft.runtime import ChatModel
    from edgeft.runtime.adapters import ADAPTER_FILE
    from edgeft.runtime.server import create_app
    from tests.helpers import LiveServer, recipes_like, run_cli

    monkeypatch.setenv("EDGEFT_HOME", str(tmp_path / "home"))
    settings = {"quant_method": "rtn", "accuracy_level": 1}
    int4 = export(
        str(tiny_llama), ExportConfig(precision="int4", verify=False, output=str(tmp_path / "int4"), **settings)
    )
    # tiny_llama keeps its template in chat_template.jinja: the export carries it in tokenizer_config.json
    assert "chat_template" in json.loads((int4 / "tokenizer_config.json").read_text())
    data, held = recipes_like(tmp_path / "train.jsonl"), recipes_like(tmp_path / "eval.jsonl", n=6, seed=1)
    small = ["--epochs", "1", "--batch-tokens", "128", "--max-seq-len", "64", "--precision", "fp32"]

    def tune(name: str, *extra: str, model=int4):
        return run_cli(
            "tune", "--model", model, "--data", data, "--eval-file", held, "--output", tmp_path / name, *small, *extra
        )

    assert "Training against the weights of the export" in tune("run").output
    run = Run.open(tmp_path / "run")
    assert run.stage("tune")["config"]["method"] == "lora"  # not QLoRA: that would round the weights again
    base = run.base_model().path
    assert source_export(base) == int4.resolve() and (base / "model.safetensors").is_file()
    made = (base / SOURCE_FILE).stat().st_mtime_ns
    tune("again")
    assert Run.open(tmp_path / "again").base_model().path == base and (base / SOURCE_FILE).stat().st_mtime_ns == made
    # --int4-base: the model's own int4 export is made (once) and trained against
    outputs = [tune(name, "--int4-base", model=tiny_llama).output for name in ("made", "reused")]
    assert ["to int4 (once)" in out for out in outputs] == [True, False]
    made, reused = (source_export(Run.open(tmp_path / name).base_model().path) for name in ("made", "reused"))
    assert made == reused and made.parent.name == "int4-exports"
    assert json.loads((made / "edgeft-export.json").read_text())["precision"] == "int4"

    out = run_cli("export", run.path, "--verify-samples", "4", "--accuracy-level", "1").output
    assert "exporting its adapter" in out
    assert (run.path / "onnx-adapter" / ADAPTER_FILE).is_file() and not (run.path / "onnx-int4").exists()
    info = json.loads((run.path / "onnx-adapter" / "edgeft-export.json").read_text())
    assert info["verification"]["token_agreement"] == 1.0, info["verification"]  # deployed = as trained

    model = ChatModel.load(run.path)
    assert model.adapter == "run" and model.path == Path(info["base"])
    question = [{"role": "user", "content": "Ingredients: 2 cups tomato, 2 cups egg"}]
    greedy = {"max_tokens": 8, "temperature": 0}
    same = ChatModel.load(info["base"], adapter=run.path / "onnx-adapter").chat(question, **greedy).text
    assert model.chat(question, **greedy).text == same
    chatted = run_cli("chat", run.path, "--prompt", question[0]["content"], "--max-tokens", "8", "--temperature", "0")
    assert same.strip() in chatted.output
    run_cli("bench", run.path, "--runs", "1", "--decode-tokens", "8")  # the base answering with the adapter
    (measured,) = json.loads((run.logs_dir / "bench.json").read_text())["results"]
    assert measured["decode_tokens_per_s"]["median"] > 0 and "error" not in measured
    assert measured["size_bytes"] == dir_size(run.path / "onnx-adapter") + dir_size(Path(info["base"]))
    live = LiveServer(create_app(ChatModel.load(run.path), parallel=2))  # what `edgeft serve RUN` serves
    try:
        reply = live.client().chat.completions.create(model="run", messages=question, **greedy)
        assert reply.choices[0].message.content == same
    finally:
        live.stop()

    refused = {
        ("--method", "qlora"): "would round the weights",
        ("--model", str(run.path / "onnx-adapter")): "is a runtime adapter, not a model",
    }
    for extra, message in refused.items():
        result = run_cli("tune", "--model", int4, "--data", data, "--output", tmp_path / "no", *small, *extra, ok=False)
        assert result.exit_code != 0 and message in result.output, result.output
        assert not (tmp_path / "no").exists()
