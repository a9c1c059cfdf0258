"""Checkpoints: written whole by the main process, then pointed at; read back by every process.

A checkpoint holds the adapter, the optimizer and scheduler state and the loop state. Under FSDP
and ZeRO-3 the adapter and optimizer are gathered from every process first (collective calls:
every process takes part, only the main one writes).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from edgeft import artifacts
from edgeft.artifacts import Run
from edgeft.errors import EdgeftError
from edgeft.pipeline.tune.distributed import World
from edgeft.pipeline.tune.state import TrainState

CHECKPOINT_NAME = re.compile(r"step-\d{6,}")


def on_main(world: World, write) -> None:
    """Run `write` on the main process; if it fails there, every process stops with it."""
    error = None
    if world.is_main:
        try:
            write()
        except EdgeftError as e:
            error = e
    world.agree(error)


def full_state(world: World, model) -> dict | None:
    """The whole model's state dict gathered on the main process where it is sharded, else None
    (then the unwrapped model saves its own)."""
    return world.accelerator.get_state_dict(model) if world.sharded else None


def write_adapter(peft_model, folder: Path, state: dict | None, *, by_name: bool = False) -> None:
    """The adapter in peft's format. `by_name` (FSDP): its tensors picked from the gathered state by
    name, since peft (0.21) finds them by module names, which FSDP's wrappers change: it saved none
    (seen on an H100)."""
    if not by_name:
        peft_model.save_pretrained(folder, state_dict=state)
        return
    import copy

    from safetensors.torch import save_file

    name = peft_model.active_adapter
    tensors = {k.replace(f".{name}.", "."): v.contiguous() for k, v in state.items() if ".lora_" in k}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    config = copy.deepcopy(peft_model.peft_config[name])
    config.inference_mode = True  # as peft saves it
    config.save_pretrained(folder)


def _write_adapter(world: World, model, folder: Path, state: dict | None) -> None:
    write_adapter(world.accelerator.unwrap_model(model), folder, state, by_name=world.engine == "fsdp")


def save_adapter(target: Path, world: World, model, tokenizer=None, *, what: str = "adapter") -> None:
    state = full_state(world, model)

    def write():
        with artifacts.staged_dir(target, force=True, what=what) as tmp:
            _write_adapter(world, model, tmp, state)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)

    on_main(world, write)


def _optimizer_state(world: World, model, optimizer) -> dict | None:
    if world.engine == "fsdp":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        return FSDP.optim_state_dict(model, optimizer)
    if world.engine == "deepspeed":
        return None  # kept inside DeepSpeed's engine; such runs do not resume (see resume checks)
    return optimizer.state_dict()  # DDP: identical on every process


def save_checkpoint(run: Run, world: World, model, optimizer, scheduler, state: TrainState) -> Path:
    """Write a complete checkpoint, then point `latest` at it: a failed write never becomes latest."""
    target = run.checkpoints_dir / f"step-{state.step:06d}"
    adapter = full_state(world, model)
    optim = _optimizer_state(world, model, optimizer)

    def write():
        artifacts.check_free_space(run.path, _adapter_bytes(model) * 4 + 50_000_000, "writing a checkpoint")
        with artifacts.staged_dir(target, force=True, what="checkpoint") as tmp:
            _write_adapter(world, model, tmp / "adapter", adapter)
            torch.save({"optimizer": optim, "scheduler": scheduler.state_dict()}, tmp / "trainer.pt")
            artifacts.write_json_atomic(tmp / "state.json", state.to_dict())
        artifacts.write_json_atomic(
            run.checkpoints_dir / "latest.json", {"checkpoint": target.name, "step": state.step}
        )
        for old in sorted(run.checkpoints_dir.glob("step-*"))[:-2]:  # keep the last two
            shutil.rmtree(old, ignore_errors=True)

    on_main(world, write)
    return target


def latest_checkpoint(run: Run) -> Path | None:
    """The checkpoint `latest.json` points at: only ever a step-NNNNNN folder of this run's checkpoints."""
    pointer = run.checkpoints_dir / "latest.json"
    if not pointer.is_file():
        return None
    name = artifacts.read_json(pointer, "checkpoint pointer").get("checkpoint")
    if not isinstance(name, str) or not CHECKPOINT_NAME.fullmatch(name):
        raise artifacts.RunError(
            f"{pointer} does not name a checkpoint of this run (found {name!r}, expected step-NNNNNN). "
            f"Delete {run.checkpoints_dir} and start over with --force."
        )
    path = run.checkpoints_dir / name
    return path if (path / "state.json").is_file() else None


def read_trainer_state(path: Path) -> dict:
    """Tensors, numbers, strings and containers only: a checkpoint from a shared folder cannot run
    code. Read on the CPU, so a checkpoint written on a GPU resumes anywhere."""
    try:
        return torch.load(path / "trainer.pt", weights_only=True, map_location="cpu")
    except Exception as e:
        raise artifacts.RunError(
            f"{path / 'trainer.pt'} cannot be loaded as plain tensors and numbers ({str(e).splitlines()[0][:200]}). "
            "It is corrupt, or was written by an older edgeft. Start the run over with --force."
        ) from None


def load_adapter_weights(path: Path, model) -> None:
    """Before the engine wraps the model, so every process starts from the checkpoint's adapter."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(path / "adapter" / "adapter_model.safetensors"))


def load_trainer_state(path: Path, saved: dict, world: World, model, optimizer, scheduler) -> TrainState:
    """After the engine wrapped model and optimizer: their state as the checkpoint saved it."""
    optim = saved["optimizer"]
    if world.engine == "fsdp":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        optim = FSDP.optim_state_dict_to_load(model, optimizer, optim)
    optimizer.load_state_dict(optim)
    scheduler.load_state_dict(saved["scheduler"])
    return TrainState.from_dict(json.loads((path / "state.json").read_text()))


def _adapter_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
