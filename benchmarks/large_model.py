"""Phi-3-mini-sized rehearsal: the whole path on a 3.8B model, with each stage's time and peak memory.

No 3.8B weights can be downloaded here, so the model is built with Phi-3-mini-4k-instruct's
configuration (32 layers, hidden 3072, fused qkv_proj / gate_up_proj, vocab 32064, `<|end|>` ends a
turn) and random weights, stored in bf16 as Phi-3 ships. Quality numbers mean nothing on random
weights; time and memory are what this measures. Each stage is the CLI command a user runs, in
its own process, under GNU time (peak resident memory of that process).

    python benchmarks/large_model.py --workdir /tmp/phi3               # every stage; ~1 h on 2 cores
    python benchmarks/large_model.py --workdir /tmp/phi3 --stages chat  # one stage again

Stages whose output exists are skipped; results go to benchmarks/results/large_model.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
STAGES = ("build", "tune", "merge", "export", "export-gptq", "chat")

PHI3_MINI = dict(  # microsoft/Phi-3-mini-4k-instruct config.json
    hidden_size=3072,
    intermediate_size=8192,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
    original_max_position_embeddings=4096,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    vocab_size=32064,
    tie_word_embeddings=False,
    hidden_act="silu",
    sliding_window=2047,
)


def build(model_dir: Path) -> dict:
    """Phi-3-mini's architecture with random bf16 weights, and the project's test tokenizer with
    Phi-3's chat template and end-of-turn token (its ids fit inside the 32064-entry vocabulary)."""
    import torch
    from transformers import AutoModelForCausalLM, Phi3Config

    sys.path.insert(0, str(ROOT))
    from tests.tiny import PHI3_TEMPLATE, tiny_tokenizer

    tok = tiny_tokenizer(model_dir, PHI3_TEMPLATE, eos="<|endoftext|>", pad="<|endoftext|>")
    config = Phi3Config(
        **PHI3_MINI,
        bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(
        "cuda" if torch.cuda.is_available() else "cpu"
    ):  # random init: seconds on a GPU, minutes on a CPU
        model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = [tok.eos_token_id, tok.convert_tokens_to_ids("<|end|>")]
    model.save_pretrained(model_dir, max_shard_size="2GB")
    return {"parameters": sum(p.numel() for p in model.parameters())}


def timed(name: str, cmd: list[str], log: Path) -> dict:
    """Run one stage under GNU time: wall seconds and the process's peak RSS."""
    marker = "EDGEFT-TIME"
    full = ["/usr/bin/time", "-f", f"{marker} %M %e", *cmd]
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(cmd)}", flush=True)
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        done = subprocess.run(full, stdout=f, stderr=subprocess.STDOUT, check=False)
    line = [x for x in log.read_text().splitlines() if x.startswith(marker)][-1].split()
    result = {"exit": done.returncode, "seconds": float(line[2]), "peak_rss_gb": round(int(line[1]) / 2**20, 2)}
    print(f"    -> {result}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/edgeft-phi3", help="Where the 3.8B model and run go (~35 GB).")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--steps", type=int, default=3, help="QLoRA optimizer steps.")
    parser.add_argument("--calibration-examples", type=int, default=16, help="GPTQ calibration examples.")
    parser.add_argument("--eval-examples", type=int, default=24, help="Held-out examples for the merge/export checks.")
    args = parser.parse_args()

    from edgeft.bench import machine

    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    model_dir, run_dir, log = work / "phi3-mini-random", work / "run", work / "stages.log"
    results_path = RESULTS / "large_model.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    results["machine"] = machine()
    results.setdefault("stages", {})
    edgeft = [sys.executable, "-m", "edgeft"]
    env_note = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "")}
    samples = ROOT / "samples" / "recipes"
    eval_file = work / "eval.jsonl"
    eval_file.write_text("".join((samples / "eval.jsonl").read_text().splitlines(True)[: args.eval_examples]))

    for stage in args.stages:
        if stage == "build":
            if (model_dir / "config.json").exists():
                continue
            cmd = [sys.executable, __file__, "--build-only", str(model_dir)]
        elif stage == "tune":
            cmd = [*edgeft, "tune", "--model", str(model_dir), "--data", str(samples / "train.jsonl")]
            cmd += ["--eval-file", str(eval_file), "--method", "qlora", "--max-steps", str(args.steps)]
            cmd += ["--batch-tokens", "512", "--max-seq-len", "512", "--output", str(run_dir), "--force"]
        elif stage == "merge":
            cmd = [*edgeft, "merge", str(run_dir), "--force"]
        elif stage == "export":
            # verified on 4 held-out prompts, also decoded greedily: the NF4 model as trained takes ~5 s a token here
            cmd = [*edgeft, "export", str(run_dir), "--int4", "--quant-method", "k_quant", "--verify-samples", "4"]
            cmd += ["--force", "--allow-drift"]
        elif stage == "export-gptq":  # calibrated on a few examples: each is a forward pass of 3.8B params
            calibration = work / "calibration.jsonl"
            lines = (samples / "train.jsonl").read_text().splitlines(True)[: args.calibration_examples]
            calibration.write_text("".join(lines))
            cmd = [*edgeft, "export", str(run_dir), "--int4", "--quant-method", "gptq", "--calibration"]
            cmd += [str(calibration), "--output", str(run_dir / "onnx-int4-gptq"), "--no-verify", "--force"]
        else:  # chat: decode speed of the int4 export on this machine's cores
            cmd = [*edgeft, "bench", str(run_dir / "onnx-int4"), "--runs", "1", "--decode-tokens", "64"]
        results["stages"][stage] = {**timed(stage, cmd, log), "command": " ".join(cmd[2:])}
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=2))
    results["env"] = env_note
    results_path.write_text(json.dumps(results, indent=2))
    (RESULTS / "large_model.md").write_text("\n".join(markdown(results)) + "\n")
    print("\n".join(markdown(results)))


def markdown(results: dict) -> list[str]:
    lines = [
        f"Machine: {results['machine']}",
        "",
        "| stage | command | time | peak RSS | exit |",
        "|---|---|---:|---:|---:|",
    ]
    for stage, r in results["stages"].items():
        minutes = f"{r['seconds'] / 60:.1f} min"
        lines.append(f"| {stage} | `{r['command']}` | {minutes} | {r['peak_rss_gb']:.1f} GiB | {r['exit']} |")
    return lines


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--build-only":
        out = Path(sys.argv[2])
        out.mkdir(parents=True, exist_ok=True)
        print(json.dumps(build(out)))
    else:
        main()
