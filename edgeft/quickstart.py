"""edgeft quickstart: the whole path on the built-in model and the recipe sample, with a report.

tune (QLoRA) -> merge (checked against the model as trained) -> export int4 (verified against the
model as trained) -> eval (base zero-shot, base few-shot, base + retrieved examples, the model as
trained: NF4 base + adapter, fine-tuned ONNX int4 free and constrained to the answers' schema; the
merged model has no row: the merge checked it) -> a short speed benchmark -> runs/quickstart/report.md.

Each stage records itself in the run manifest; running again reuses finished stages and resumes an
interrupted fine-tune (`force` starts over). Every number in the report is measured in the run.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from edgeft import artifacts
from edgeft.artifacts import Run
from edgeft.errors import DataError
from edgeft.progress import duration

log = logging.getLogger(__name__)


def sample_dir() -> Path:
    """The recipe sample: inside the installed package (pyproject.toml maps samples/recipes to
    edgeft/samples/recipes), else in the clone an editable install runs from."""
    packaged = Path(str(resources.files("edgeft"))) / "samples" / "recipes"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "samples" / "recipes"


SAMPLES = sample_dir()

# The CPU preset: one epoch of QLoRA over the 800 recipes, 5-10 minutes on 2 AVX-512 cores (measured: 447-528 tokens/s
# with the system prompt run once per row; 367 and 284 tokens/s before that, on two machines of the same kind).
CPU_PRESET = dict(
    method="qlora",
    epochs=1.0,
    learning_rate=4e-4,
    batch_tokens=1024,
    max_seq_len=512,
    lora_dropout=0.0,
    save_every=20,
    # No eval loss at the end of the epoch: the evaluate stage scores the model as trained on the same
    # held-out examples (its perplexity) in the pass that generates its answers; the fine-tune's own
    # pass would score them twice (28 s here, about twice that in fp32). The file still serves the
    # merge's and the export's checks.
    eval_every=-1,
)

BASE_EXPORT = "base-onnx-int4"

# The bar the report checks (from the sample's design goals).
BAR_GAIN = 40.0  # exact-match points the int4 model must gain over base zero-shot and few-shot
BAR_INT4_DROP = 3.0  # points the int4 (and the merged) model may lose against the model as trained
BAR_STOPS = 95.0  # % of answers that must end with the end-of-turn token


@dataclass
class QuickstartConfig:
    output: str = "runs/quickstart"
    model: str = "smollm2-135m"
    data: str = str(SAMPLES / "train.jsonl")
    eval_file: str = str(SAMPLES / "eval.jsonl")
    max_steps: int = 0  # 0 = the preset's full epoch
    limit: int = 0  # evaluation examples; 0 = all
    shots: int = 3
    rag: int = 3  # the base model with this many retrieved training examples (BM25) in each prompt
    bench_runs: int = 3
    allow_drift: bool = False  # keep a merge or export outside the fidelity gate (a few-step fine-tune is one)


# What the quickstart's stages take depends on more than one speed of the CPU: training runs
# PyTorch's bf16 (or fp32) matmuls forward and backward, the merge and GPTQ fp32 matmuls, and the
# exports' checks, the evaluation and the benchmark ONNX Runtime's int4/int8 kernels (MatMulNBits),
# whose speed against PyTorch's differs between CPU kinds by more than 2x (VNNI, AMX, AVX2 only).
# So `probe_speed` measures each of those, about 0.3 s each, and each stage scales the reference
# run's time by its probes (`STAGE_PROBES`) and by the work asked.
PROBE_SECONDS = 0.3
# The quickstart that calibrates the estimate: `make demo` on a fresh clone (model cache warm), every
# default, nothing else running, 2026-12-06; AMD EPYC, 2 cores, CPU flags avx2 fma avx512f
# avx512_vnni avx512_bf16 (training in bf16). Each stage's seconds, and the probes taken at its start.
# (The same VM ran the quickstart of 2026-11-24 1.6x faster, on another host: a VM's speed moves,
# which is what the probes are for.)
REFERENCE = {
    "probe": {"train": 257.2, "fp32": 166.4, "onnx_prompt": 18349, "onnx_decode": 10394},
    "steps": 165,
    "examples": 200,
    "stages": {
        "fine-tune (QLoRA)": 517.7,
        "merge": 30.6,
        "export int4": 89.1,
        "export the base model": 43.6,
        "evaluate": 735.8,
        "benchmark": 35.6,
    },
    # of the evaluation, the base rows' answers (zero-shot 99 s, 3-shot 92, retrieval 221), all 200
    # examples each then; they now stop after BASE_SAMPLE when they match none (they match none here)
    "evaluate_base_rows": 412.0,
}
# Which probes each stage's time follows, as shares of its time. Each stage runs the probed kernels
# for part of its time only (the rest is attention, element-wise work, Python, tokenizing, I/O),
# which follows the CPU's general speed, for which the fp32 matmul stands. The shares are fitted on
# two runs: the reference, and the same VM with every library on its AVX2 code paths
# (benchmarks/avx2_kind.py; probes train 162, fp32 198, int4 prompt 11350, decode 6979): there the
# kernels ran 1.5-1.6x slower but the stages only 0.94-1.14x (fine-tune 564 s, merge 35, export
# int4 86, the base's export 41, evaluate 836, benchmark 37). The designed shares (the fine-tune
# all training kernels, the evaluation 81% ONNX kernels as its rows spent their time) announced
# 34.7 min there for 26.6. Between hosts the fp32 probe tracked the whole run: this VM's earlier
# host probed 236 GFLOPS and ran the quickstart in 15.2 min, 1.42x and 1.59x today's. Checked,
# unchanged, on a third kind: a native AVX2-only VM announced 35.0 min for 36.0 and 30.0 for 27.8
# (docs/quickstart.md); not on AMX or ARM.
STAGE_PROBES = {
    "fine-tune (QLoRA)": {"fp32": 0.67, "train": 0.33},
    "merge": {"fp32": 1.0},
    "export int4": {"fp32": 0.83, "onnx_prompt": 0.085, "onnx_decode": 0.085},
    "export the base model": {"fp32": 0.87, "onnx_prompt": 0.065, "onnx_decode": 0.065},
    "evaluate": {"fp32": 0.59, "onnx_prompt": 0.25, "onnx_decode": 0.16},
    "benchmark": {"fp32": 0.72, "onnx_prompt": 0.14, "onnx_decode": 0.14},
}


def _per_second(work, seconds: float = PROBE_SECONDS, windows: int = 5) -> float:
    """How many times a second `work` runs here: the best of `windows` short windows after a
    warm-up call (the best, not the mean: another process's moment on the CPU is not its speed)."""
    work()
    best = 0.0
    for _ in range(windows):
        runs, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds / windows or runs == 0:
            work()
            runs += 1
        best = max(best, runs / elapsed)
    return best


def probe_speed() -> dict:
    """What this CPU does per second of what the stages run (about 3 s in all, with the imports): `fp32` PyTorch
    matmul GFLOPS; `train` GFLOPS of a matmul forward and backward in the dtype training uses here
    (bf16 with native bf16, else fp32); `onnx_prompt` tokens/s and `onnx_decode` single-token passes/s
    through ONNX Runtime's MatMulNBits (int4 and int8 in blocks of 32, as the int4 export lays them
    out) on SmolLM2-135M's MLP shapes. Also whether it trains in bf16, and its speed-relevant flags."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from edgeft.cpu import cpu_flags, has_native_bf16, ort_session_options

    flops = 2 * 512 * 576 * 1536
    a, b = torch.randn(512, 576), torch.randn(576, 1536)
    fp32 = flops * _per_second(lambda: torch.matmul(a, b)) / 1e9
    bf16 = has_native_bf16()
    dtype = torch.bfloat16 if bf16 else torch.float32
    x = torch.randn(512, 576, dtype=dtype, requires_grad=True)
    w = torch.randn(576, 1536, dtype=dtype) / 24

    def step() -> None:
        (x @ w).float().square().mean().backward()

    train = 2 * flops * _per_second(step) / 1e9
    model = _onnx_probe_model().SerializeToString()
    session = ort.InferenceSession(model, ort_session_options(), providers=["CPUExecutionProvider"])
    prompt, token = np.random.rand(512, 576).astype(np.float32), np.random.rand(1, 576).astype(np.float32)
    onnx_prompt = 512 * _per_second(lambda: session.run(None, {"x": prompt}))
    onnx_decode = _per_second(lambda: session.run(None, {"x": token}))
    return {
        "train": round(train, 1),
        "fp32": round(fp32, 1),
        "onnx_prompt": round(onnx_prompt),
        "onnx_decode": round(onnx_decode),
        "bf16": bf16,
        "flags": cpu_flags(),
    }


def _onnx_probe_model():
    """An ONNX model of four MLP blocks of SmolLM2-135M's shapes (576 -> 1536 in int4,
    1536 -> 576 in int8, blocks of 32, accuracy level 4): the kernels an int4 export spends its time
    in. Built in memory from random weights (a few ms)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng, block, nodes, weights, x = np.random.default_rng(0), 32, [], [], "x"
    for i, (k, n, bits) in enumerate([(576, 1536, 4), (1536, 576, 8)] * 4):
        packed = rng.integers(0, 255, (n, k // block, block * bits // 8), dtype=np.uint8)
        scales = rng.random(n * k // block, dtype=np.float32) / 100
        weights += [numpy_helper.from_array(packed, f"w{i}"), numpy_helper.from_array(scales, f"s{i}")]
        attributes = dict(K=k, N=n, bits=bits, block_size=block, accuracy_level=4)
        node = helper.make_node("MatMulNBits", [x, f"w{i}", f"s{i}"], [f"y{i}"], domain="com.microsoft", **attributes)
        nodes.append(node)
        x = f"y{i}"
    graph = helper.make_graph(
        nodes,
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["tokens", 576])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["tokens", 576])],
        weights,
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)  # 10: what ONNX Runtime reads


