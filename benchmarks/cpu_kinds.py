"""Does an export answer the same on an AVX2-only CPU as on this one?

ONNX Runtime picks its int4/int8 MatMul kernels by CPU (AVX-512 VNNI, or AVX2 on most laptops).
This answers the same held-out prompts twice, greedily, as `edgeft eval` does: natively, and under
qemu's user-mode emulator with `-cpu Haswell` (AVX2 + FMA, no AVX-512, VNNI or bf16), which makes
ONNX Runtime take its AVX2 kernels on this machine. Emulated speed means nothing (about a minute
an answer); the answers are the point. With `--avx2-copy DIR` the AVX2 side runs instead in
benchmarks/avx2_kind.py's patched copy of the environment (the same kernels, checked against
qemu's, at native speed), so all held-out prompts take a minute.

    python benchmarks/cpu_kinds.py runs/quickstart/onnx-int4 --limit 23
    python benchmarks/cpu_kinds.py runs/quickstart/onnx-int4 --limit 200 --avx2-copy /tmp/avx2

Prints identical answers, exact match on each kind and the answers that differ; results go to
benchmarks/results/cpu_kinds.{json,md}. Needs qemu-x86_64 (apt-get install qemu-user) or `--avx2-copy`.
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

    from edgeft.cpu import cpu_flags
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
    return {"cpu": features, "flags": cpu_flags(), "seconds": round(time.perf_counter() - start, 1), "answers": rows}


def run_kind(prefix: list[str], python: str, args) -> dict:
    cmd = [*prefix, python, __file__, args.export, "--data", args.data, "--limit", str(args.limit), "--worker"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", help="An ONNX export folder (or a run).")
    parser.add_argument("--data", default=str(ROOT / "samples" / "recipes" / "eval.jsonl"))
    parser.add_argument("--limit", type=int, default=23, help="Prompts to answer (about a minute each emulated).")
    parser.add_argument(
        "--avx2-copy",
        metavar="DIR",
        help="Answer the AVX2 side in benchmarks/avx2_kind.py's copy in DIR, not under qemu.",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(answers(args.export, args.data, args.limit)))
        return

    from edgeft.bench import machine

    native = run_kind([], sys.executable, args)
    if args.avx2_copy:
        copy = [sys.executable, str(ROOT / "benchmarks" / "avx2_kind.py"), "run", args.avx2_copy, "--"]
        avx2, kind = run_kind(copy, "python", args), "AVX2 (patched copy)"
        avx512 = "avx512f" in avx2["flags"]  # the copy's numpy still sees AVX-512; its libraries do not
    else:
        qemu = shutil.which("qemu-x86_64")
        if qemu is None:
            sys.exit("needs qemu-x86_64 (apt-get install qemu-user), or --avx2-copy")
        avx2, kind = run_kind([qemu, "-cpu", "Haswell"], sys.executable, args), "emulated AVX2"
        avx512 = avx2["cpu"]["AVX512F"] or not avx2["cpu"]["AVX2"]
    if avx512:
        sys.exit(f"the {kind} side is not AVX2-only: {avx2['cpu']}, flags {avx2['flags']}")
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
        "avx2_side": kind,
        "cpu": {"native": native["cpu"], "avx2": avx2["cpu"], "avx2_flags": avx2["flags"]},
        "seconds": {"native": native["seconds"], "avx2": avx2["seconds"]},
        "differ": differ,
    }
    lines = [
        f"Machine: {result['machine']}",
        f"Export: {args.export}; {len(pairs)} held-out prompts, greedy",
        f"Identical answers: {result['identical']}/{len(pairs)}",
        f"Exact match: native {result['exact_native']}/{len(pairs)}, {kind} {result['exact_avx2']}/{len(pairs)}",
        *[f"- differs: native {d['native']!r}, AVX2 {d['avx2']!r}, reference {d['reference']!r}" for d in differ],
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cpu_kinds.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "cpu_kinds.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
