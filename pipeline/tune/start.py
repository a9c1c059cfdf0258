"""Start a fine-tune or resume one: every check before any weights load, then the loop, then the
run's record. Each process of a multi-process launch runs this; only the main one writes."""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgeft import artifacts, models
from edgeft.artifacts import HELD_OUT, Run
from edgeft.chatdata import Example, Tokenized, load_dataset
from edgeft.config import load_config
from edgeft.errors import ConfigError, DataError
from edgeft.pipeline.config import TuneConfig
from edgeft.pipeline.data import MIN_FOR_SPLIT, DataReport, check_data, split_validation, write_examples
from edgeft.pipeline.tune import distributed
from edgeft.pipeline.tune.checkpoints import latest_checkpoint
from edgeft.pipeline.tune.distributed import LaunchError, World
from edgeft.pipeline.tune.loop import TrainingInterrupted, train
from edgeft.pipeline.tune.model import check_causal_lm, load_tokenizer, pick_device, resolve_precision
from edgeft.pipeline.tune.packing import Plan
from edgeft.pipeline.tune.progress import record_throughput
from edgeft.pipeline.tune.state import TrainState, read_metrics, summarise
from edgeft.trained import NF4_DOUBLE_QUANT, check_qlora

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    model: models.ResolvedModel
    tokenizer: object
    train: list[Tokenized]
    eval: list[Tokenized]
    report: DataReport
    eval_report: DataReport | None
    held_out: list[Example]  # the validation split of --data (empty with --eval-file or --val-split 0)
    preference: bool = False  # pairs of answers (DPO): train and eval hold chatdata.Pairs


def prepare_data(cfg: TuneConfig) -> Prepared:
    """Check the data before any model weights are loaded; refuse bad data with the full report."""
    if not cfg.data:
        raise DataError("no training data: pass --data FILE (JSONL or JSON; see `edgeft data check --help`).")
    dataset = load_dataset(cfg.data, cfg.format)  # format problems need no tokenizer: report them now
    if dataset.problems:
        raise DataError(_refusal(DataReport(dataset, [], None, dataset.problems), cfg))
    resolved = models.resolve_model(cfg.model)
    check_causal_lm(resolved.path)
    tokenizer = load_tokenizer(resolved.path)
    report = check_data(
        cfg.data, tokenizer, fmt=cfg.format, max_seq_len=cfg.max_seq_len, train_on_prompt=cfg.train_on_prompt
    )
    if not report.ok:
        raise DataError(_refusal(report, cfg))
    usable, eval_report, held_out = report.usable_examples, None, []
    if cfg.eval_file:
        eval_report = check_data(
            cfg.eval_file, tokenizer, fmt=cfg.format, max_seq_len=cfg.max_seq_len, train_on_prompt=cfg.train_on_prompt
        )
        if not eval_report.ok:
            raise DataError(_refusal(eval_report, cfg))
        evaluation = eval_report.usable
    else:
        usable, held = split_validation(usable, cfg.val_split, cfg.seed)
        held_out, evaluation = [e for e, _ in held], [t for _, t in held]
    cfg.resolve_epochs(validated=bool(evaluation))
    log.info("\n".join(report.lines(cfg.max_seq_len)))
    log.info(_validation_line(cfg, len(usable), len(held_out)))
    preference = report.dataset.format == "preference"
    if cfg.method == "dpo":  # OpenAI's name for preference tuning: DPO on QLoRA
        if not preference:
            raise DataError(
                f"--method dpo trains on preference data, and {cfg.data} is {report.dataset.format} data. Give pairs "
                "(OpenAI's preferred_output/non_preferred_output, or prompt/chosen/rejected), or pick --method qlora."
            )
        cfg.method = "qlora"
    if eval_report is not None and (eval_report.dataset.format == "preference") != preference:
        raise DataError(
            f"{cfg.data} is {report.dataset.format} data and {cfg.eval_file} is {eval_report.dataset.format} data: "
            "give the eval file in the same form as the training data."
        )
    return Prepared(resolved, tokenizer, [t for _, t in usable], evaluation, report, eval_report, held_out, preference)


