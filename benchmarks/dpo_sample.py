"""The preference sample (samples/returns) the README way: supervised fine-tuning, then DPO from that
run, each exported to int4, all four models evaluated side by side in one `edgeft eval` run.

    python benchmarks/dpo_sample.py                  # full runs with default settings (about half an hour on 2 cores)
    python benchmarks/dpo_sample.py --quick          # a few steps each: the path, not the quality

The commands:
    edgeft tune --data samples/returns/train.jsonl --output WORK/sft
    edgeft export WORK/sft --int4
    edgeft tune --method dpo --from WORK/sft --data samples/returns/preferences.jsonl --output WORK/dpo
    edgeft export WORK/dpo --int4
    edgeft eval WORK/sft WORK/sft/onnx-int4 WORK/dpo WORK/dpo/onnx-int4 --data samples/returns/test.jsonl --no-merged
test.jsonl (preference pairs, never trained on) gives each model's exact match with the policy's
answer and how often it scores that answer above the other. Results: benchmarks/results/dpo_sample.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from task_suite import RESULTS, ROOT, _layout, edgeft  # a sibling script, not a package

DATA = ROOT / "samples" / "returns"
QUICK = {
    "tune": ["--max-steps", "4"],
    "export": ["--quant-method", "rtn", "--verify-samples", "4", "--allow-drift"],
    "eval": ["--limit", "4"],
}


def run(work: Path, *, quick: bool = False) -> dict:
    """The five commands in WORK; every exit code and time, each export's layout and gate, the rows."""
    from edgeft.bench import machine

    work.mkdir(parents=True, exist_ok=True)
    log = work / "dpo_sample.log"
    log.unlink(missing_ok=True)
    sft, dpo, report = work / "sft", work / "dpo", work / "eval.json"
    steps = [
        ("tune sft", "tune", ["tune", "--data", str(DATA / "train.jsonl"), "--output", str(sft), "--force"]),
        ("export sft", "export", ["export", str(sft), "--int4", "--force"]),
        (
            "tune dpo",
            "tune",
            ["tune", "--method", "dpo", "--from", str(sft), "--data", str(DATA / "preferences.jsonl")]
            + ["--output", str(dpo), "--force"],
        ),
        ("export dpo", "export", ["export", str(dpo), "--int4", "--force"]),
        (
            "eval",
            "eval",
            ["eval", str(sft), str(sft / "onnx-int4"), str(dpo), str(dpo / "onnx-int4")]
            + ["--data", str(DATA / "test.jsonl"), "--no-merged", "--output", str(report)],
        ),
    ]
    result = {"machine": machine(), "quick": quick, "exit": {}, "seconds": {}}
    for name, kind, command in steps:
        extra = QUICK.get(kind, []) if quick else []
        code, seconds = edgeft(*command, *extra, log=log)
        result["exit"][name], result["seconds"][name] = code, seconds
        print(f"{name}: exit {code}, {seconds / 60:.1f} min", flush=True)
        if code not in (0, 3):  # 3: an export outside the gate; its folder is there and eval says by how much
            break
    for key, folder in (("sft", sft), ("dpo", dpo)):
        manifest = json.loads((folder / "edgeft.json").read_text()) if (folder / "edgeft.json").is_file() else {}
        exported = manifest.get("stages", {}).get("export", {})
        gate = (exported.get("verification") or {}).get("gate") or {}
        metrics = manifest.get("stages", {}).get("tune", {}).get("metrics", {})
        result[key] = {
            "export": _layout(exported, folder / "onnx-int4" / "model.onnx"),
            "gate": gate.get("passed"),
            "tune_metrics": metrics,
        }
    if report.is_file():
        result["rows"] = [
            {k: r[k] for k in ("label", "kind", "backend", "exact_match", "preference_accuracy", "samples")}
            for r in json.loads(report.read_text())["rows"]
        ]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/edgeft-dpo-sample", help="Where the runs go.")
    parser.add_argument("--quick", action="store_true", help="A few training steps each: checks the path only.")
    args = parser.parse_args()
    result = run(Path(args.work), quick=args.quick)
    RESULTS.mkdir(exist_ok=True)
    suffix = "-quick" if args.quick else ""
    saved = RESULTS / f"dpo_sample{suffix}.json"
    earlier = json.loads(saved.read_text())["runs"] if saved.is_file() else []
    runs = [result, *earlier]  # newest first: the file is the sample's measurement history
    saved.write_text(json.dumps({"runs": runs}, indent=2) + "\n")
    text = ["# The preference sample (samples/returns)", ""]
    for n, r in enumerate(runs):
        text += ["## " + ("Latest run" if n == 0 else "Earlier run"), "", *markdown(r), ""]
        text += [r["note"] + ".", ""] if r.get("note") else []
    (RESULTS / f"dpo_sample{suffix}.md").write_text("\n".join(text))
    print("\n".join(text))


def markdown(result: dict) -> list[str]:
    exits = ", ".join(f"{k} {v}" for k, v in result["exit"].items())
    minutes = ", ".join(f"{k} {v / 60:.1f}" for k, v in result["seconds"].items())
    lines = [
        f"Machine: {result['machine']}. " + ("Quick runs: the path only." if result["quick"] else "Default settings."),
        "",
        f"Exit codes: {exits}. Minutes: {minutes}.",
        "",
        "| model | exact match % | preferred answer scored higher % | int4 export | gate |",
        "|---|---:|---:|---|---|",
    ]
    # the eval's rows in its models' order: the SFT run, its int4 export, the DPO run, its int4 export
    names = ("SFT, as trained", "SFT, int4", "SFT then DPO, as trained", "SFT then DPO, int4")
    for name, r in zip(names, result.get("rows", [])):
        run = result["sft"] if name.startswith("SFT,") else result["dpo"]
        layout = run["export"] if r["backend"] == "onnx" else "-"
        gate = {True: "passed", False: "FAILED", None: "-"}[run["gate"]] if r["backend"] == "onnx" else "-"
        preferred = "-" if r["preference_accuracy"] is None else f"{r['preference_accuracy']:.1f}"
        lines.append(f"| {name} | {r['exact_match']:.1f} | {preferred} | {layout or '-'} | {gate} |")
    return lines


if __name__ == "__main__":
    main()
