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


# What a full quickstart took on each kind of CPU, and that machine's fp32 matmul speed (see
# `probe_speed`). The kind picks the reference: with VNNI, ONNX Runtime's int8 kernels do a prompt
# pass in half the time they take with AVX2 alone, which the fp32 probe cannot see (the
# evaluation's long prompts: 424.7 against 540.6 s on one machine). Within a kind, each stage
# scales by this machine's fp32 speed, and training by BF16_SPEEDUP where one machine has native
# bf16 and the other not. A rough guide: an earlier reference (37.7 min on a machine of the same
# kind, probe 169 GFLOPS) predicted 34 min for a run that took 23.6 (the probe sees only part of
# what differs between VMs).
REFERENCES = {
    # AMD EPYC, 2 cores, CPU flags avx2 fma avx_vnni avx512f avx512_vnni avx512_bf16 (training in
    # bf16): `make demo` on a fresh clone, 2026-11-24 14:22, quickstart 15.2 min (15.8 in all).
    "vnni": {
        "gflops": 236.0,
        "bf16": True,
        "steps": 165,
        "examples": 200,
        "stages": {
            "fine-tune (QLoRA)": 321.2,
            "merge": 21.8,
            "export int4": 89.3,
            "export the base model": 31.8,
            "evaluate": 424.7,
            "benchmark": 22.3,
        },
    },
    # The same machine with AVX-512 and VNNI hidden from every library (benchmarks/avx2_kind.py:
    # flags avx2 fma, training in fp32), 2026-11-24 14:07, quickstart 18.2 min, model cache warm.
    # No native AVX2-only machine has run today's quickstart yet.
    "avx2": {
        "gflops": 225.0,
        "bf16": False,
        "steps": 165,
        "examples": 200,
        "stages": {
            "fine-tune (QLoRA)": 396.0,
            "merge": 17.1,
            "export int4": 80.4,
            "export the base model": 31.5,
            "evaluate": 540.6,
            "benchmark": 26.5,
        },
    },
}
# A QLoRA step on 12 recipe rows in bf16 against fp32 on one AVX512-BF16 CPU: 1.93 against 2.64-2.70 s a row
# (2.26 against 3.15-3.22 before the shared system prompt); an earlier measurement (LoRA, unpacked) said 1.7.
BF16_SPEEDUP = 1.4


def probe_speed() -> dict:
    """This CPU's fp32 matmul speed in GFLOPS (~0.5 s), whether it trains in bf16, its kind (a key
    of REFERENCES) and its speed-relevant flags."""
    import torch

    from edgeft.cpu import cpu_flags, has_native_bf16

    a, b = torch.randn(512, 576), torch.randn(576, 1536)
    torch.matmul(a, b)  # warm-up
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < 0.4:
        torch.matmul(a, b)
        runs += 1
    gflops = 2 * 512 * 576 * 1536 * runs / (time.perf_counter() - start) / 1e9
    flags = cpu_flags()
    kind = "vnni" if {"avx512_vnni", "avx_vnni"} & set(flags) else "avx2"
    return {"gflops": round(gflops, 1), "bf16": has_native_bf16(), "kind": kind, "flags": flags}


def expected_seconds(probe: dict, steps: int, examples: int) -> dict[str, float]:
    """Each stage's expected time here: the reference's, scaled by the probe and by the work asked
    (training steps, evaluation examples)."""
    ref = REFERENCES[probe["kind"]]
    speed = ref["gflops"] / probe["gflops"]
    bf16 = BF16_SPEEDUP ** (int(ref["bf16"]) - int(probe["bf16"]))
    expected = {}
    for name, seconds in ref["stages"].items():
        if name.startswith("fine-tune"):
            expected[name] = seconds * speed * bf16 * steps / ref["steps"]
        elif name == "evaluate":
            expected[name] = seconds * speed * examples / ref["examples"]
        else:
            expected[name] = seconds * speed
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
    expected = _announce(cfg)
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
            log.info(f"  {name}: {duration(timings[name])}")
    Run.open(run_dir).update(quickstart={"config": vars(cfg), "timings": timings, "finished_at": artifacts.now()})
    log.info(f"\n[{len(stages) + 1}/{len(stages) + 1}] report")
    from edgeft.report import write_report

    return write_report(Run.open(run_dir), bar=(BAR_GAIN, BAR_INT4_DROP, BAR_STOPS))


def _announce(cfg: QuickstartConfig) -> dict[str, float]:
    """Say, before any work, how long the whole run should take on this machine."""
    from edgeft.evaluate import load_samples

    probe = probe_speed()
    examples = len(load_samples(cfg.eval_file, cfg.limit or None))
    ref = REFERENCES[probe["kind"]]
    expected = expected_seconds(probe, cfg.max_steps or ref["steps"], examples)
    kind = "a VNNI" if probe["kind"] == "vnni" else "an AVX2-only"
    log.info(
        f"Expected: about {duration(sum(expected.values()))} on this machine if nothing is reused "
        f"({', '.join(f'{k} {duration(v)}' for k, v in expected.items())}): {kind} reference run's times scaled by "
        f"this CPU's fp32 matmul speed ({probe['gflops']:.0f} GFLOPS against {ref['gflops']:.0f}) and "
        f"{'bf16' if probe['bf16'] else 'fp32'} training (flags: {' '.join(probe['flags']) or 'none of note'})."
    )
    return expected


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
