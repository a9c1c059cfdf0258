"""What a response_format costs: the same export answers the same prompts free and constrained to a
JSON Schema (inferred from the references, as `edgeft eval --json-schema auto` does).

    python benchmarks/structured_output.py runs/quickstart/onnx-int4 --data samples/recipes/eval.jsonl

Per mode: valid JSON, exact match, time to first token (for a constrained answer this includes
compiling the schema against the vocabulary) and decode tokens/s (after the first token), medians
over the prompts. Results go to benchmarks/results/structured_output.{json,md}.
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
    parser.add_argument("export", help="An ONNX export folder (or a run).")
    parser.add_argument("--data", default=str(ROOT / "samples" / "recipes" / "eval.jsonl"))
    parser.add_argument("--limit", type=int, default=60, help="Prompts to answer in each mode.")
    args = parser.parse_args()

    from edgeft.bench import machine
    from edgeft.evaluate import answer_room, exact_match, infer_json_schema, is_json, load_samples
    from edgeft.runtime import ChatModel

    samples = load_samples(args.data, args.limit)
    schema = infer_json_schema([json.loads(s.reference) for s in samples])
    fmt = {"type": "json_schema", "json_schema": {"name": "reference", "schema": schema}}
    model = ChatModel.load(args.export)
    max_tokens = answer_room(model.count_tokens, samples)
    model.chat(samples[0].messages, max_tokens=4, temperature=0.0)  # warm-up
    rows = {}
    for mode, response_format in (("free", None), ("json_schema", fmt)):
        ttft, decode, valid, exact = [], [], 0, 0
        for s in samples:
            r = model.chat(s.messages, max_tokens=max_tokens, temperature=0.0, response_format=response_format)
            ttft.append(r.time_to_first_token)
            if r.usage["completion_tokens"] > 1:
                decode.append((r.usage["completion_tokens"] - 1) / (r.elapsed - r.time_to_first_token))
            valid += is_json(r.text)
            exact += exact_match(r.text, s.reference)
        rows[mode] = {
            "valid_json_pct": round(100 * valid / len(samples), 1),
            "exact_match_pct": round(100 * exact / len(samples), 1),
            "ttft_s_median": round(statistics.median(ttft), 3),
            "decode_tokens_per_s_median": round(statistics.median(decode), 1),
        }
        print(mode, rows[mode], flush=True)
    free, held = rows["free"], rows["json_schema"]
    slower = 100 * (1 - held["decode_tokens_per_s_median"] / free["decode_tokens_per_s_median"])
    result = {
        "machine": machine(),
        "export": str(
            Path(args.export).resolve().relative_to(ROOT)
            if ROOT in Path(args.export).resolve().parents
            else args.export
        ),
        "prompts": len(samples),
        "schema": schema,
        "rows": rows,
        "decode_slower_pct": round(slower, 1),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "structured_output.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"Machine: {result['machine']}; {len(samples)} prompts of {Path(args.data).name}, greedy, {result['export']}",
        "",
        "| answers | valid JSON % | exact match % | TTFT (median) | decode tokens/s (median) |",
        "|---|---:|---:|---:|---:|",
    ]
    for mode, r in rows.items():
        lines.append(
            f"| {mode} | {r['valid_json_pct']:.1f} | {r['exact_match_pct']:.1f} | {r['ttft_s_median']:.3f} s | "
            f"{r['decode_tokens_per_s_median']:.1f} |"
        )
    verdict = f"{slower:.1f}% slower" if slower > 0 else f"{-slower:.1f}% faster (noise: the same work)"
    lines += ["", f"Constrained decoding per token: {verdict}; goal: at most 5% slower."]
    (RESULTS / "structured_output.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