def expected_seconds(probe: dict, steps: int, examples: int) -> dict[str, float]:
    """Each stage's expected time here: the reference run's, each share scaled by how much slower
    this machine's probe for it is, and by the work asked (training steps, evaluation examples)."""
    from edgeft.evaluate import BASE_SAMPLE

    expected = {}
    for name, seconds in REFERENCE["stages"].items():
        slower = sum(share * REFERENCE["probe"][k] / probe[k] for k, share in STAGE_PROBES[name].items())
        work = steps / REFERENCE["steps"] if name.startswith("fine-tune") else 1.0
        if name == "evaluate":  # the base rows answer BASE_SAMPLE examples of the sample's (see evaluate)
            base = REFERENCE["evaluate_base_rows"] / seconds
            work = ((1 - base) * examples + base * min(examples, BASE_SAMPLE)) / REFERENCE["examples"]
        expected[name] = seconds * slower * work
    return expected


def quickstart(cfg: QuickstartConfig, *, force: bool = False) -> Path:
    """Run (or finish) every stage; returns the path of report.md."""
    for path in (cfg.data, cfg.eval_file):
        if not Path(path).is_file():
            raise DataError(
                f"{path} not found: the recipe sample is missing from this installation. "
                'Reinstall edgeft (pip install --force-reinstall "edgeft[all]"), or run it from a clone of the repository.'
            )
    run_dir = Path(cfg.output)
    timings: dict[str, float] = {}
    stages = [
        ("fine-tune (QLoRA)", _tune),
        ("merge", _merge),
        ("export int4", _export),
        ("export the base model", _export_base),
        ("evaluate", _evaluate),
        ("benchmark", _bench),
    ]
    expected, probe = _announce(cfg)
    ran: list[str] = []  # the stages made anew, whose times show this run's pace
    for number, (name, step) in enumerate(stages, start=1):
        guess = f" (expected: about {duration(expected[name])})"
        log.info(f"\n[{number}/{len(stages) + 1}] {name}{guess}")
        start = time.perf_counter()
        reused = step(run_dir, cfg, force)
        force = force or not reused  # a stage made anew invalidates everything after it
        timings[name] = round(time.perf_counter() - start, 1)
        if reused:
            log.info(f"  {reused}")
            timings[name] = _earlier_timing(run_dir, name, timings[name])
        else:
            ran.append(name)
            rest = [later for later, _ in stages[number:]]
            log.info(f"  {name}: {duration(timings[name])}{time_left(expected, timings, ran, rest)}")
    expected = {name: round(seconds, 1) for name, seconds in expected.items()}
    Run.open(run_dir).update(
        quickstart={
            "config": vars(cfg),
            "timings": timings,
            "expected": expected,
            "probe": probe,
            "finished_at": artifacts.now(),
        }
    )
    log.info(f"\n[{len(stages) + 1}/{len(stages) + 1}] report")
    from edgeft.report import write_report

    return write_report(Run.open(run_dir), bar=(BAR_GAIN, BAR_INT4_DROP, BAR_STOPS))


