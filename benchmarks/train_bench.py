"""Training benchmark: edgeft tune against a plain TRL SFTTrainer, and QLoRA against LoRA memory.

Same data (the recipe sample), same LoRA (r 16, alpha 32, dropout 0, every linear layer), same
learning rate, same tokens per step (TRL: 5 examples padded to the longest, ~1 000 real tokens;
edgeft: examples packed into 1 024-token rows), same precision (bf16 autocast where the CPU has it),
same number of optimizer steps. Each configuration runs in its own process so peak memory (RSS)
is its own. Tokens/s counts real (non-pad) input tokens over the training steps only.

    python benchmarks/train_bench.py                 # all configurations, ~10 minutes on 2 cores
    python benchmarks/train_bench.py --steps 10 --only edgeft-lora trl-lora
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edgeft.artifacts import peak_rss_mb
from edgeft.bench import machine

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "samples" / "recipes" / "train.jsonl"
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
LR = 2e-4
MAX_LEN = 512

CONFIGS = {
    "edgeft-lora": "edgeft tune, LoRA, packed rows of 1024 tokens",
    "trl-lora": "TRL SFTTrainer, LoRA, batches of 5 padded examples",
    "edgeft-qlora": "edgeft tune, QLoRA (NF4 base)",
    "edgeft-lora-fp32": "edgeft tune, LoRA, fp32 (no autocast)",
}


def run_edgeft(steps: int, method: str, precision: str) -> dict:
    from edgeft.pipeline.config import TuneConfig
    from edgeft.pipeline.tune import tune

    with tempfile.TemporaryDirectory() as tmp:
        cfg = TuneConfig(
            model="smollm2-135m",
            data=str(DATA),
            method=method,
            lora_r=LORA["r"],
            lora_alpha=LORA["lora_alpha"],
            lora_dropout=0.0,
            learning_rate=LR,
            max_seq_len=MAX_LEN,
            batch_tokens=1024,
            max_steps=steps,
            precision=precision,
            save_every=10_000,
            output=str(Path(tmp) / "run"),
        )
        run = tune(cfg)
        metrics = json.loads((run / "edgeft.json").read_text())["stages"]["tune"]["metrics"]
    return {
        "steps": metrics["steps"],
        "tokens": metrics["train_tokens"],
        "tokens_per_second": metrics["tokens_per_second"],
    }


def run_trl(steps: int) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from edgeft.models import resolve_model
    from edgeft.pipeline.tune import resolve_precision

    path = resolve_model("smollm2-135m").path
    rows = [json.loads(line)["messages"] for line in DATA.read_text().splitlines() if line.strip()]
    dataset = Dataset.from_list([{"prompt": m[:-1], "completion": m[-1:]} for m in rows])
    bf16 = resolve_precision("auto", "cpu") == "bf16"
    timer = {"tokens": 0, "seconds": 0.0}

    class Clock(TrainerCallback):  # count only the optimizer steps, like edgeft's own tokens/s
        def on_step_begin(self, args, state, control, **kw):
            timer["start"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            timer["seconds"] += time.perf_counter() - timer["start"]

    class Counting(SFTTrainer):
        def compute_loss(self, model, inputs, *a, **kw):
            timer["tokens"] += int(inputs["attention_mask"].sum())
            return super().compute_loss(model, inputs, *a, **kw)

    with tempfile.TemporaryDirectory() as tmp:
        args = SFTConfig(
            output_dir=tmp,
            max_steps=steps,
            per_device_train_batch_size=5,
            learning_rate=LR,
            max_length=MAX_LEN,
            bf16=bf16,
            use_cpu=True,
            logging_steps=1000,
            save_strategy="no",
            report_to=[],
            packing=False,
            dataloader_num_workers=0,
            seed=42,
        )
        model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
        trainer = Counting(
            model=model,
            args=args,
            train_dataset=dataset,
            processing_class=AutoTokenizer.from_pretrained(path),
            peft_config=LoraConfig(task_type="CAUSAL_LM", **LORA),
            callbacks=[Clock()],
        )
        trainer.train()
    return {
        "steps": steps,
        "tokens": timer["tokens"],
        "tokens_per_second": round(timer["tokens"] / timer["seconds"], 1),
    }


def one(name: str, steps: int) -> dict:
    if name == "trl-lora":
        result = run_trl(steps)
    else:
        method = "qlora" if "qlora" in name else "lora"
        result = run_edgeft(steps, method, "fp32" if name.endswith("fp32") else "auto")
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--only", nargs="*", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "train.json"))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(args.one, args.steps)))
        return

    results = {}
    for name in args.only:
        print(f"{name}: {CONFIGS[name]} ({args.steps} steps)...", flush=True)
        proc = subprocess.run(
            [sys.executable, __file__, "--one", name, "--steps", str(args.steps)],
            check=False,
            capture_output=True,
            text=True,
            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
        )
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            results[name] = {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
        else:
            results[name] = json.loads(line[7:])
        print(f"  {results[name]}", flush=True)
    report = {"machine": machine(), "steps": args.steps, "results": results}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2))
    print("\n".join(markdown(report)))


def markdown(report: dict) -> list[str]:
    r = report["results"]
    lines = ["| configuration | real tokens/s | peak RSS |", "|---|---:|---:|"]
    for name, row in r.items():
        if "error" in row:
            lines.append(f"| {CONFIGS[name]} | error: {row['error']} | |")
        else:
            lines.append(f"| {CONFIGS[name]} | {row['tokens_per_second']:.0f} | {row['peak_rss_mb'] / 1024:.2f} GB |")
    ok = lambda *names: all(n in r and "error" not in r[n] for n in names)
    if ok("edgeft-lora", "trl-lora"):
        lines.append(
            f"\nedgeft / TRL tokens/s: {r['edgeft-lora']['tokens_per_second'] / r['trl-lora']['tokens_per_second']:.2f}x"
        )
    if ok("edgeft-qlora", "edgeft-lora-fp32"):
        lines.append(
            f"QLoRA peak memory / LoRA fp32: {r['edgeft-qlora']['peak_rss_mb'] / r['edgeft-lora-fp32']['peak_rss_mb']:.0%}"
        )
    return lines


if __name__ == "__main__":
    main()
