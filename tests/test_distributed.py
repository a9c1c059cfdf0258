"""Training across processes: `torchrun` with 2 CPU processes (gloo) on the tiny model, against one
process with the same global batch, plus the launches that must be refused before weights load.

Each launch starts two Pythons that import torch and transformers (~10 s on 2 cores); the runs
are shared through module-scoped fixtures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from edgeft.artifacts import Run
from edgeft.errors import ConfigError, DeviceError
from edgeft.pipeline.config import TuneConfig
from edgeft.pipeline.tune import distributed, resume, start, tune
from edgeft.pipeline.tune.distributed import LaunchError, World
from tests.conftest import REPO
from tests.helpers import recipes_like, small_config

SAMPLES = REPO / "samples" / "accelerate"
TOLERANCE = 1e-6  # measured: 0.0 (the same sums in the same order); Adam amplifies any real mismatch far past this


def config(root, output, **kw) -> dict:
    extra = {k: kw.pop(k) for k in ("interrupt_at", "private_storage") if k in kw}  # for the worker, not TuneConfig
    cfg = small_config(root / "model", root / "train.jsonl", root / output, epochs=2, save_every=3, **kw)
    return {**cfg.to_dict(), **extra}


def torchrun(root, cfg: dict, mode: str = "tune", *, accelerate_config: str | None = None) -> list[dict]:
    """Two processes of tests/ddp_worker.py, by torchrun, or by `accelerate launch` with one of the
    shipped configs; returns each process's report."""
    reports = root / "reports" / cfg["output"].rsplit("/", 1)[-1]
    reports.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    if accelerate_config:
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2"]
        launcher += ["--main_process_port", "0", "--config_file", str(SAMPLES / accelerate_config)]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd = [*launcher, str(REPO / "tests" / "ddp_worker.py"), str(reports), json.dumps(cfg), mode]
    done = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=600, cwd=root)
    found = sorted(reports.glob(f"{mode}-*.json"))
    assert len(found) == 2, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return [json.loads(p.read_text()) for p in found]


def adapter(run_dir):
    from safetensors.torch import load_file

    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def assert_same(a, b):
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= TOLERANCE, worst


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from tests.tiny import build_tiny_llama

    root = tmp_path_factory.mktemp("ddp")
    build_tiny_llama(root / "model")
    recipes_like(root / "train.jsonl", n=24)
    return root


@pytest.fixture(scope="module")
def two_processes(root):
    return torchrun(root, config(root, "ddp")), Run.open(root / "ddp")


def test_two_processes_train_the_model_one_process_trains_with_twice_the_accumulation(root, two_processes):
    reports, run = two_processes
    assert [r["status"] for r in reports] == [0, 0]
    # identical trainable weights on both processes after every one of the 10 steps
    assert all(len(r["spreads"]) == 10 and max(r["spreads"]) == 0.0 for r in reports)
    one = tune(TuneConfig(**config(root, "one", grad_accum=2)))
    assert_same(adapter(run.path), adapter(one))
    record, single = run.stage("tune"), Run.open(one).stage("tune")
    assert record["processes"] == 2 and record["engine"] == "ddp" and single["processes"] == 1
    # tokens and losses count every process: the same numbers as the one-process run
    assert record["metrics"]["train_tokens"] == single["metrics"]["train_tokens"]
    assert record["metrics"]["train_loss"] == pytest.approx(single["metrics"]["train_loss"], abs=1e-6)


def test_only_the_main_process_writes(two_processes):
    reports, run = two_processes
    main, other = reports
    assert main["rank"] == 0 and main["writes"] and other["writes"] == []
    assert not (run.path / "checkpoints").exists() and (run.logs_dir / "loss.png").exists()


def test_a_signal_to_one_process_stops_both_at_the_same_step_and_resume_ends_equal(root, two_processes):
    cfg = config(root, "stopped", interrupt_at=4)
    reports = torchrun(root, cfg)
    assert [r["status"] for r in reports] == [130, 130]  # rank 1 got the signal; rank 0 stopped with it
    assert [len(r["spreads"]) for r in reports] == [4, 4]
    run = Run.open(root / "stopped")
    assert run.stage("tune")["status"] == "interrupted"
    assert json.loads((run.checkpoints_dir / "latest.json").read_text())["step"] == 4

    with pytest.raises(LaunchError, match=r"trained with 2 process\(es\) and this launch has 1"):
        resume(run.path)  # one process: refused before any weights load, nothing changed
    assert run.stage("tune")["status"] == "interrupted"

    cfg.pop("interrupt_at")
    reports = torchrun(root, cfg, mode="resume")
    assert [r["status"] for r in reports] == [0, 0] and reports[1]["writes"] == []
    assert len(reports[0]["spreads"]) == 6 and max(reports[0]["spreads"]) == 0.0
    assert_same(adapter(run.path), adapter(two_processes[1].path))


def test_accelerate_launch_with_the_shipped_cpu_config_trains_the_same_adapter(root, two_processes):
    reports = torchrun(root, config(root, "accelerate"), accelerate_config="ddp-cpu.yaml")
    assert [r["status"] for r in reports] == [0, 0] and reports[1]["writes"] == []
    assert_same(adapter(root / "accelerate"), adapter(two_processes[1].path))