def time_left(expected: dict[str, float], timings: dict[str, float], ran: list[str], rest: list[str]) -> str:
    """What the stages to come should take at this run's pace so far: their expected times scaled
    by how the stages made anew compared with theirs. The probe at the start cannot see a machine
    that slows down later (a VM under a neighbour's load)."""
    if not ran or not rest:
        return ""
    pace = sum(timings[n] for n in ran) / max(sum(expected[n] for n in ran), 1e-9)
    left = pace * sum(expected[n] for n in rest)
    return f" (expected {duration(expected[ran[-1]])}); about {duration(left)} left at this pace ({pace:.2f}x the estimate)"


def _announce(cfg: QuickstartConfig) -> tuple[dict[str, float], dict]:
    """Say, before any work, how long the whole run should take on this machine; returns each
    stage's expected seconds and the probe they come from."""
    from edgeft.evaluate import load_samples

    probe = probe_speed()
    examples = len(load_samples(cfg.eval_file, cfg.limit or None))
    expected = expected_seconds(probe, cfg.max_steps or REFERENCE["steps"], examples)
    ref = REFERENCE["probe"]
    log.info(
        f"Expected: about {duration(sum(expected.values()))} on this machine if nothing is reused "
        f"({', '.join(f'{k} {duration(v)}' for k, v in expected.items())}): the reference run's times scaled by "
        f"what this CPU measured against it: {'bf16' if probe['bf16'] else 'fp32'} training "
        f"{probe['train']:.0f} GFLOPS ({ref['train']:.0f}), fp32 {probe['fp32']:.0f} GFLOPS ({ref['fp32']:.0f}), "
        f"int4 prompt {probe['onnx_prompt']} tokens/s ({ref['onnx_prompt']}), "
        f"int4 decode {probe['onnx_decode']} passes/s ({ref['onnx_decode']}) "
        f"(flags: {' '.join(probe['flags']) or 'none of note'})."
    )
    return expected, probe


