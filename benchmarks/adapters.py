"""What a runtime adapter costs against a merged export of the same run, side by side in one run.

    edgeft export runs/quickstart --as-adapter        # the shared base + runs/quickstart/onnx-adapter
    python benchmarks/adapters.py runs/quickstart --limit 100

Three models answer the same held-out prompts greedily, taking turns prompt by prompt (so a noisy
machine slows all of them alike): the run's merged int4 export, the shared base with the run's
adapter, and the shared base alone (what the empty LoRA slots cost). Per model: exact match
against the references, decode tokens/s (after the first token) and time to first token, medians;
and the bytes each needs on disk. Results go to benchmarks/results/adapters.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="A run with a merged export and an adapter export.")
    parser.add_argument("--data", default=str(ROOT / "samples" / "recipes" / "eval.jsonl"))
    parser.add_argument("--limit", type=int, default=100, help="Prompts each model answers.")
    args = parser.parse_args()

    from edgeft.artifacts import Run, dir_size
    from edgeft.bench import machine
    from edgeft.evaluate import answer_room, exact_match, load_samples
    from edgeft.runtime import ChatModel

    run = Run.open(Path(args.run))
    merged_dir = run.path / run.stage("export")["path"]
    adapter = run.stage("adapter")
    adapter_file = run.path / adapter["path"] / "adapter.onnx_adapter"
    base = ChatModel.load(adapter["base"])
    models = {
        "merged export": ChatModel.load(merged_dir),
        "base + adapter": base.with_adapter(adapter_file),
        "base alone": base,
    }
    samples = load_samples(args.data, args.limit)
    max_tokens = answer_room(models["merged export"].count_tokens, samples)
    for model in models.values():
        model.chat(samples[0].messages, max_tokens=4, temperature=0.0)  # warm-up
    stats = {name: {"ttft": [], "decode": [], "exact": 0} for name in models}
    for i, sample in enumerate(samples):
        for name, model in models.items():
            r = model.chat(sample.messages, max_tokens=max_tokens, temperature=0.0)
            stats[name]["ttft"].append(r.time_to_first_token)
            if r.usage["completion_tokens"] > 1:
                stats[name]["decode"].append((r.usage["completion_tokens"] - 1) / (r.elapsed - r.time_to_first_token))
            stats[name]["exact"] += exact_match(r.text, sample.reference)
        if (i + 1) % 20 == 0:
            print(f"{i + 1}/{len(samples)} prompts", flush=True)
    sizes = {
        "merged export": dir_size(merged_dir),
        "base + adapter": dir_size(Path(adapter["base"])) + adapter_file.stat().st_size,
        "base alone": dir_size(Path(adapter["base"])),
    }
    rows = {
        name: {
            "exact_match_pct": round(100 * s["exact"] / len(samples), 1),
            "decode_tokens_per_s_median": round(statistics.median(s["decode"]), 1),
            "ttft_s_median": round(statistics.median(s["ttft"]), 3),
            "size_bytes": sizes[name],
        }
        for name, s in stats.items()
    }
    merged, tuned = rows["merged export"], rows["base + adapter"]
    result = {
        "machine": machine(),
        "run": str(run.path),
        "prompts": len(samples),
        "adapter_bytes": adapter_file.stat().st_size,
        "rounding": {"merged": run.stage("export").get("rounding"), "base": _base_rounding(adapter["base"])},
        "rows": rows,
        "decode_slower_pct": round(
            100 * (1 - tuned["decode_tokens_per_s_median"] / merged["decode_tokens_per_s_median"]), 1
        ),
        "exact_match_points": round(tuned["exact_match_pct"] - merged["exact_match_pct"], 1),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "adapters.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"Machine: {result['machine']}; {len(samples)} prompts of {Path(args.data).name}, greedy, run {run.path.name}",
        "",
        "| model | exact match % | decode tokens/s (median) | TTFT (median) | on disk |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['exact_match_pct']:.1f} | {r['decode_tokens_per_s_median']:.1f} | {r['ttft_s_median']:.3f} s | "
            f"{r['size_bytes'] / 1e6:.1f} MB |"
        )
    lines += [
        "",
        (
            f"The adapter file: {result['adapter_bytes'] / 1e6:.1f} MB. Base + adapter vs the merged export: exact match "
            f"{result['exact_match_points']:+.1f} points (goal: within 3), decode {result['decode_slower_pct']:.1f}% slower "
            "(goal: at most 10%)."
        ),
    ]
    (RESULTS / "adapters.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _base_rounding(base: str) -> str | None:
    return json.loads((Path(base) / "edgeft-base.json").read_text()).get("rounding")


if __name__ == "__main__":
    sys.exit(main())