def test_dpo_in_two_processes_trains_what_one_process_trains_with_twice_the_accumulation(root):
    """Preference tuning across processes: the reference log-probabilities, the pairs each process
    gets and the loss summed over both give the adapter one process trains with grad_accum 2, and
    only the main process writes (the reference file included)."""
    from tests.test_preference import preference_data

    preference_data(root / "pairs.jsonl", n=16)
    cfg = config(root, "dpo", beta=0.5, learning_rate=5e-3)
    cfg["data"] = str(root / "pairs.jsonl")
    reports = torchrun(root, cfg)
    assert [r["status"] for r in reports] == [0, 0] and reports[1]["writes"] == []
    assert max(reports[0]["spreads"]) == 0.0
    one = tune(TuneConfig(**{**cfg, "output": str(root / "dpo-one"), "grad_accum": 2}))
    assert_same(adapter(root / "dpo"), adapter(one))
    record, single = Run.open(root / "dpo").stage("tune"), Run.open(one).stage("tune")
    assert record["processes"] == 2 and single["processes"] == 1
    assert record["metrics"]["train_loss"] == pytest.approx(single["metrics"]["train_loss"], abs=1e-6)
    assert (root / "dpo" / "data" / "reference_logps.json").read_text() == (
        root / "dpo-one" / "data" / "reference_logps.json"
    ).read_text()


# --- launches refused before any weights load ----------------------------------------------------


def test_a_run_directory_the_other_process_cannot_see(root):
    """--output on a disk only the main process has: both stop, and the half-made run is removed."""
    cfg = config(root, "unshared", private_storage=True)
    cfg["output"] = "unshared"  # relative: resolves elsewhere on rank 1, which works in another folder
    reports = torchrun(root, cfg)
    assert [r["status"] for r in reports] == [1, 1]
    assert "process 1 cannot see the run directory" in reports[1]["error"]
    assert "other process(es) stopped" in reports[0]["error"]
    assert not (root / "unshared").exists()


def fake_world(size: int, engine: str = "MULTI_CPU", zero_stage: int = 2) -> World:
    state = SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=zero_stage))
    accelerator = SimpleNamespace(
        process_index=0, num_processes=size, is_main_process=True, distributed_type=engine, state=state
    )
    return World(accelerator)


def test_more_processes_than_rows_of_data(tmp_path, tiny_llama, monkeypatch):
    monkeypatch.setattr(distributed, "start", lambda *a: fake_world(4))
    monkeypatch.setattr(start, "train", lambda *a, **k: pytest.fail("no weights may load"))
    data = recipes_like(tmp_path / "d.jsonl", n=3)  # 3 short examples: two 128-token rows
    cfg = TuneConfig(model=str(tiny_llama), data=str(data), output="r", batch_tokens=128, max_seq_len=64)
    with pytest.raises(LaunchError, match="4 processes were launched, but the data packs into only 2 row"):
        tune(cfg)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("requested", "method", "device", "error", "message"),
    [
        ("FSDP", "lora", "cpu", DeviceError, "FSDP trains on CUDA GPUs only"),
        ("DEEPSPEED", "lora", "cpu", DeviceError, "DeepSpeed ZeRO trains on CUDA GPUs only"),
        ("FSDP", "dora", "cuda", ConfigError, "dora cannot run under FSDP"),
        ("DEEPSPEED", "dora", "cuda", ConfigError, "dora cannot run under ZeRO-3"),
    ],
)
def test_engine_combinations_that_cannot_work(requested, method, device, error, message, monkeypatch):
    # Accelerate quietly runs DDP when FSDP/DeepSpeed is asked for on CPU processes: the request is what counts
    monkeypatch.setenv(f"ACCELERATE_USE_{requested}", "true")
    cfg = TuneConfig(data="x", method=method)
    world = fake_world(2, "MULTI_CPU" if device == "cpu" else requested, zero_stage=3)
    with pytest.raises(error, match=message):
        distributed.check_engine(world, cfg, device)


def test_what_each_engine_allows(monkeypatch):
    """The whole table check_engine enforces: DDP takes every method on CPUs and GPUs; FSDP and
    ZeRO only GPUs, and DoRA (which needs whole base weights) only where they are not split."""
    engines = {  # name: (the engine checked, the launch's request, what Accelerate reports on GPUs, ZeRO stage)
        "ddp": ("ddp", None, "MULTI_GPU", 2),
        "fsdp": ("fsdp", "ACCELERATE_USE_FSDP", "FSDP", 2),
        "zero2": ("deepspeed", "ACCELERATE_USE_DEEPSPEED", "DEEPSPEED", 2),
        "zero3": ("deepspeed", "ACCELERATE_USE_DEEPSPEED", "DEEPSPEED", 3),
    }
    allowed = {}
    for name, (engine, request, kind, stage) in engines.items():
        for device in ("cpu", "cuda"):
            with monkeypatch.context() as env:
                for var in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
                    env.delenv(var, raising=False)
                if request:
                    env.setenv(request, "true")
                # on CPU processes Accelerate runs DDP whatever was asked: only the request tells
                world = fake_world(2, "MULTI_CPU" if device == "cpu" else kind, zero_stage=stage)
                assert distributed.requested_engine(world) == engine
                for method in ("lora", "qlora", "dora"):
                    try:
                        distributed.check_engine(world, TuneConfig(data="x", method=method), device)
                    except (ConfigError, DeviceError):
                        continue
                    allowed.setdefault(name, []).append(f"{method}@{device}")
    every = ["lora", "qlora", "dora"]
    assert allowed == {
        "ddp": [f"{m}@cpu" for m in every] + [f"{m}@cuda" for m in every],
        "fsdp": ["lora@cuda", "qlora@cuda"],
        "zero2": [f"{m}@cuda" for m in every],
        "zero3": ["lora@cuda", "qlora@cuda"],
    }