def _start_from(cfg: TuneConfig, prepared: Prepared) -> Path:
    """--from RUN: a finished run on the same base model whose adapter has this run's shape."""
    run = Run.open(cfg.start_from)
    record = run.stage("tune") or {}
    if record.get("status") != "done" or not (run.adapter_dir / "adapter_model.safetensors").is_file():
        raise artifacts.RunError(
            f"--from {run.path}: that run has no finished adapter. Finish it first (edgeft tune --resume)."
        )
    if Path(run.base_model().path).resolve() != prepared.model.path.resolve():
        raise ConfigError(
            f"--from {run.path} was trained on {run.base_model().spec}, not {cfg.model}: start from a run on the same "
            "base model, or pass --model with its base model."
        )
    theirs = record.get("config") or {}
    for name in ("lora_r", "lora_alpha", "target_modules"):
        if theirs.get(name) != getattr(cfg, name):
            flag = "--" + name.replace("_", "-")
            raise ConfigError(
                f"--from {run.path} has {name} = {theirs.get(name)!r} and this run {getattr(cfg, name)!r}: its adapter "
                f"would not fit. Pass {flag} {theirs.get(name)}."
            )
    if (theirs.get("method") == "dora") != (cfg.method == "dora"):
        raise ConfigError(f"--from {run.path} was trained with --method {theirs.get('method')}: use the same method.")
    return run.path


def _validation_line(cfg: TuneConfig, trained: int, held: int) -> str:
    """What the run is checked on, in one line of the tune's output."""
    stopping = f"stopping early (--patience {cfg.patience}), " if cfg.patience else ""
    uses = (f"the eval loss, the best checkpoint, {stopping}" if cfg.eval_every >= 0 else "") + (
        "the merge's and export's checks"
    )
    if cfg.eval_file:
        return f"Validation: {cfg.eval_file} ({uses})."
    if held:
        return (
            f"Validation: {held} of {trained + held} examples held out (--val-split {cfg.val_split:g}) for {uses}; "
            "--val-split 0 trains on all."
        )
    why = "--val-split 0" if cfg.val_split <= 0 else f"fewer than {MIN_FOR_SPLIT} examples"
    return (
        f"Validation: none ({why}); the merge's and export's checks will use training prompts. "
        "Pass --eval-file for held-out data."
    )


def _refusal(report: DataReport, cfg: TuneConfig) -> str:
    return (
        "the data has problems, so training did not start.\n"
        + "\n".join(report.lines(cfg.max_seq_len))
        + (f"\nFix them and check again with: edgeft data check {report.dataset.path}")
    )


def default_output(cfg: TuneConfig) -> Path:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(cfg.data).stem) or "run"
    return Path("runs") / f"{name}-{cfg.method}"


# --- the launch ------------------------------------------------------------------------------


@dataclass
class Launch:
    world: World
    device: str
    precision: str


def launch(cfg: TuneConfig, prepared: Prepared) -> Launch:
    """Device, precision and the processes, checked on every process before any weights load."""
    device = pick_device(cfg)
    precision = resolve_precision(cfg.precision, device)
    world = distributed.start(device, precision, cfg)
    distributed.check_engine(world, cfg, device)
    rows = len(Plan([len(t.input_ids) for t in prepared.train], cfg).rows(0))
    if world.size > rows:
        raise LaunchError(
            f"{world.size} processes were launched, but the data packs into only {rows} row(s) of --batch-tokens "
            f"{cfg.batch_tokens} per epoch ({len(prepared.train)} examples): some processes would never train. "
            f"Launch at most {rows} processes, or lower --batch-tokens."
        )
    if cfg.method == "qlora":
        check_qlora(device)
    return Launch(world, device, precision)


def _create_run(output: Path, force: bool, cfg: TuneConfig, prepared: Prepared, at: Launch) -> Run:
    """The main process creates the run; every process must then see it (shared storage)."""
    world = at.world
    world.barrier()  # every process has checked `output` before the main one replaces it
    if world.is_main:
        # device and precision: merge needs them to rebuild the base exactly as training loaded it.
        tune_record = dict(
            status="running",
            config=cfg.to_dict(),
            data=_data_record(prepared),
            device=at.device,
            precision=at.precision,
            processes=world.size,
            engine=world.engine,
            nf4_double_quant=NF4_DOUBLE_QUANT,
        )
        base_model = {
            "spec": prepared.model.spec,
            "path": str(prepared.model.path.resolve()),
            "kind": prepared.model.kind,
        }
        run = Run.create(output, force=force, base_model=base_model, stages={"tune": tune_record})
        if prepared.held_out:
            write_examples(run.held_out_file, prepared.held_out)
    world.barrier()
    try:
        world.agree(_visibility_problem(output, world))
    except LaunchError:
        if world.is_main:
            shutil.rmtree(output, ignore_errors=True)  # nothing half-made is left behind
        raise
    return Run.open(output)


def _visibility_problem(output: Path, world: World) -> str | None:
    if Run.is_run(output):
        return None
    return (
        f"process {world.rank} cannot see the run directory {output} that the main process created. "
        "Put --output on storage every machine shares (a network file system), or train on one machine."
    )


def _held(run: Run, world: World, what: str):
    return run.lock(what) if world.is_main else contextlib.nullcontext()


# --- tune and resume ---------------------------------------------------------------------------