def _earlier_timing(run_dir: Path, name: str, now: float) -> float:
    """A reused stage reports the time it took when it ran: from the last quickstart, else its own record."""
    manifest = Run.open(run_dir).manifest()
    if name in manifest.get("quickstart", {}).get("timings", {}):
        return manifest["quickstart"]["timings"][name]
    record = manifest.get("stages", {}).get(
        {"fine-tune (QLoRA)": "tune", "merge": "merge", "export int4": "export"}.get(name, ""), {}
    )
    return record.get("seconds") or record.get("metrics", {}).get("train_seconds") or now


def _done(run_dir: Path, stage: str, force: bool, **same) -> bool:
    """A stage counts as done when its record says so and was made with the same settings."""
    if force or not Run.is_run(run_dir):
        return False
    record = Run.open(run_dir).stage(stage) or {}
    return record.get("status") == "done" and all(record.get(k) == v for k, v in same.items())


def _tune(run_dir: Path, cfg: QuickstartConfig, force: bool) -> str | None:
    from edgeft.pipeline import tune as tuning
    from edgeft.pipeline.config import TuneConfig

    if _done(run_dir, "tune", force):
        return f"reusing the fine-tune in {run_dir} (--force to redo)"
    record = Run.open(run_dir).tune_record() if Run.is_run(run_dir) else None
    interrupted = not force and record is not None and record.status in ("interrupted", "running")
    if interrupted and tuning.latest_checkpoint(Run.open(run_dir)):
        log.info(f"  resuming the interrupted fine-tune in {run_dir}")
        tuning.resume(run_dir)
        return None
    tune_cfg = TuneConfig(
        model=cfg.model,
        data=cfg.data,
        eval_file=cfg.eval_file,
        output=str(run_dir),
        max_steps=cfg.max_steps,
        **CPU_PRESET,
    )
    tuning.tune(tune_cfg, force=True)
    for line in tuning.summary(run_dir):
        log.info(f"  {line}")
    return None


