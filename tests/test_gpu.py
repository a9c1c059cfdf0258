"""The CUDA path: run where torch sees a GPU, skipped elsewhere (CI has none).

    pytest -m gpu        # on a machine with an NVIDIA GPU, after `make setup`

What only a GPU exercises: bf16/fp16 selection and fp16 loss scaling, the variable-length
attention kernel, the chunked loss head, NF4 codes made by the CUDA kernels (the merge rebuilds
them on the CPU), a GPU checkpoint resumed on a CPU, and FSDP + QLoRA under `accelerate launch`.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch

from edgeft.artifacts import Run
from edgeft.pipeline import tune as tuning
from tests.conftest import REPO
from tests.helpers import recipes_like, small_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def adapter(run_dir):
    from safetensors.torch import load_file

    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


@pytest.mark.parametrize("method", ["qlora", "lora", "dora"])
def test_auto_trains_on_the_gpu_in_bf16_and_the_merge_matches_the_model_as_trained(tmp_path, tiny_model, method):
    from edgeft.pipeline.merge import merge

    data = recipes_like(tmp_path / "train.jsonl", n=24)
    eval_file = recipes_like(tmp_path / "eval.jsonl", n=6, seed=1)
    cfg = small_config(tiny_model, data, tmp_path / method, method=method, precision="auto", eval_file=str(eval_file))
    run_dir = tuning.tune(cfg)
    record = Run.open(run_dir).stage("tune")
    assert (record["device"], record["precision"]) == ("cuda", "bf16")
    metrics = record["metrics"]
    assert metrics["peak_memory_mb"] > 0 and math.isfinite(metrics["eval_loss"])
    merge(run_dir)  # on the CPU: its fidelity gate compares the merged model with the model as trained
    assert Run.open(run_dir).stage("merge")["status"] == "done"


def test_fp16_with_loss_scaling_where_bf16_is_not_native(tmp_path, tiny_llama, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    data = recipes_like(tmp_path / "train.jsonl", n=24)
    run_dir = tuning.tune(small_config(tiny_llama, data, tmp_path / "fp16", method="qlora", precision="auto", epochs=2))
    record = Run.open(run_dir).stage("tune")
    assert record["precision"] == "fp16"
    losses = [e["loss"] for e in tuning.read_metrics(run_dir / "logs" / "metrics.jsonl") if "loss" in e]
    assert losses and all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0]
    assert all(bool(t.isfinite().all()) for t in adapter(run_dir).values())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_varlen_kernel_equals_attention_example_by_example(dtype, monkeypatch):
    from edgeft.pipeline.tune import model as tmodel

    module = torch.nn.Module().eval()
    segments = [7, 33, 1, 19]
    torch.manual_seed(0)
    q = torch.randn(1, 8, sum(segments), 64, device="cuda", dtype=dtype)
    k, v = (torch.randn(1, 2, sum(segments), 64, device="cuda", dtype=dtype) for _ in range(2))  # GQA: 4 q per kv
    assert tmodel._varlen_kernel(dtype, 0.0) is not None, "no varlen kernel: neither flash-attn nor torch's"
    fused, _ = tmodel.packed_attention(module, q, k, v, None, scaling=0.125, segments=segments)
    monkeypatch.setattr(tmodel, "_varlen_kernel", lambda *a: None)
    looped, _ = tmodel.packed_attention(module, q, k, v, None, scaling=0.125, segments=segments)
    assert fused.shape == looped.shape == (1, sum(segments), 8, 64)
    assert float((fused.float() - looped.float()).abs().max()) < 2e-2


def test_the_chunked_loss_head_equals_the_plain_one_in_value_and_gradient():
    from edgeft.pipeline.tune.model import LOSS_CHUNK, ChunkedLoss

    torch.manual_seed(0)
    head = torch.nn.Linear(64, 1000, bias=False, device="cuda")
    positions = 2 * LOSS_CHUNK + 77
    hidden = torch.randn(1, positions, 64, device="cuda")
    targets = torch.randint(0, 1000, (positions,), device="cuda")
    results = []
    for chunked in (False, True):
        h = hidden.clone().requires_grad_()
        loss_head = ChunkedLoss(head, chunked)
        loss_head.targets = targets
        loss = loss_head(h).reshape(())
        head.weight.grad = None
        loss.backward()
        results.append((loss.detach(), h.grad, head.weight.grad.clone()))
    (plain, *plain_grads), (chunked, *chunked_grads) = results
    assert torch.allclose(plain, chunked, rtol=1e-5)
    for a, b in zip(plain_grads, chunked_grads):  # other GEMM shapes, other summation order: fp32 rounding
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-5), float((a - b).abs().max())


def test_nf4_codes_made_by_the_gpu_equal_those_the_merge_rebuilds_on_the_cpu(tiny_model):
    """Training quantizes the base with the CUDA kernels; merge, export checks and eval rebuild the
    model as trained on the CPU. Both must hold the same NF4 weights, bit for bit."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    from edgeft.trained import base_load_kwargs

    def nf4_weights(device):
        model = AutoModelForCausalLM.from_pretrained(tiny_model, **base_load_kwargs("qlora", "bf16", device))
        return {
            name: bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state).float().cpu()
            for name, m in model.named_modules()
            if isinstance(m, bnb.nn.Linear4bit)
        }

    gpu, cpu = nf4_weights("cuda"), nf4_weights("cpu")
    assert gpu.keys() == cpu.keys() and gpu
    for name in gpu:
        assert torch.equal(gpu[name], cpu[name]), name


