"""The task suite: tasks of the shapes users bring, each run the README way with default settings.

    python benchmarks/task_suite.py                      # every task, full runs (about an hour on 2 cores)
    python benchmarks/task_suite.py --tasks intents --compare-no-split
    python benchmarks/task_suite.py --quick              # a few training steps each: the path, not the quality
    python benchmarks/task_suite.py --tasks intents --tune-args "--seed 2"   # a variant: its own row
    python benchmarks/task_suite.py --tasks multiturn --resume   # continue a run an interruption stopped

Per task (samples/TASK/train.jsonl; no eval file, as a user with one data file has):
    edgeft tune --data samples/TASK/train.jsonl --output WORK/TASK
    edgeft export WORK/TASK --int4
    edgeft eval WORK/TASK WORK/TASK/onnx-int4 smollm2-135m --data samples/TASK/test.jsonl --shots 3 --no-merged
test.jsonl (eval.jsonl for the recipe sample) is never seen by training: the hidden test set. The table gives each command's exit
code, the export's fidelity gate, the task metric (exact match; token F1 for the free-text task) of
the model as trained, its int4 export and the best base-model row, and the time. `--compare-no-split`
also trains each task with `--val-split 0` (all data, last epoch kept: the default before the
validation split) and evaluates it beside the default. Results: benchmarks/results/task_suite.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TASKS = {  # task -> (shape, the metric that judges it)
    "tools": ("function calling, 3 tools, OpenAI format", "exact_match"),
    "multiturn": ("multi-turn chat, answers need earlier turns", "exact_match"),
    "intents": ("30-label classification, unseen phrasings in the test set", "exact_match"),
    "freetext": ("free-text answers from a passage", "token_f1"),
    "recipes": ("the quickstart's recipe sample: a recipe's ingredients as a JSON list", "exact_match"),
}
TEST_FILES = {"recipes": "eval.jsonl"}  # the recipe sample's held-out file, never trained on here either
# the path only: a few steps, plain rounding, a few check and test prompts (the gate is reported, not enforced)
QUICK = {
    "tune": ["--max-steps", "8"],
    "export": ["--quant-method", "rtn", "--verify-samples", "4", "--allow-drift"],
    "eval": ["--limit", "4", "--shots", "0"],
}


def edgeft(*args: str, log: Path) -> tuple[int, float]:
    """Run one edgeft command as a user would; its exit code and seconds (output appended to `log`)."""
    start = time.perf_counter()
    with open(log, "a", encoding="utf-8") as out:
        out.write(f"\n$ edgeft {' '.join(args)}\n")
        out.flush()
        command = [sys.executable, "-m", "edgeft", *args]
        code = subprocess.run(command, check=False, stdout=out, stderr=subprocess.STDOUT).returncode
    return code, round(time.perf_counter() - start, 1)


def run_task(
    task: str,
    work: Path,
    *,
    quick: bool = False,
    tune_args: tuple[str, ...] = (),
    name: str = "",
    resume: bool = False,
    base: bool = True,
) -> dict:
    """The README path on one task: tune, export --int4, eval; every exit code, time and number.
    `resume`: a run that an interruption left with a checkpoint continues (tune --resume) rather
    than starting over; its tune time is then the remainder's only, and the row says so.
    `base=False`: eval scores the run and its int4 export only (the caller takes the base rows from
    an earlier run of the task: the base model and the test file do not change with tune's settings)."""
    data = ROOT / "samples" / task
    run = work / (name or task)
    log = work / f"{name or task}.log"
    log.unlink(missing_ok=True)
    extra = QUICK if quick else {}
    result = {"task": task, "variant": " ".join(tune_args) or "defaults", "shape": TASKS[task][0], "exit": {}}
    tune = ["tune", "--data", str(data / "train.jsonl"), "--output", str(run), "--force", *tune_args]
    if resume and (run / "checkpoints").is_dir():
        tune, result["resumed"] = ["tune", "--resume", str(run)], True
    steps = [
        ("tune", tune),
        ("export", ["export", str(run), "--int4"]),
        (
            "eval",
            [
                "eval",
                *(str(run), str(run / "onnx-int4"), *(["smollm2-135m", "--shots", "3"] if base else [])),
                *("--data", str(data / TEST_FILES.get(task, "test.jsonl")), "--no-merged"),
                "--output",
                str(work / f"{name or task}-eval.json"),
            ],
        ),
    ]
    for stage, args in steps:
        code, seconds = edgeft(*args, *extra.get(stage, []), log=log)
        result["exit"][stage], result[f"{stage}_s"] = code, seconds
        if code not in (0, 3):  # 3: the export drifted; its folder is there, and eval tells by how much
            break
    result.update(_numbers(run, work / f"{name or task}-eval.json", TASKS[task][1]))
    return result


def _numbers(run: Path, report: Path, metric: str) -> dict:
    manifest = json.loads((run / "edgeft.json").read_text()) if (run / "edgeft.json").is_file() else {}
    stages = manifest.get("stages", {})
    data = stages.get("tune", {}).get("data", {})
    exported = stages.get("export-int4", stages.get("export", {}))
    verification = exported.get("verification") or {}
    out = {
        "metric": metric,
        "train_examples": data.get("train_examples"),
        "held_out": (data.get("held_out") or {}).get("examples", 0),
        "best_step": stages.get("tune", {}).get("metrics", {}).get("best_step"),
        "steps": stages.get("tune", {}).get("metrics", {}).get("steps"),
        "export": _layout(exported, run / "onnx-int4" / "model.onnx"),
        "gate": (verification.get("gate") or {}).get("passed"),
        "gate_problems": (verification.get("gate") or {}).get("problems"),
        "token_agreement": verification.get("token_agreement"),
        "ppl_change_pct": verification.get("ppl_change_pct"),
    }
    if report.is_file():
        rows = json.loads(report.read_text())["rows"]
        pick = {
            "as_trained": [r for r in rows if r["kind"] == "as-trained"],
            "int4": [r for r in rows if r["backend"] == "onnx" and r["kind"] == "fine-tuned"],
            "base": [r for r in rows if r["kind"] == "base"],
        }
        for key, found in pick.items():
            best = max(found, key=lambda r: r[metric], default=None)
            out[key] = round(best[metric], 1) if best else None
            if key == "base" and best:
                out["base_row"] = best["label"]
    return out


def _layout(exported: dict, graph: Path) -> str | None:
    """How the int4 export rounded: "gptq, blocks of 32, int8 attention in blocks of 64/256" (the
    int8 layer MatMuls' blocks as the graph has them: rows before 2026-12-07 had int4's)."""
    if not exported.get("rounding"):
        return None
    int8 = exported.get("int8_matmuls")  # not recorded by exports before it was
    blocks = _int8_layer_blocks(graph) if int8 and int8 != "none" else []
    return (
        f"{exported['rounding']}, blocks of {exported['block_size']}"
        + (f", int8 {int8}" if int8 else "")
        + (f" in blocks of {'/'.join(map(str, blocks))}" if blocks else "")
    )


def _int8_layer_blocks(graph: Path) -> list[int]:
    import onnx

    if not graph.is_file():
        return []
    nodes = onnx.load(graph, load_external_data=False).graph.node
    attrs = [{a.name: a.i for a in n.attribute} for n in nodes if n.op_type == "MatMulNBits" and "/layers." in n.name]
    return sorted({a["block_size"] for a in attrs if a.get("bits") == 8})


def markdown(results: list[dict], quick: bool) -> list[str]:
    machines = list(dict.fromkeys(r.get("machine") or "not recorded" for r in results))
    letter = {m: chr(ord("A") + i) for i, m in enumerate(machines)}
    lines = [
        ("Quick runs (a few steps): the path only." if quick else "Full runs, default settings.")
        + " Machines: "
        + "; ".join(f"{letter[m]} = {m}" for m in machines)
        + ".",
        "",
        (
            "| task | shape | variant | machine | train / held out | exits tune, export, eval | int4 export | gate "
            "| metric | as trained | int4 | int4 - as trained | best base row | tune min | export min | eval min |"
        ),
        "|---|---|---|---|---|---|---|---|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in results:
        delta = (
            f"{r['int4'] - r['as_trained']:+.1f}"
            if r.get("int4") is not None and r.get("as_trained") is not None
            else "-"
        )
        exits = ", ".join(str(r["exit"].get(s, "-")) for s in ("tune", "export", "eval"))
        base = (
            f"{r['base']} ({r['base_row']}{', an earlier run' if r.get('base_earlier') else ''})"
            if r.get("base") is not None
            else "-"
        )
        gate = {True: "passed", False: "FAILED", None: "-"}[r.get("gate")]
        minutes = [f"{r.get(f'{s}_s', 0) / 60:.1f}" for s in ("tune", "export", "eval")]
        if r.get("resumed"):
            minutes[0] += " (resumed: the rest only)"
        lines.append(
            f"| {r['task']} | {r['shape']} | {r['variant']} | {letter[r.get('machine') or 'not recorded']} "
            f"| {r['train_examples']} / {r['held_out']} | {exits} "
            f"| {r.get('export') or '-'} | {gate} "
            f"| {r['metric']} | {r.get('as_trained', '-')} | {r.get('int4', '-')} | {delta} | {base} | "
            + " | ".join(minutes)
            + " |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default=",".join(TASKS), help="Comma-separated tasks (default: all).")
    parser.add_argument("--work", default="/tmp/edgeft-task-suite", help="Where the runs go.")
    parser.add_argument("--quick", action="store_true", help="A few training steps each: checks the path only.")
    parser.add_argument(
        "--compare-no-split", action="store_true", help="Also train each task with --val-split 0, side by side."
    )
    parser.add_argument(
        "--tune-args", default="", help='Extra tune options, a variant of its own (e.g. "--seed 2"): its own row.'
    )
    parser.add_argument(
        "--resume", action="store_true", help="Continue a task's interrupted run from its checkpoint, not from scratch."
    )
    parser.add_argument(
        "--base-from-earlier",
        action="store_true",
        help="Score only the run and its int4 export; the base rows come from the task's earlier result (they do not "
        "depend on tune's settings) and the table says so. Saves most of the eval time on the long tasks.",
    )
    args = parser.parse_args()

    from edgeft.bench import machine

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    suffix = "-quick" if args.quick else ""
    saved = RESULTS / f"task_suite{suffix}.json"
    earlier_report = json.loads(saved.read_text()) if saved.is_file() else {}
    # rows from before each row named its machine were all measured on the file's one machine
    earlier = [{"machine": earlier_report.get("machine"), **r} for r in earlier_report.get("results", [])]
    here = machine()
    results = []
    for task in args.tasks.split(","):
        variant = tuple(args.tune_args.split())
        name = task + "".join(variant).replace("--", "-") if variant else ""
        result = run_task(
            task,
            work,
            quick=args.quick,
            tune_args=variant,
            name=name,
            resume=args.resume,
            base=not args.base_from_earlier,
        )
        result["machine"] = here
        if args.base_from_earlier:
            scored = [
                r for r in earlier if r["task"] == task and r.get("base") is not None and not r.get("base_earlier")
            ]
            if scored:
                result.update(base=scored[-1]["base"], base_row=scored[-1]["base_row"], base_earlier=True)
        results.append(result)
        print(json.dumps(results[-1]), flush=True)
        if args.compare_no_split:
            results.append(run_task(task, work, quick=args.quick, tune_args=("--val-split", "0"), name=f"{task}-all"))
            results[-1]["machine"] = here
            print(json.dumps(results[-1]), flush=True)
    # runs of other tasks, and on other machines, stay in the table: a task run again on the same
    # machine replaces its own row
    done = {(r["task"], r["variant"], r["machine"]) for r in results}
    results = [r for r in earlier if (r["task"], r["variant"], r["machine"]) not in done] + results
    report = {"quick": args.quick, "results": results}
    RESULTS.mkdir(exist_ok=True)
    saved.write_text(json.dumps(report, indent=2) + "\n")
    text = "\n".join(markdown(results, args.quick)) + "\n"
    (RESULTS / f"task_suite{suffix}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
