"""Train against the int4 weights you deploy (`edgeft tune --int4-base`), beside the default path.

    python benchmarks/int4_base.py --task intents --seed 3
    python benchmarks/int4_base.py --task intents --seed 3 --quick   # a few steps: the path only

The default path (QLoRA on the NF4 base, merge, `export --int4`) rounds the merged weights after
training: on the intents sample's unseen phrasings that moved 5 to 12 of 100 answers, nearly all
the wrong way (docs/evaluation.md). With --int4-base the adapter learns against the model's int4
export's own weights instead, and is never merged; the README way, with that one flag:

    edgeft tune --model smollm2-135m --int4-base --data samples/TASK/train.jsonl --seed S --output WORK/RUN
    edgeft export WORK/RUN              # the int4 export trained against + the adapter
    edgeft eval WORK/RUN WORK/RUN/onnx-adapter --data samples/TASK/test.jsonl --no-merged

(the model as trained in PyTorch, and as deployed: the base export + adapter through
onnxruntime-genai), on the same test set. The table compares both with the task suite's row of the
default path for the same task and seed (benchmarks/results/task_suite.json; the same machine's
when there is one). Results: benchmarks/results/int4_base.{json,md}.
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
TEST_FILES = {"recipes": "eval.jsonl"}


def edgeft(*args: str, log: Path) -> float:
    start = time.perf_counter()
    with open(log, "a", encoding="utf-8") as out:
        out.write(f"\n$ edgeft {' '.join(args)}\n")
        out.flush()
        subprocess.run([sys.executable, "-m", "edgeft", *args], check=True, stdout=out, stderr=subprocess.STDOUT)
    return round(time.perf_counter() - start, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="intents")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--work", default="/tmp/edgeft-int4-base")
    parser.add_argument("--quick", action="store_true", help="A few training steps and test examples: the path only.")
    args = parser.parse_args()

    from edgeft.bench import machine

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    log = work / f"{args.task}-seed{args.seed}.log"
    data = ROOT / "samples" / args.task
    test = data / TEST_FILES.get(args.task, "test.jsonl")
    run = work / f"{args.task}-seed{args.seed}"
    seconds = {}
    quick = ["--max-steps", "4"] if args.quick else []
    tune = ["tune", "--model", args.model, "--int4-base", "--data", str(data / "train.jsonl"), "--seed", str(args.seed)]
    seconds["tune"] = edgeft(*tune, "--output", str(run), "--force", *quick, log=log)
    seconds["export"] = edgeft("export", str(run), "--force", "--allow-drift", log=log)
    report = work / f"{run.name}-eval.json"
    limit = ["--limit", "4"] if args.quick else []
    models = (str(run), str(run / "onnx-adapter"))
    seconds["eval"] = edgeft(
        "eval", *models, "--data", str(test), "--no-merged", "--output", str(report), *limit, log=log
    )
    rows = {"as-trained": [], "fine-tuned": []}
    kinds = {r["label"]: r["kind"] for r in json.loads(report.read_text())["rows"]}
    for line in report.with_suffix(".predictions.jsonl").read_text().splitlines():
        p = json.loads(line)
        rows[kinds[p["model"]]].append(p)
    trained, deployed = (sorted(rows[k], key=lambda p: p["example"]) for k in ("as-trained", "fine-tuned"))
    metric = "token_f1" if args.task == "freetext" else "exact_match"

    def score(rows):
        return round(100 * sum(float(r[metric]) for r in rows) / len(rows), 1)

    result = {
        "task": args.task,
        "seed": args.seed,
        "machine": machine(),
        "quick": args.quick,
        "metric": metric,
        "examples": len(trained),
        "as_trained": score(trained),
        "deployed": score(deployed),
        "same_answers": sum(a["prediction"].strip() == b["prediction"].strip() for a, b in zip(trained, deployed)),
        "lost": sum(bool(a["exact_match"]) and not b["exact_match"] for a, b in zip(trained, deployed)),
        "won": sum(bool(b["exact_match"]) and not a["exact_match"] for a, b in zip(trained, deployed)),
        "seconds": seconds,
    }
    suite = RESULTS / "task_suite.json"
    earlier = json.loads(suite.read_text())["results"] if suite.is_file() else []
    default = [
        r
        for r in earlier
        if r["task"] == args.task and r["variant"] == (f"--seed {args.seed}" if args.seed != 1 else "defaults")
    ]
    if default:
        pick = ([r for r in default if r.get("machine") == result["machine"]] or default)[-1]
        result["default_path"] = {k: pick.get(k) for k in ("as_trained", "int4", "machine")}
    name = "int4_base-quick" if args.quick else "int4_base"
    saved = RESULTS / f"{name}.json"
    results = json.loads(saved.read_text())["results"] if saved.is_file() else []
    key = ("task", "seed", "machine", "how")  # a by-hand row stays beside this script's
    results = [
        r for r in results if [r.get(k, "this script") for k in key] != [result.get(k, "this script") for k in key]
    ]
    results.append(result)
    saved.write_text(json.dumps({"results": results}, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text("\n".join(markdown(results)) + "\n")
    print(json.dumps(result, indent=2))


def markdown(results: list[dict]) -> list[str]:
    machines = list(dict.fromkeys(r["machine"] for r in results))
    lines = [
        "Adapters trained against the int4 export's own weights (base + fp32 adapter, never merged) beside the "
        "default path (NF4 QLoRA, merged, int4). Machines: "
        + "; ".join(f"{chr(65 + i)} = {m}" for i, m in enumerate(machines))
        + ".",
        "",
        "| task | seed | machine | how | metric | trained on int4: as trained | deployed (int4 base + adapter) | same answers | lost / won | default path: as trained | default path: int4 |",
        "|---|---:|---|---|---|---:|---:|---:|---|---:|---:|",
    ]
    for r in results:
        default = r.get("default_path") or {}
        lines.append(
            f"| {r['task']}{' (quick)' if r['quick'] else ''} | {r['seed']} | {chr(65 + machines.index(r['machine']))} | {r.get('how', 'this script')} | {r['metric']} "
            f"| {r['as_trained']} | {r['deployed']} | {r['same_answers']} of {r['examples']} | {r['lost']} / {r['won']} "
            f"| {default.get('as_trained', '-')} | {default.get('int4', '-')} |"
        )
    return lines


if __name__ == "__main__":
    main()
