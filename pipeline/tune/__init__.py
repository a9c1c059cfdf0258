"""edgeft tune: QLoRA / LoRA / DoRA fine-tuning, in one process or many.

check config and data (before loading any model) -> load tokenizer, model, adapter -> pack the data
with no padding -> train (progress bar, eval, checkpoints, Ctrl-C safe) -> save the best adapter,
metrics, loss curve and the manifest.

The pieces, each readable on its own:
  start        tune() and resume(): every check before weights load, the run's record
  distributed  the engine Accelerate was launched with (one process, DDP, FSDP, DeepSpeed)
  packing      examples into rows, rows into steps, steps into each process's share
  model        device, precision, the model with its adapter, packed attention, the chunked loss
  loop         the training loop, its step and evaluation
  checkpoints  written by the main process, read by all
  state        the loop's state and the metrics log
  progress     the progress bar, Ctrl-C, time estimates
"""

from edgeft.pipeline.tune.checkpoints import latest_checkpoint
from edgeft.pipeline.tune.distributed import launcher_rank
from edgeft.pipeline.tune.loop import TrainingInterrupted
from edgeft.pipeline.tune.model import (
    PACKED_ATTENTION,
    load_tokenizer,
    pick_device_name,
    register_packed_attention,
    resolve_precision,
)
from edgeft.pipeline.tune.packing import Plan, collate, pack
from edgeft.pipeline.tune.progress import estimate_seconds
from edgeft.pipeline.tune.start import resume, summary, tune
from edgeft.pipeline.tune.state import read_metrics

__all__ = [
    "PACKED_ATTENTION",
    "Plan",
    "TrainingInterrupted",
    "collate",
    "estimate_seconds",
    "latest_checkpoint",
    "launcher_rank",
    "load_tokenizer",
    "pack",
    "pick_device_name",
    "read_metrics",
    "register_packed_attention",
    "resolve_precision",
    "resume",
    "summary",
    "tune",
]
