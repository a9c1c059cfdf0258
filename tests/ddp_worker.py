"""Run by tests/test_distributed.py under torchrun (one copy per process): trains or resumes, and
records what this process saw — how far its trainable weights were from the other processes' after
every step, and every file it wrote or removed under the run directory.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_worker.py REPORT_DIR CONFIG_JSON [resume]
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from edgeft.errors import EdgeftError
from edgeft.pipeline.config import TuneConfig
from edgeft.pipeline.tune import TrainingInterrupted, loop, preference, resume, tune


def main() -> int:
    report_dir, config, mode = Path(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "tune"
    rank = int(os.environ["RANK"])
    interrupt_at = config.pop("interrupt_at", None)
    if config.pop("private_storage", False) and rank == 1:  # as if --output were a local disk of another machine
        private = Path(f"private-{rank}")
        private.mkdir(exist_ok=True)
        os.chdir(private)
    cfg = TuneConfig(**config)
    run_dir = str(Path(cfg.output).resolve())
    writes, spreads, seen = [], [], {}

    def audit(event, args):
        if event in ("open", "os.rename", "os.replace", "os.remove", "os.mkdir", "os.rmdir", "shutil.rmtree"):
            path = args[0]
            writing = event != "open" or (isinstance(args[1], str) and any(c in args[1] for c in "wax+"))
            if writing and isinstance(path, (str, Path)) and str(Path(path).resolve()).startswith(run_dir):
                writes.append(f"{event} {path}")

    real_step, real_pair_step = loop.train_step, preference.Preference.step

    def spying_step(model, *args, **kwargs):
        seen["model"] = model
        return real_step(model, *args, **kwargs)

    def spying_pair_step(self, model, *args, **kwargs):  # preference tuning's step
        seen["model"] = model
        return real_pair_step(self, model, *args, **kwargs)

    def on_step(entry):
        # after the optimizer step: the spread of each trainable weight across processes
        flat = torch.cat([p.detach().flatten().double() for p in seen["model"].parameters() if p.requires_grad])
        high, low = flat.clone(), flat.clone()
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        spreads.append(float((high - low).abs().max()))
        if entry["step"] == interrupt_at and rank == 1:  # a signal to one process must stop them all
            os.kill(os.getpid(), signal.SIGINT)

    loop.train_step, preference.Preference.step = spying_step, spying_pair_step
    sys.addaudithook(audit)
    status, error = 0, None
    try:
        resume(cfg.output, on_step=on_step) if mode == "resume" else tune(cfg, on_step=on_step)
    except TrainingInterrupted:
        status = 130
    except EdgeftError as e:
        status, error = e.exit_code, str(e)
    report = {"rank": rank, "writes": writes, "spreads": spreads, "status": status, "error": error}
    (report_dir / f"{mode}-{rank}.json").write_text(json.dumps(report))
    return status


if __name__ == "__main__":
    sys.exit(main())
