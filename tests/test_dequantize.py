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