def test_a_checkpoint_written_on_the_gpu_resumes_on_a_cpu(tmp_path, tiny_llama, monkeypatch):
    data = recipes_like(tmp_path / "train.jsonl", n=24)

    def interrupt(entry):
        if entry["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)

    cfg = small_config(tiny_llama, data, tmp_path / "r", epochs=2, save_every=2)
    with pytest.raises(tuning.TrainingInterrupted):
        tuning.tune(cfg, on_step=interrupt)
    assert Run.open(tmp_path / "r").stage("tune")["device"] == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the run moved to a machine without a GPU
    run_dir = tuning.resume(tmp_path / "r")
    assert Run.open(run_dir).stage("tune")["status"] == "done"
    assert all(bool(t.isfinite().all()) for t in adapter(run_dir).values())


@pytest.mark.parametrize(
    "config, method, engine",
    [("fsdp-qlora.yaml", "qlora", "fsdp"), ("zero2.yaml", "lora", "deepspeed"), ("zero3.yaml", "qlora", "deepspeed")],
)
def test_the_shipped_accelerate_configs_train_on_one_gpu(tmp_path, tiny_llama, config, method, engine):
    """One GPU: the engine wraps and shards over one process, which still runs every engine-only
    path (4-bit storage in the compute dtype, the gathered adapter and optimizer state)."""
    if engine == "deepspeed":
        pytest.importorskip("deepspeed")
    data = recipes_like(tmp_path / "train.jsonl", n=24)
    out = tmp_path / "run"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--main_process_port", "0"]
    launch += ["--config_file", str(REPO / "samples" / "accelerate" / config), "-m", "edgeft", "tune"]
    args = ["--model", tiny_llama, "--data", data, "--output", out, "--method", method, "--epochs", "2"]
    args += ["--batch-tokens", "128", "--max-seq-len", "64", "--save-every", "3"]
    done = subprocess.run([*launch, *map(str, args)], check=False, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = Run.open(out).stage("tune")
    assert record["status"] == "done" and record["engine"] == engine, json.dumps(record)[:2000]
    weights = adapter(out)
    assert weights and all(bool(t.isfinite().all()) for t in weights.values())
    assert any(float(t.abs().max()) > 0 for k, t in weights.items() if "lora_B" in k)  # B starts at 0: it trained
