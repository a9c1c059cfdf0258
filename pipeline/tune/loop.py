"""The training loop: one readable function, with the step and the evaluation it calls beside it.

Every process runs this same code. Each trains on its share of every step's rows; the loss is the
sum over the step's trained tokens of all processes divided by their number, so after the engine
averages the gradients an N-process step equals a one-process step over the same rows. Only the
main process writes files; checkpoints are collective (see checkpoints.py).
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from pathlib import Path

import torch

from edgeft.artifacts import Run
from edgeft.chatdata import Tokenized
from edgeft.errors import EdgeftError
from edgeft.pipeline.config import TuneConfig
from edgeft.pipeline.tune import checkpoints
from edgeft.pipeline.tune.distributed import World, loss_scale
from edgeft.pipeline.tune.model import load_model, loss_head, summed_loss
from edgeft.pipeline.tune.packing import Plan, collate, pack
from edgeft.pipeline.tune.preference import Preference
from edgeft.pipeline.tune.progress import Progress, StopFlag
from edgeft.pipeline.tune.state import TrainState, append_metrics, summarise, truncate_metrics

log = logging.getLogger(__name__)


class TrainingInterrupted(EdgeftError):
    """Ctrl-C or SIGTERM: a checkpoint was written and the run can be resumed."""

    exit_code = 130


def train(run: Run, world: World, cfg: TuneConfig, prepared, device: str, precision: str, *, resume_from, on_step):
    """Train to the end (or to a Ctrl-C) and return the final TrainState; the best adapter is saved."""
    from transformers import get_scheduler

    accelerator = world.accelerator
    torch.manual_seed(cfg.seed)  # the same LoRA initialisation on every process
    random.seed(cfg.seed)
    # a run resumed from before NF4 scales were kept in fp32 goes on as it started
    double_quant = run.tune_record().nf4_double_quant
    model = load_model(prepared.model.path, cfg, device, precision, sharded=world.sharded, double_quant=double_quant)
    head = loss_head(model)
    saved = None
    if resume_from:
        checkpoints.load_adapter_weights(resume_from, model)
        saved = checkpoints.read_trainer_state(resume_from)
    elif cfg.start_from:  # --from RUN: its adapter is where this one starts
        checkpoints.load_adapter_weights(Path(cfg.start_from), model)
    preference = Preference(run, world, cfg, prepared) if prepared.preference else None
    if preference:  # DPO: the reference is the model as it starts
        preference.prepare_reference(model, head, resumed=resume_from is not None)
    step_fn = preference.step if preference else train_step
    eval_fn = preference.evaluate if preference else eval_loss
    plan = Plan([len(t.input_ids) for t in prepared.train], cfg, world.size)

    def schedule(optimizer):
        warmup = round(plan.total * cfg.warmup_ratio)
        return get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=plan.total)

    def adamw(params):
        return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)

    if world.engine == "deepspeed":  # DeepSpeed builds its engine from all three at once
        # It sizes its batches from a dataloader, which the loop does not use: one packed row per micro-step.
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = 1
        optimizer = adamw([p for p in model.parameters() if p.requires_grad])
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, schedule(optimizer))
    else:  # FSDP needs the optimizer made over the wrapped model's parameters
        if world.engine == "fsdp":
            # Each LoRA layer its own unit beside each decoder layer: FSDP cannot flatten trainable
            # and frozen weights together without use_orig_params, which 4-bit weights break.
            from peft.utils.other import fsdp_auto_wrap_policy

            accelerator.state.fsdp_plugin.auto_wrap_policy = fsdp_auto_wrap_policy(model)
        model = accelerator.prepare(model)
        optimizer = adamw([p for p in model.parameters() if p.requires_grad])
        scheduler = schedule(optimizer)
        optimizer = accelerator.prepare(optimizer)

    state = TrainState()
    metrics_path = run.logs_dir / "metrics.jsonl"
    if resume_from:
        state = checkpoints.load_trainer_state(resume_from, saved, world, model, optimizer, scheduler)
        log.info(f"Resuming {run.path} from {resume_from.name} (step {state.step}/{plan.total}).")
    if world.is_main:
        run.logs_dir.mkdir(parents=True, exist_ok=True)
        if resume_from:
            truncate_metrics(metrics_path, state.step)
        elif metrics_path.exists():
            metrics_path.unlink()

    def save_best():
        checkpoints.save_adapter(run.adapter_dir, world, model, prepared.tokenizer)

    evaluating = bool(prepared.eval) and cfg.eval_every >= 0

    def evaluate() -> None:
        if not evaluating or state.last_eval_step == state.step:
            return
        state.last_eval_step = state.step
        loss, extra = eval_fn(model, head, world, prepared.eval, cfg.batch_tokens)
        entry = {"type": "eval", "step": state.step, "epoch": state.epoch, "eval_loss": loss, **extra}
        entry["eval_ppl"] = math.exp(min(loss, 50))
        if world.is_main:
            append_metrics(metrics_path, entry)
        if state.best_eval_loss is None or loss < state.best_eval_loss:
            state.best_eval_loss, state.best_step, state.evals_since_best = loss, state.step, 0
            save_best()
        else:
            state.evals_since_best += 1
        # --patience: the eval loss stopped falling; the best checkpoint is already saved
        state.stopped_early = bool(cfg.patience) and state.evals_since_best >= cfg.patience and state.step < plan.total
        if world.is_main:
            if "eval_reward_accuracy" in extra:  # preference pairs: a DPO loss has no perplexity to speak of
                measure = (
                    f"the preferred answer gained more in {extra['eval_reward_accuracy']:.0%} of pairs "
                    f"(reward margin {extra['eval_reward_margin']:+.3f})"
                )
            else:
                measure = f"perplexity {entry['eval_ppl']:.2f}"
            log.info(f"eval at step {state.step}: loss {loss:.4f}, {measure}")

    scale = loss_scale(world, cfg)
    bar = Progress(plan.total, state.step, enabled=world.is_main)
    window = []  # (tokens, seconds) of recent steps, for a steady tokens/s
    with StopFlag() as stop:
        model.train()
        for epoch in range(state.epoch, plan.epochs):
            steps = plan.steps(epoch)[: plan.steps_per_epoch[epoch]]
            start = state.next if epoch == state.epoch else 0
            state.epoch = epoch
            for index in range(start, len(steps)):
                if state.step >= plan.total:
                    break
                # Seeded by step and process: dropout masks replay exactly on resume.
                torch.manual_seed(cfg.seed * 1_000_003 + state.step * world.size + world.rank)
                t0 = time.perf_counter()
                loss_sum, tokens, trained, extra = step_fn(
                    model, head, world, cfg, plan.share(steps[index], world.rank), prepared.train, scale
                )
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                elapsed = time.perf_counter() - t0
                loss_sum, tokens = world.sum(loss_sum, tokens)
                state.step, state.next = state.step + 1, index + 1
                state.tokens += int(tokens)
                state.seconds += elapsed
                window = (window + [(tokens, elapsed)])[-20:]
                entry = {
                    "type": "train",
                    "step": state.step,
                    "epoch": epoch + (index + 1) / len(steps),
                    "loss": loss_sum / max(trained, 1),
                    "lr": scheduler.get_last_lr()[0],
                    "tokens": int(tokens),
                    "tokens_per_second": sum(t for t, _ in window) / sum(s for _, s in window),
                    **extra,
                }
                if world.is_main:
                    append_metrics(metrics_path, entry)
                bar.update(epoch, entry)
                if on_step:
                    on_step(entry)
                if cfg.eval_every > 0 and state.step % cfg.eval_every == 0:
                    evaluate()
                    if state.stopped_early:
                        break
                stops = world.sum(float(stop.requested))[0]  # a signal to any process stops them all here
                if state.step % cfg.save_every == 0 or stops:
                    checkpoints.save_checkpoint(run, world, model, optimizer, scheduler, state)
                if stops:
                    bar.close()
                    if world.is_main:
                        run.record_stage("tune", status="interrupted", metrics=summarise(state, metrics_path))
                    raise TrainingInterrupted(
                        f"training stopped at step {state.step}/{plan.total}; checkpoint saved. "
                        f"Resume with: edgeft tune --resume {run.path}"
                        + (" (launched the same way, with the same number of processes)" if world.size > 1 else "")
                    )
            if state.stopped_early:
                break
            state.next = len(steps)
            evaluate()  # each epoch, and at the end
            state.epoch, state.next = epoch + 1, 0
            if state.step >= plan.total or state.stopped_early:
                break
    bar.close()
    if not evaluating:
        save_best()
    return state


def train_step(model, head, world: World, cfg: TuneConfig, share, examples: list[Tokenized], scale: float):
    """Forward and backward over this process's rows of one step; the caller steps the optimizer.

    Returns this process's summed loss and token count, and the step's trained tokens over all
    processes (the loss's denominator). A None row (the last step ran short) runs a zero-weight
    pass on the step's first row of this process or the step, so every process runs as many passes.
    """
    accelerator, device = world.accelerator, world.accelerator.device
    stand_in = next(row for row in share if row is not None) if any(share) else None
    batches = [(collate([examples[i] for i in (row or stand_in or [])], device), row is not None) for row in share]
    local = sum(len(b["targets"]) for b, real in batches if real)
    trained = world.sum(local)[0]
    total, tokens = 0.0, 0
    for n, (batch, real) in enumerate(batches):
        sync = contextlib.nullcontext() if n == len(batches) - 1 else accelerator.no_sync(model)
        with sync:
            with accelerator.autocast():
                loss = summed_loss(model, head, batch)
            weight = scale / max(trained, 1) if real else 0.0
            accelerator.backward(loss * weight)
        if real:
            total += loss.item()
            tokens += batch["tokens"]
    if cfg.max_grad_norm:
        # All parameters: under FSDP Accelerate clips through the wrapped model only when given them all.
        accelerator.clip_grad_norm_(list(model.parameters()), cfg.max_grad_norm)
    return total, tokens, trained, {}


def eval_loss(model, head, world: World, examples: list[Tokenized], batch_tokens: int) -> tuple[float, dict]:
    """Mean loss per trained token over `examples` (same masking as training), rows shared out
    across processes; every process runs as many passes (FSDP gathers weights in each)."""
    device = world.accelerator.device
    rows = pack([len(t.input_ids) for t in examples], list(range(len(examples))), batch_tokens)
    passes = math.ceil(len(rows) / world.size)
    mine = rows[world.rank :: world.size]
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for n in range(passes):
            real = n < len(mine)
            batch = collate([examples[i] for i in (mine[n] if real else rows[0])], device)
            with world.accelerator.autocast():
                loss = summed_loss(model, head, batch)
            if real:
                total += loss.item()
                count += len(batch["targets"])
    model.train()
    total, count = world.sum(total, count)
    return total / max(count, 1), {}