def _merge(run_dir: Path, cfg: QuickstartConfig, force: bool) -> str | None:
    from edgeft.fidelity import table
    from edgeft.pipeline.merge import merge

    if _done(run_dir, "merge", force) and Run.open(run_dir).has_merged():
        return "reusing the merged model"
    merge(run_dir, force=True, allow_drift=cfg.allow_drift)
    log.info("  checked against the model as trained:")
    for line in table(Run.open(run_dir).stage("merge")["fidelity"]):
        log.info(line)
    return None


def _export(run_dir: Path, cfg: QuickstartConfig, force: bool) -> str | None:
    from edgeft.export.onnx import ExportConfig, export
    from edgeft.fidelity import table

    export_cfg = ExportConfig(precision="int4", allow_drift=cfg.allow_drift)
    if (
        _done(run_dir, "export", force, options=export_cfg.recorded())
        and (run_dir / "onnx-int4" / "genai_config.json").is_file()
    ):
        return "reusing the int4 export"
    out = export(run_dir, export_cfg, force=True)
    record = Run.open(run_dir).stage("export")
    log.info(
        f"  {out}: {artifacts.human_size(record['size_bytes'])} "
        f"({record['size_bytes'] / record['merged_size_bytes']:.0%} of the merged model)"
    )
    for line in table(record["verification"]):
        log.info(line)
    return None


def _export_base(run_dir: Path, cfg: QuickstartConfig, force: bool) -> str | None:
    """The base model through the same int4 path, so the base rows of the table differ from the
    fine-tuned int4 row by the fine-tuning alone (and run at ONNX speed)."""
    from edgeft.export.onnx import ExportConfig, export

    target = run_dir / BASE_EXPORT
    # A baseline only: its own int4 drift (measured +17% perplexity against its greedy answers) is
    # recorded in its edgeft-export.json, and must not stop the fine-tuned model's report.
    export_cfg = ExportConfig(precision="int4", output=str(target), allow_drift=True)
    record = target / "edgeft-export.json"
    if not force and record.is_file() and json.loads(record.read_text()).get("options") == export_cfg.recorded():
        return "reusing the base model's int4 export"
    export(cfg.model, export_cfg, force=True)
    return None


def _evaluate(run_dir: Path, cfg: QuickstartConfig, force: bool) -> str | None:
    from edgeft.evaluate import evaluate, is_json, load_samples, table

    # JSON answers: a row for the fine-tuned export constrained to the references' schema
    json_schema = "auto" if all(is_json(s.reference) for s in load_samples(cfg.eval_file, cfg.limit or None)) else None
    settings = {
        "data": str(Path(cfg.eval_file).resolve()),
        "limit": cfg.limit or None,
        "shots": cfg.shots,
        "rag": cfg.rag,
        "json_schema": json_schema,
    }
    if _done(run_dir, "eval", force, settings=settings):
        return "reusing the evaluation"
    report = evaluate(
        [str(run_dir / BASE_EXPORT), str(run_dir), str(run_dir / "onnx-int4")],
        cfg.eval_file,
        shots=cfg.shots,
        rag=cfg.rag,
        shots_file=cfg.data,
        limit=cfg.limit or None,
        json_schema=json_schema,
        merged=False,  # the merge stage checked it against the model as trained, logit by logit
    )
    Run.open(run_dir).record_stage("eval", settings=settings)
    for line in table(report):
        log.info(f"  {line}")
    return None


def _bench(run_dir: Path, cfg: QuickstartConfig, force: bool) -> str | None:
    from edgeft.bench import Settings, bench, markdown

    if _done(run_dir, "bench", force):
        return "reusing the benchmark"
    report = bench(run_dir, compare=True, engines=("pytorch",), settings=Settings(runs=cfg.bench_runs))
    for line in markdown(report)[2:]:
        log.info(f"  {line}")
    return None
