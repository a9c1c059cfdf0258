"""The CPU this process runs on: how many cores it may use, and the instruction sets that decide
speed. One home for both: training, evaluation, the runtime, bench and doctor all ask here."""

from __future__ import annotations

import os
from pathlib import Path

# The flags that change which kernels run (and so the speed): printed beside every speed figure.
SPEED_FLAGS = ("avx2", "fma", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def usable_cpus() -> int:
    """Every CPU this process may use: a container or `taskset` given fewer cores than the machine
    has is not oversubscribed. Left to itself, ONNX Runtime ran SmolLM2 int4 on a 2-core VM at the
    speed of one thread (decode 139 vs 200 tokens/s, 512-token prefill 0.93 vs 0.47 s)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity call
        return os.cpu_count() or 1


def cpu_flags() -> list[str]:
    """Which of SPEED_FLAGS this CPU has (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    line = next((x for x in text.splitlines() if x.startswith("flags")), "")
    have = set(line.split(":", 1)[-1].split())
    return [f for f in SPEED_FLAGS if f in have]


def has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: there a QLoRA step runs 1.1x-1.4x faster in bf16 than in fp32 (two hosts of a 2-core EPYC VM)."""
    return bool({"avx512_bf16", "amx_bf16"} & set(cpu_flags()))


def ort_session_options(threads: int | None = None):
    """ONNX Runtime session options for a CPU session of our own (onnxruntime-genai makes its own):
    `threads` intra-op threads, default the CPUs this process may use."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or usable_cpus()
    return options