def tune(cfg: TuneConfig, *, force: bool = False, on_step: Callable[[dict], None] | None = None) -> Path:
    """Fine-tune `cfg.model` on `cfg.data`; returns the run directory."""
    distributed.quiet_unless_main()
    output = Path(cfg.output) if cfg.output else default_output(cfg)
    Run.check_new(output, force=force)
    prepared = prepare_data(cfg)
    if cfg.start_from:
        cfg.start_from = str(_start_from(cfg, prepared).resolve())
    at = launch(cfg, prepared)
    # Absolute paths, so the run can be resumed (and merged) from any working directory.
    cfg.output = str(output.resolve())
    cfg.data = str(Path(cfg.data).resolve())
    cfg.eval_file = str(Path(cfg.eval_file).resolve()) if cfg.eval_file else ""
    with _resumable_if_stopped(output, at.world):
        run = _create_run(output, force, cfg, prepared, at)
        with _held(run, at.world, "tune"):
            state = train(run, at.world, cfg, prepared, at.device, at.precision, resume_from=None, on_step=on_step)
    return _finish(run, at, cfg, prepared, state)


def resume(run_dir: str | Path, *, on_step: Callable[[dict], None] | None = None) -> Path:
    """Continue an interrupted run from its last checkpoint, with the same config and data order."""
    distributed.quiet_unless_main()
    run = Run.open(run_dir)
    record = run.stage("tune")
    if not record:
        raise artifacts.RunError(f"{run.path} has no tune stage to resume.")
    if record.get("status") == "done":
        raise artifacts.RunError(f"run {run.path} already finished training. Next: edgeft export {run.path} --int4")
    try:
        cfg = load_config(TuneConfig, None, dict(record.get("config") or {}))
    except (ConfigError, TypeError, ValueError) as e:
        raise ConfigError(
            f"the saved config in {run.manifest_path} cannot be used ({e}). Start the run over with --force."
        ) from None
    checkpoint = latest_checkpoint(run)  # None: stopped before its first checkpoint, so from step 0
    prepared = prepare_data(cfg)
    if prepared.report.dataset.sha256 != record["data"]["sha256"]:
        raise DataError(
            f"{cfg.data} changed since run {run.path} started, so the data order cannot be replayed. Start over with --force."
        )
    at = launch(cfg, prepared)
    _check_same_launch(run, record, at.world)
    if checkpoint is None:
        log.info(f"{run.path} stopped before its first checkpoint: training it from the start.")
    with _resumable_if_stopped(run.path, at.world):
        at.world.barrier()
        if at.world.is_main:
            run.record_stage("tune", status="running")
        with _held(run, at.world, "tune --resume"):
            state = train(
                run, at.world, cfg, prepared, at.device, at.precision, resume_from=checkpoint, on_step=on_step
            )
    return _finish(run, at, cfg, prepared, state)


@contextlib.contextmanager
def _resumable_if_stopped(output: Path, world: World):
    """Ctrl-C or SIGTERM outside the training loop (creating the run, loading the model; the loop
    handles its own): a run left "running" is recorded as interrupted, so `--resume` picks it up."""
    try:
        yield
    except KeyboardInterrupt:
        record = Run.open(output).stage("tune") if Run.is_run(output) else None
        if record is None:  # stopped before the run existed: nothing to resume
            raise TrainingInterrupted("stopped before the run was created; nothing was written.") from None
        if world.is_main and record.get("status") == "running":
            Run.open(output).record_stage("tune", status="interrupted")
        raise TrainingInterrupted(f"training was stopped. Resume with: edgeft tune --resume {output}") from None


def _check_same_launch(run: Run, record: dict, world: World) -> None:
    """A step is N x grad_accum rows: another number of processes would replay another run."""
    before = int(record.get("processes", 1))
    if before != world.size:
        how = (
            "run `edgeft tune --resume` in one process"
            if before == 1
            else f"launch {before} processes again (accelerate launch --num_processes {before} / torchrun --nproc_per_node {before})"
        )
        raise LaunchError(
            f"run {run.path} was trained with {before} process(es) and this launch has {world.size}: each step's "
            f"rows are shared out by process count, so resuming with another would train a different model. To resume, {how}."
        )
    if world.engine == "deepspeed":
        raise LaunchError(
            f"run {run.path} ran under DeepSpeed, whose optimizer state stays inside its engine: edgeft does not "
            "resume DeepSpeed runs. Start over with --force, or train with DDP/FSDP to be able to resume."
        )


