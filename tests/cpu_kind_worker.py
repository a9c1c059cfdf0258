"""Run by tests/test_cpu_kinds.py twice: natively, and under `qemu-x86_64 -cpu Haswell` (an AVX2 +
FMA CPU without AVX-512, VNNI or bf16, so ONNX Runtime's MLAS picks its AVX2 kernels). Saves the
logits an export gives for fixed token sequences, in a prompt pass (many rows at once) and in
one-token decode steps (MLAS has separate single-row kernels), and prints the CPU features seen.

    python tests/cpu_kind_worker.py EXPORT_FOLDER OUT.npz
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime_genai as og
from numpy._core._multiarray_umath import __cpu_features__

from edgeft.cpu import usable_cpus
from edgeft.runtime.engine import ALL_LOGITS_GRAPH, og_config

SEQUENCES = 6  # a rounding step now and then moves one sequence's later rows; a kernel bug moves them all


def main() -> None:
    folder, out = sys.argv[1], sys.argv[2]
    model = og.Model(og_config(Path(folder), usable_cpus(), graph=ALL_LOGITS_GRAPH))  # prompt rows: every position
    vocab = json.loads(Path(folder, "genai_config.json").read_text())["model"]["vocab_size"]
    rng = np.random.default_rng(0)
    saved = {}
    for i in range(SEQUENCES):
        prompt = rng.integers(0, vocab, size=40).tolist()
        forced = rng.integers(0, vocab, size=8).tolist()  # fed one by one: no greedy choice can diverge
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + len(forced) + 1)
        generator = og.Generator(model, params)
        generator.append_tokens(prompt)
        saved[f"prompt{i}"] = np.asarray(generator.get_output("logits"), dtype=np.float32).reshape(len(prompt), -1)
        rows = []
        for token in forced:
            generator.append_tokens([token])
            rows.append(np.asarray(generator.get_logits(), dtype=np.float32).reshape(-1))
        saved[f"decode{i}"] = np.stack(rows)
    np.savez(out, **saved)
    print(json.dumps({flag: bool(__cpu_features__[flag]) for flag in ("AVX2", "FMA3", "AVX512F", "AVX512_SKX")}))


if __name__ == "__main__":
    main()
