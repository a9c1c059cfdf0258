"""One process or many: the engine Accelerate was launched with, and the few collective steps the
training loop needs (sums across processes, agreeing on a stop or a failure).

edgeft has no launcher of its own: `accelerate launch` or `torchrun` start the processes, and
Accelerate's state says which engine runs them. Everything a user can get wrong about the launch
is checked here, on every process, before any weights load.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from edgeft.errors import ConfigError, DeviceError, EdgeftError
from edgeft.pipeline.config import TuneConfig

log = logging.getLogger(__name__)

SAMPLES = "samples/accelerate/"


class LaunchError(EdgeftError):
    """The processes cannot train together as launched (another process's problem, or a mismatch)."""


@dataclass
class World:
    accelerator: object

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def size(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def engine(self) -> str:
        """single, ddp, fsdp or deepspeed."""
        kind = str(self.accelerator.distributed_type).rsplit(".", 1)[-1]
        if kind == "FSDP":
            return "fsdp"
        if kind == "DEEPSPEED":
            return "deepspeed"
        return "ddp" if self.size > 1 else "single"

    @property
    def sharded(self) -> bool:
        """The frozen base is split across processes (FSDP, ZeRO-3): the full adapter must be gathered."""
        if self.engine == "fsdp":
            return True
        if self.engine == "deepspeed":
            return self.accelerator.state.deepspeed_plugin.zero_stage == 3
        return False

    def sum(self, *values: float) -> list[float]:
        """Each value summed over all processes (float64, so token counts stay exact)."""
        if self.size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.accelerator.device)
        return self.accelerator.reduce(t, reduction="sum").tolist()

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def agree(self, problem: str | Exception | None) -> None:
        """Raise on every process when any one of them has a problem, so none is left waiting: the
        process with the problem raises it, the others say that another process stopped."""
        failed = self.sum(float(problem is not None))[0]
        if isinstance(problem, Exception):
            raise problem
        if problem:
            raise LaunchError(problem)
        if failed:
            raise LaunchError(f"{int(failed)} other process(es) stopped; see their messages above.")


def launcher_rank() -> int:
    """This process's rank as `accelerate launch`/`torchrun` set it (0 when not launched by one),
    known before any process group exists."""
    return int(os.environ.get("RANK", "0"))


def quiet_unless_main() -> None:
    """Every process checks the data and the launch, but only the main one reports: the others keep
    their warnings and errors."""
    if launcher_rank() > 0:
        logging.getLogger("edgeft").setLevel(logging.WARNING)


def start(device: str, precision: str, cfg: TuneConfig) -> World:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # Accelerate keeps its state in a process-wide singleton and refuses a second Accelerator with
    # another precision; a library caller (or a test session) may well tune twice in one process.
    AcceleratorState._reset_state(reset_partial_state=True)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    accelerator = Accelerator(
        cpu=device == "cpu",
        mixed_precision="no" if precision == "fp32" else precision,
        # DeepSpeed runs the accumulation itself and reads it from here; the loop makes no other use
        # of it (Accelerate would divide every loss by it), see World.loss_scale.
        gradient_accumulation_steps=cfg.grad_accum if _deepspeed_requested() else 1,
    )
    world = World(accelerator)
    if launched > 1 and world.size != launched:
        raise LaunchError(
            f"{launched} processes were launched but Accelerate formed a group of {world.size}. "
            f"Launch with `accelerate launch --config_file {SAMPLES}ddp-cpu.yaml` (CPU) or `torchrun`."
        )
    if world.size == 1 and os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true":
        log.info(
            "Training in 1 process. For several CPU processes, accelerate needs its multi-CPU mode: "
            f"accelerate launch --config_file {SAMPLES}ddp-cpu.yaml --num_processes N -m edgeft tune ..."
        )
    return world


def _deepspeed_requested() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"


def requested_engine(world: World) -> str:
    """The engine the launch asked for. Accelerate turns FSDP and DeepSpeed on only for GPU processes
    and quietly runs DDP on CPUs: what was asked for, not what Accelerate made of it, is checked."""
    if _deepspeed_requested():
        return "deepspeed"
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "fsdp"
    return world.engine


def check_engine(world: World, cfg: TuneConfig, device: str) -> None:
    """Combinations that cannot work, refused before any weights load."""
    engine = requested_engine(world)
    if engine in ("fsdp", "deepspeed") and device != "cuda":
        name = "FSDP" if engine == "fsdp" else "DeepSpeed ZeRO"
        raise DeviceError(
            f"{name} trains on CUDA GPUs only (Accelerate would run plain DDP on CPU processes instead). "
            f"On CPUs launch DDP: accelerate launch --config_file {SAMPLES}ddp-cpu.yaml -m edgeft tune ..."
        )
    if cfg.method == "dora" and (engine == "fsdp" or (engine == "deepspeed" and world.sharded)):
        where = "FSDP" if engine == "fsdp" else "ZeRO-3"
        raise ConfigError(
            f"--method dora cannot run under {where}: DoRA needs each whole base weight's norm, which {where} "
            f"splits across GPUs. Use --method lora or qlora, or DDP ({SAMPLES}ddp-gpu.yaml) / ZeRO-2 for DoRA."
        )


def loss_scale(world: World, cfg: TuneConfig) -> float:
    """What a summed loss is multiplied by (after dividing by the global trained tokens) so that the
    gradient after the engine's reduction is the one-process gradient of the whole step.

    DDP and FSDP average gradients over processes (x world); DeepSpeed also divides by its own
    accumulation steps (x grad_accum).
    """
    return world.size * (cfg.grad_accum if world.engine == "deepspeed" else 1)
