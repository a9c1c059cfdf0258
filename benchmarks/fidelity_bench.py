"""Fidelity benchmark: is the merged and the exported model the model as trained, for QLoRA, LoRA and DoRA?

For each method: the quickstart's recipe fine-tune (same preset, only the method changes), then
`edgeft merge` (checked against the model as trained), `edgeft export --int4` (verified against it)
and `edgeft eval` on the held-out recipes: the model as trained (base as training loaded it +
adapter, unmerged; NF4 through bitsandbytes for QLoRA), the merged model and the int4 export, side
by side, plus the old merge (adapter + the unquantized base) for QLoRA. Finished stages are reused.

    python benchmarks/fidelity_bench.py                                  # ~17 min per method on 2 cores
    python benchmarks/fidelity_bench.py --methods lora dora --qlora-run runs/quickstart
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

from edgeft import artifacts
from edgeft.artifacts import Run
from edgeft.bench import machine

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples" / "recipes"
RESULTS = ROOT / "benchmarks" / "results"


def finished(run_dir: Path, stage: str) -> bool:
    return Run.is_run(run_dir) and (Run.open(run_dir).stage(stage) or {}).get("status") == "done"


def measure(method: str, run_dir: Path, limit: int | None) -> dict:
    from edgeft.evaluate import evaluate
    from edgeft.export.onnx import ExportConfig, export
    from edgeft.pipeline.config import TuneConfig
    from edgeft.pipeline.merge import merge
    from edgeft.pipeline.tune import tune
    from edgeft.quickstart import CPU_PRESET

    if not finished(run_dir, "tune"):
        tune(
            TuneConfig(
                model="smollm2-135m",
                data=str(SAMPLES / "train.jsonl"),
                eval_file=str(SAMPLES / "eval.jsonl"),
                output=str(run_dir),
                **{**CPU_PRESET, "method": method},
            ),
            force=True,
        )
    if not finished(run_dir, "merge"):
        merge(run_dir, force=True)
    if not finished(run_dir, "export"):
        export(run_dir, ExportConfig(precision="int4"), force=True)
    report = earlier_eval(run_dir, limit) or evaluate(
        [str(run_dir), str(run_dir / "onnx-int4")],
        SAMPLES / "eval.jsonl",
        limit=limit,
        output=run_dir / "logs" / "fidelity-eval.json",
    )
    run = Run.open(run_dir)
    rows = {("int4" if r["backend"] == "onnx" else r["kind"]): r for r in report["rows"] if r["kind"] != "base"}
    result = {
        "method": method,
        "precision": run.stage("tune")["precision"],
        "samples": report["samples"],
        "as_trained": rows["as-trained"]["exact_match"],
        "merged": rows["merged"]["exact_match"],
        "int4": rows["int4"]["exact_match"],
        "merge_check": run.stage("merge")["fidelity"],
        "export_check": run.stage("export")["verification"],
    }
    if method == "qlora":  # the old merge, for the record: the adapter on the unquantized base
        old = run_dir.parent / f"{run_dir.name}-original-base"
        if not finished(old, "eval"):
            shutil.rmtree(old, ignore_errors=True)
            shutil.copytree(run_dir, old, ignore=shutil.ignore_patterns("merged", "*onnx-*", "logs"))
            merge(old, force=True, base_weights="original", allow_drift=True)
        old_report = evaluate(
            [str(old / "merged")], SAMPLES / "eval.jsonl", limit=limit, output=old / "logs" / "eval.json"
        )
        Run.open(old).record_stage("eval", status="done")
        result["merged_original_base"] = old_report["rows"][0]["exact_match"]
        result["merge_original_check"] = Run.open(old).stage("merge")["fidelity"]
    return result


def earlier_eval(run_dir: Path, limit: int | None) -> dict | None:
    """The run's own evaluation (the quickstart's) when it has the three rows on the same examples."""
    record = Run.open(run_dir).stage("eval") or {}
    if not record.get("report") or not Path(record["report"]).is_file():
        return None
    report = json.loads(Path(record["report"]).read_text())
    kinds = {r["kind"] for r in report["rows"]}
    same = Path(report["data"]) == (SAMPLES / "eval.jsonl").resolve() and (limit is None or report["samples"] == limit)
    return report if same and {"as-trained", "merged", "fine-tuned"} <= kinds else None


def markdown(results: list[dict], where: str) -> list[str]:
    lines = [
        f"Exact match % on the held-out recipes ({results[0]['samples']} examples), {where}:",
        "",
        "| method | as trained | merged (as-trained base) | int4 export | merged onto the original base | merge check: perplexity, exact answers | export check: token agreement, perplexity |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for r in results:
        m, e = r["merge_check"], r["export_check"]
        old = f"{r['merged_original_base']:.1f}" if "merged_original_base" in r else "-"
        lines.append(
            f"| {r['method']} ({r['precision']}) | {r['as_trained']:.1f} | {r['merged']:.1f} | {r['int4']:.1f} | {old} | "
            f"{m['ppl_change_pct']:+.2f}%, {m['candidate_exact_match']:.0f} vs {m['reference_exact_match']:.0f} | "
            f"{e['token_agreement']:.0%}, {e['ppl_change_pct']:+.2f}% |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["qlora", "lora", "dora"], choices=["qlora", "lora", "dora"])
    parser.add_argument("--runs", default="runs/fidelity", help="Where the runs go (finished stages are reused).")
    parser.add_argument(
        "--qlora-run", help="Use this finished QLoRA run (e.g. runs/quickstart) instead of training one."
    )
    parser.add_argument("--limit", type=int, help="Evaluate on the first N held-out examples only.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = []
    for method in args.methods:
        run_dir = Path(args.qlora_run) if method == "qlora" and args.qlora_run else Path(args.runs) / method
        results.append(measure(method, run_dir, args.limit))
    where = machine()
    RESULTS.mkdir(parents=True, exist_ok=True)
    artifacts.write_json_atomic(
        RESULTS / "fidelity.json", {"machine": where, "measured_at": artifacts.now(), "results": results}
    )
    text = "\n".join(markdown(results, where)) + "\n"
    (RESULTS / "fidelity.md").write_text(text)
    print(text)
    print(json.dumps({r["method"]: [r["as_trained"], r["merged"], r["int4"]] for r in results}))


if __name__ == "__main__":
    main()
