"""Does an export answer the same on an AVX2-only CPU as on this one?

ONNX Runtime picks its int4/int8 MatMul kernels by CPU (AVX-512 VNNI, or AVX2 on most laptops).
This answers the same held-out prompts twice, greedily, as `edgeft eval` does: natively, and under
qemu's user-mode emulator with `-cpu Haswell` (AVX2 + FMA, no AVX-512, VNNI or bf16), which makes
ONNX Runtime take its AVX2 kernels on this machine. Emulated speed means nothing (about a minute
an answer); the answers are the point.

    python benchmarks/cpu_kinds.py runs/quickstart/onnx-int4 --limit 23

Prints identical answers, exact match on each kind and the answers that differ; results go to
benchmarks/results/cpu_kinds.{json,md}. Needs qemu-x86_64 (apt-get install qemu-user).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(os.environ.get("EDGEFT_BENCH_RESULTS", ROOT / "benchmarks" / "results"))  # tests write elsewhere


def answers(export: str, data: str, limit: int) -> dict:
    """Greedy answers to the first `limit` prompts, and the CPU features this process sees."""
    from numpy._core._multiarray_umath import __cpu_features__

    from edgeft.evaluate import answer_room, exact_match, load_samples
    from edgeft.runtime import ChatModel, PromptCache

    samples = load_samples(data, limit)
    model = ChatModel.load(export)
    room, cache = answer_room(model.count_tokens, samples), PromptCache()
    start, rows = time.perf_counter(), []
    for s in samples:
        reply = model.chat(s.messages, max_tokens=room, temperature=0.0, cache=cache)
        rows.append({"prediction": reply.text, "reference": s.reference, "exact": exact_match(reply.text, s.reference)})
    features = {f: bool(__cpu_features__[f]) for f in ("AVX2", "FMA3", "AVX512F", "AVX512VNNI", "AVX512BF16")}
    return {"cpu": features, "seconds": round(time.perf_counter() - start, 1), "answers": rows}


def run_kind(prefix: list[str], args) -> dict:
    cmd = [*prefix, sys.executable, __file__, args.export, "--data", args.data, "--limit", str(args.limit), "--worker"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", help="An ONNX export folder (or a run).")
    parser.add_argument("--data", default=str(ROOT / "samples" / "recipes" / "eval.jsonl"))
    parser.add_argument("--limit", type=int, default=23, help="Prompts to answer (about a minute each emulated).")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(answers(args.export, args.data, args.limit)))
        return
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        sys.exit("needs qemu-x86_64 (apt-get install qemu-user)")

    from edgeft.bench import machine

    native = run_kind([], args)
    avx2 = run_kind([qemu, "-cpu", "Haswell"], args)
    if avx2["cpu"]["AVX512F"] or not avx2["cpu"]["AVX2"]:
        sys.exit(f"the emulated CPU is not AVX2-only: {avx2['cpu']}")
    pairs = list(zip(native["answers"], avx2["answers"]))
    differ = [
        {"reference": a["reference"], "native": a["prediction"], "avx2": b["prediction"]}
        for a, b in pairs
        if a["prediction"] != b["prediction"]
    ]
    result = {
        "machine": machine(),
        "export": args.export,
        "prompts": len(pairs),
        "identical": len(pairs) - len(differ),
        "exact_native": sum(a["exact"] for a, _ in pairs),
        "exact_avx2": sum(b["exact"] for _, b in pairs),
        "cpu": {"native": native["cpu"], "emulated": avx2["cpu"]},
        "seconds": {"native": native["seconds"], "emulated": avx2["seconds"]},
        "differ": differ,
    }
    lines = [
        f"Machine: {result['machine']}",
        f"Export: {args.export}; {len(pairs)} held-out prompts, greedy",
        f"Identical answers: {result['identical']}/{len(pairs)}",
        f"Exact match: native {result['exact_native']}/{len(pairs)}, emulated AVX2 {result['exact_avx2']}/{len(pairs)}",
        *[f"- differs: native {d['native']!r}, AVX2 {d['avx2']!r}, reference {d['reference']!r}" for d in differ],
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cpu_kinds.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "cpu_kinds.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