def _data_record(p: Prepared) -> dict:
    s = p.report.stats
    record = {
        "path": str(p.report.dataset.path),
        "sha256": p.report.dataset.sha256,
        "format": p.report.dataset.format,
        "examples": s.examples,
        "train_examples": len(p.train),
        "eval_examples": len(p.eval),
        "tokens_per_epoch": sum(len(t.input_ids) for t in p.train),
        "trained_tokens": s.trained_tokens,
        "truncated": s.truncated,
    }
    if p.eval_report:
        record["eval_file"] = {"path": str(p.eval_report.dataset.path), "sha256": p.eval_report.dataset.sha256}
    if p.held_out:
        record["held_out"] = {"path": HELD_OUT, "examples": len(p.held_out)}
    return record


def _finish(run: Run, at: Launch, cfg: TuneConfig, prepared: Prepared, state: TrainState) -> Path:
    """The main process records the result; the others wait so none exits before it is written."""
    if at.world.is_main:
        from edgeft.plots import loss_curve

        metrics_path = run.logs_dir / "metrics.jsonl"
        metrics = summarise(state, metrics_path)
        metrics["peak_memory_mb"] = peak_memory_mb(at.device)
        loss_curve(
            read_metrics(metrics_path),
            run.logs_dir / "loss.png",
            title=f"{prepared.model.spec} {cfg.method} on {Path(cfg.data).name}",
        )
        run.record_stage(
            "tune",
            status="done",
            adapter=run.adapter_dir.name,
            metrics=metrics,
            finished_at=artifacts.now(),
        )
        if metrics["tokens_per_second"] and at.world.size == 1:
            record_throughput(prepared.model.spec, cfg.method, at.device, metrics["tokens_per_second"])
        shutil.rmtree(run.checkpoints_dir, ignore_errors=True)  # the run is complete: the adapter is the result
    at.world.barrier()
    return run.path


def peak_memory_mb(device: str) -> float:
    import torch

    if device == "cuda":
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return artifacts.peak_rss_mb()


# The last evaluation's loss below this share of the one before, and the best: the run ended while
# the model was still learning. Measured on the task suite's default runs (3 epochs), each of which
# kept its last step: the eval loss fell 25% to 43% over the last epoch on four tasks (intents, two
# seeds; tools; freetext; recipes), 1.3% on the multi-turn one.
STILL_FALLING = 0.9


def still_falling(run: Run, best_step: int | None) -> tuple[float, float] | None:
    """(the eval loss before, the last one) when the run ended on its best step, still falling fast."""
    evals = {
        r["step"]: r["eval_loss"]
        for r in read_metrics(run.logs_dir / "metrics.jsonl")
        if r.get("type") == "eval" and r.get("eval_loss") is not None
    }  # by step: a resumed run may have logged a step twice
    if len(evals) < 2:
        return None
    (_, before), (step, last) = sorted(evals.items())[-2:]
    return (before, last) if step == best_step and last < STILL_FALLING * before else None


def summary(run_dir: Path) -> list[str]:
    """What the user reads at the end of `edgeft tune`."""
    run = Run.open(run_dir)
    rec = run.stage("tune")
    m = rec["metrics"]
    processes = rec.get("processes", 1)
    where = f"{rec['device']} ({rec['precision']})" + (f", {processes} processes" if processes > 1 else "")
    lines = [
        (
            f"Fine-tuned {run.base_model().spec} with {rec['config']['method']} on {where} "
            f"in {m['train_seconds'] / 60:.1f} min: {m['steps']} steps, {m['train_tokens']:,} tokens "
            f"({m['tokens_per_second']} tokens/s)."
        ),
        f"  train loss  {m['train_loss']}",
    ]
    if m.get("eval_loss") is not None:
        lines.append(
            f"  eval loss   {m['eval_loss']} (perplexity {m['eval_ppl']}); best {m['best_eval_loss']} at step {m['best_step']}, kept"
        )
        if m.get("stopped_early"):
            cfg = rec["config"]
            lines.append(
                f"  stopped early: the eval loss did not fall for {cfg['patience']} evaluation(s) in a row "
                f"(--patience), so the rest of the {cfg['epochs']:g} epochs was skipped"
            )
        elif falling := still_falling(run, m["best_step"]):
            lines.append(
                f"  still learning: the eval loss fell {falling[0]:.4f} -> {falling[1]:.4f} between the last two "
                "evaluations; a longer run may do better (a higher --epochs: the best checkpoint is kept)"
            )
    if m.get("eval_reward_accuracy") is not None:
        lines.append(
            f"  preferences on held-out pairs: the preferred answer gained more in {m['eval_reward_accuracy']:.1%} "
            f"(reward margin {m['eval_reward_margin']:+.3f})"
        )
    if held := (rec.get("data") or {}).get("held_out"):
        lines.append(
            f"  validation  {held['examples']} examples held out of the training data ({run.path / held['path']})"
        )
    lines += [
        f"  adapter     {run.adapter_dir}",
        f"  loss curve  {run.logs_dir / 'loss.png'}",
        f"Next: edgeft export {run.path} --int4",
    ]
    return lines
