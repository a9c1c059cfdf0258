"""The `edgeft` command. Each command parses options, calls one library function, prints the result.

Heavy libraries (torch, transformers, onnxruntime) are imported inside the library functions, so
`edgeft --help` answers instantly.
"""

from __future__ import annotations

import logging
import signal
import sys
import traceback
from pathlib import Path

import click

from edgeft import __version__
from edgeft.errors import ConfigError, EdgeftError
from edgeft.evaluate import BASE_SAMPLE  # a light module: torch is imported where a row runs
from edgeft.export.options import ExportConfig  # light dataclasses: the options are built from them
from edgeft.extras import require_extra
from edgeft.pipeline.config import TuneConfig

log = logging.getLogger("edgeft")


class EdgeftGroup(click.Group):
    """Turns our own exceptions into one clean line and a non-zero exit; -v shows the traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except EdgeftError as e:
            if ctx.find_root().params.get("verbose"):
                _print_traceback(e)
            click.secho(f"Error: {e}", err=True, fg="red")
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            _interrupted()


def _print_traceback(error: BaseException) -> None:
    """The traceback -v promises, with what caused the error: the library raises its messages
    `from None` to keep the one line clean, and that hides the original exception (still kept as
    __context__) from a plain traceback."""
    chained, seen = error, set()
    while chained is not None and id(chained) not in seen:
        seen.add(id(chained))
        chained.__suppress_context__ = False
        chained = chained.__cause__ or chained.__context__
    traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False


@click.group(cls=EdgeftGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="edgeft")
@click.option("-v", "--verbose", is_flag=True, help="Show debug logs and full tracebacks.")
def cli(verbose: bool) -> None:
    """Fine-tune a small language model on your own chat data and run it on CPU with ONNX Runtime.

    \b
    The whole path, on the built-in model and the bundled recipe sample:
      edgeft quickstart
    Step by step:
      edgeft data check samples/recipes/train.jsonl     check your data
      edgeft tune --model smollm2-135m --data FILE      QLoRA fine-tune -> runs/NAME
      edgeft merge runs/NAME                            fold the adapter into the base
      edgeft export runs/NAME --int4                    ONNX int4, verified against the trained model
      edgeft chat runs/NAME                             chat in the terminal
      edgeft serve runs/NAME                            OpenAI-compatible server + web page
    """
    _setup_logging(verbose)


# --- quickstart ---------------------------------------------------------------------------


@cli.command()
@click.option("--output", default="runs/quickstart", show_default=True, help="Run directory.")
@click.option("--max-steps", default=0, show_default=True, help="Cap the fine-tune at N steps (0 = one full epoch).")
@click.option("--limit", default=0, show_default=True, help="Evaluate on the first N held-out examples (0 = all).")
@click.option("--shots", default=3, show_default=True, help="Examples in the prompt for the few-shot baseline.")
@click.option(
    "--rag", default=3, show_default=True, help="Retrieved examples (BM25) in the prompt for the retrieval baseline."
)
@click.option("--bench-runs", default=3, show_default=True, help="Repetitions of the speed benchmark.")
@click.option("--force", is_flag=True, help="Redo every stage instead of reusing finished ones.")
@click.option(
    "--allow-drift",
    is_flag=True,
    help="Go on when the merged or int4 model fails the fidelity gate (a few-step fine-tune does); the report says so.",
)
def quickstart(
    output: str, max_steps: int, limit: int, shots: int, rag: int, bench_runs: int, force: bool, allow_drift: bool
) -> None:
    """The whole path on the built-in model and the recipe sample, with a report (about 16 min on 2 AVX-512 cores, 19 on AVX2).

    \b
    fine-tune (QLoRA) -> merge -> export int4 -> evaluate (base zero-shot, base few-shot, base with
    retrieved examples, the model as trained, fine-tuned ONNX int4 free and constrained to the
    answers' JSON schema) -> speed benchmark -> RUN/report.md
    Merge and export are checked against the model as trained; a drift stops the quickstart.
    Running it again reuses finished stages and resumes an interrupted fine-tune.
    """
    require_extra("quickstart", "export")
    from edgeft.quickstart import QuickstartConfig
    from edgeft.quickstart import quickstart as run_quickstart

    report = run_quickstart(
        QuickstartConfig(
            output=output,
            max_steps=max_steps,
            limit=limit,
            shots=shots,
            rag=rag,
            bench_runs=bench_runs,
            allow_drift=allow_drift,
        ),
        force=force,
    )
    click.echo(f"\nReport: {report}")
    click.echo(f"Chat with your fine-tuned model:  edgeft chat {output}")
    click.echo(f"Serve it (API + web page):        edgeft serve {output}")


# --- doctor & models ----------------------------------------------------------------------


@cli.command()
def doctor() -> None:
    """Check this machine: package versions, CUDA, bitsandbytes 4-bit, ONNX Runtime, disk, cache."""
    from edgeft.doctor import doctor as run_doctor

    marks = {True: click.style("ok", fg="green"), False: click.style("!!", fg="red"), None: "  "}
    checks = run_doctor()
    width = max(len(c.name) for c in checks)
    for c in checks:
        click.echo(f"{marks[c.ok]}  {c.name:<{width}}  {c.value}")
    if any(c.ok is False for c in checks):
        sys.exit(1)


@cli.group()
def models() -> None:
    """Built-in and cached base models."""


@models.command("list")
@click.option(
    "--verify",
    is_flag=True,
    help="Hash every file again (slow); by default a file is hashed when its size or time changed.",
)
def models_list(verify: bool) -> None:
    """Show built-in and cached models with their status, size and path."""
    from edgeft import artifacts
    from edgeft.models import list_models

    rows = list_models(verify=verify)
    width = max(len(r.name) for r in rows)
    for r in rows:
        kind = "built-in" if r.builtin else "cached"
        size = artifacts.human_size(r.size) if r.size else "-"
        click.echo(f"{r.name:<{width}}  {kind:<8}  {r.status:<14}  {size:>9}  {r.path}")
        if r.description:
            click.echo(f"{'':<{width}}  {r.description}")


@models.command("pull")
@click.argument("name")
@click.option("--force", is_flag=True, help="Fetch and convert again even if the cache looks fine.")
def models_pull(name: str, force: bool) -> None:
    """Fetch a built-in model into the cache ($EDGEFT_HOME, default ~/.cache/edgeft)."""
    from edgeft.models import ensure_builtin

    click.echo(ensure_builtin(name, force=force))


@models.command("rm")
@click.argument("name")
def models_rm(name: str) -> None:
    """Delete a model from the cache."""
    from edgeft.models import remove_model

    click.echo(f"removed {remove_model(name)}")


# --- data & tune --------------------------------------------------------------------------


def config_options(cls, skip: tuple[str, ...] = ()):
    """Click options generated from a config dataclass: one source for names, defaults and help."""
    from dataclasses import MISSING, fields

    def decorate(func):
        for f in reversed(fields(cls)):
            if f.name in skip:
                continue
            flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
            default = f.default if f.default is not MISSING else None
            if f.type == "bool":
                func = click.option(f"{flag}/--no-{flag[2:]}", f.name, default=default, help=f.metadata["help"])(func)
                continue
            choices = f.metadata.get("choices")
            kind = click.Choice(choices) if choices else {"int": int, "float": float, "str": str}[f.type]
            func = click.option(
                flag,
                f.name,
                type=kind,
                default=default,
                show_default=default not in ("", None),
                help=f.metadata["help"],
            )(func)
        return func

    return decorate


def explicit(ctx: click.Context, params: dict) -> dict:
    """Only the options the user actually typed, so they override a config file but defaults do not."""
    from click.core import ParameterSource

    return {k: v for k, v in params.items() if ctx.get_parameter_source(k) not in (ParameterSource.DEFAULT, None)}


@cli.group()
def data() -> None:
    """Check training data before you train."""


@data.command("check")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option(
    "--model", default="smollm2-135m", show_default=True, help="Model whose tokenizer and chat template to use."
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["auto", "chat", "alpaca", "completion", "text", "preference"]),
    default="auto",
    show_default=True,
)
@click.option(
    "--max-seq-len",
    type=int,
    default=1024,
    show_default=True,
    help="Report examples longer than this (tune truncates them).",
)
@click.option("--train-on-prompt", is_flag=True, help="Count prompt tokens as trained too.")
@click.option(
    "--method",
    type=click.Choice(["qlora", "lora", "dora"]),
    default="qlora",
    show_default=True,
    help="For the time estimate.",
)
@click.option(
    "--epochs",
    type=float,
    default=0.0,
    show_default=True,
    help="For the time estimate; 0 = what `tune` runs by default (up to 5 from 100 examples, else 3).",
)
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="For the time estimate.",
)
def data_check(file, model, fmt, max_seq_len, train_on_prompt, method, epochs, device) -> None:
    """Check a data file the way OpenAI's fine-tuning data preparation does, then count tokens.

    \b
    Formats (detected from the keys; --format forces one):
      chat        {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "...", "weight": 1}]}
                  OpenAI's format in full: "tools" on the example, assistant "tool_calls", "tool" messages
      alpaca      {"instruction": "...", "input": "...", "output": "..."}
      completion  {"prompt": "...", "completion": "..."}
      text        {"text": "..."}
    Prints one example as the model sees it, its trained text marked. Exits with status 1 if any
    example has a problem.
    """
    require_extra("data check", "train")
    from edgeft.chatdata import load_dataset
    from edgeft.models import resolve_model
    from edgeft.pipeline.data import check_data
    from edgeft.pipeline.tune import estimate_seconds, load_tokenizer, pick_device_name

    dataset = load_dataset(file, fmt)
    if dataset.problems:  # no need to fetch a tokenizer to report these
        from edgeft.pipeline.data import DataReport

        report = DataReport(dataset, [], None, dataset.problems)
    else:
        resolved = resolve_model(model)
        report = check_data(
            file, load_tokenizer(resolved.path), fmt=fmt, max_seq_len=max_seq_len, train_on_prompt=train_on_prompt
        )
    for line in report.lines(max_seq_len):
        click.echo(line)
    if not report.ok:
        sys.exit(1)
    dev = pick_device_name(device)
    label = f"{epochs:g} epoch(s)"
    if not epochs:  # tune's default: its held-out split from MIN_FOR_SPLIT examples, and then early stopping
        from edgeft.pipeline.config import TuneConfig
        from edgeft.pipeline.data import MIN_FOR_SPLIT

        split = report.stats.examples >= MIN_FOR_SPLIT
        epochs = TuneConfig().auto_epochs(validated=split)
        label = f"up to {epochs:g} epochs" if split else f"{epochs:g} epochs"
    tokens = report.stats.tokens_per_epoch * epochs
    seconds, basis = estimate_seconds(model, resolved.path, method, dev, int(tokens))
    click.echo(f"  {label:<20}{int(tokens):,} tokens, about {_duration(seconds)} with {method} on {dev} ({basis})")
    click.echo("No problems found.")


def _duration(seconds: float) -> str:
    from edgeft.progress import duration

    return duration(seconds) if seconds < 5400 else f"{seconds / 3600:.1f} h"


@cli.command()
@click.option(
    "--config", "config_file", type=click.Path(dir_okay=False), help="TOML file with settings (flags override it)."
)
@click.option(
    "--resume",
    "resume_dir",
    type=click.Path(file_okay=False),
    help="Continue an interrupted run from its last checkpoint.",
)
@click.option("--force", is_flag=True, help="Replace an existing run directory.")
@click.option(
    "--int4-base",
    is_flag=True,
    help="Train against the int4 weights you deploy: --model is exported to int4 first (once), LoRA learns on "
    "those weights, and `edgeft export RUN` ships that export + the adapter, so nothing is rounded after training "
    "(decodes slower than a merged export). Also: --model EXPORT_FOLDER. See docs/adapters.md.",
)
@config_options(TuneConfig)
@click.pass_context
def tune(ctx: click.Context, config_file, resume_dir, force, int4_base, **options) -> None:
    """Fine-tune a model on your chat data with QLoRA (default), LoRA or DoRA.

    \b
    Examples:
      edgeft tune --data samples/recipes/train.jsonl --eval-file samples/recipes/eval.jsonl
      edgeft tune --model ./my-hf-model --data chats.jsonl --method lora --epochs 2 --output runs/support
      edgeft tune --config samples/recipes/tune.toml
      edgeft tune --resume runs/support          # after Ctrl-C: same optimizer, schedule and data order
    Only assistant turns (and the token that ends them) are trained unless --train-on-prompt.
    """
    require_extra("tune", "train")
    from edgeft.config import load_config
    from edgeft.pipeline import tune as tuning

    if resume_dir:
        run_dir = tuning.resume(resume_dir)
    else:
        given = explicit(ctx, options)
        cfg = load_config(TuneConfig, config_file, given)
        if int4_base or Path(cfg.model).expanduser().is_dir():
            _train_on_export(cfg, method_given="method" in given, int4_base=int4_base)
        run_dir = tuning.tune(cfg, force=force)
    if tuning.launcher_rank() == 0:  # under accelerate launch / torchrun the main process reports
        for line in tuning.summary(run_dir):
            click.echo(line)


def _train_on_export(cfg: TuneConfig, *, method_given: bool, int4_base: bool) -> None:
    """--model EXPORT (or --int4-base: the model's int4 export, made here): train an adapter against
    the export's own int4 (or int8) weights, in full precision (LoRA) and never merged: `edgeft export
    RUN` then gives the adapter for that export."""
    export = Path(cfg.model).expanduser()
    if not int4_base and not (export / "edgeft-export.json").is_file():
        return
    require_extra("tune --int4-base" if int4_base else "tune --model EXPORT", "export")
    if cfg.method in ("qlora", "dpo") and method_given:
        raise ConfigError(
            f"--method {cfg.method} would round the weights of {cfg.model}'s int4 export again, to NF4: an export's "
            "weights train as they are with --method lora (the default here; DPO too, on preference data) or dora."
        )
    from edgeft.export.dequantize import int4_export_of, is_export, training_base

    if not is_export(export):  # --int4-base on a model: its int4 export, made once
        export = int4_export_of(cfg.model)
    if cfg.method == "qlora":
        cfg.method = "lora"
    log.info(f"Training against the weights of the export {export} (--method {cfg.method}, never merged).")
    cfg.model = str(training_base(export))


# --- merge & export -----------------------------------------------------------------------


@cli.command()
@click.argument("run", type=click.Path(file_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Merge again even if RUN/merged exists.")
@click.option(
    "--base-weights",
    type=click.Choice(["as-trained", "original"]),
    default="as-trained",
    show_default=True,
    help="as-trained = the base exactly as training saw it (for QLoRA: the dequantized NF4 weights, kept in fp32); "
    "original = the unquantized base (a different model for QLoRA: needs --allow-drift if it drifts).",
)
@click.option(
    "--allow-drift",
    is_flag=True,
    help="Keep a merged model that fails the fidelity check against the model as trained.",
)
def merge(run: Path, force: bool, base_weights: str, allow_drift: bool) -> None:
    """Fold a run's adapter into its base model as trained (RUN/merged), then check it against the model as trained.

    \b
    The check compares the merged model with the base as trained + adapter (bitsandbytes NF4 for
    QLoRA) on the run's held-out data; outside the gate the command fails (exit 3) unless --allow-drift.
    """
    require_extra("merge", "train")
    from edgeft import artifacts
    from edgeft.artifacts import Run
    from edgeft.fidelity import table
    from edgeft.pipeline.merge import merge as merge_run

    out = merge_run(run, force=force, base_weights=base_weights, allow_drift=allow_drift)
    click.echo(f"Merged model: {out} ({artifacts.human_size(artifacts.dir_size(out))})")
    click.echo("Checked against the model as trained:")
    for line in table(Run.open(run).stage("merge")["fidelity"]):
        click.echo(line)
    click.echo(f"Next: edgeft export {run} --int4")


@cli.command()
@click.argument("target")
@click.option(
    "--int4", "precision", flag_value="int4", default=True, help="4-bit weights (default; recommended for CPU)."
)
@click.option("--int8", "precision", flag_value="int8", help="8-bit weights.")
@click.option("--fp32", "precision", flag_value="fp32", help="Full precision (a reference; large and slower).")
@click.option("--force", is_flag=True, help="Replace an existing export.")
@config_options(ExportConfig, skip=("precision",))
@click.pass_context
def export(ctx: click.Context, target: str, precision: str, force: bool, **options) -> None:
    """Export a run (or a base model) to ONNX for onnxruntime-genai, quantized, verified against the model as trained.

    \b
    TARGET is a run directory (merged first if needed) or a model: built-in name, HF folder, .gguf.
    For a run the reference is the model as trained (base as training loaded it + adapter); an export
    outside the fidelity gate is kept on disk but the command fails (exit 3) unless --allow-drift.
    Examples:
      edgeft export runs/recipes --int4
      edgeft export runs/recipes --int4 --backend optimum      # also loads in Optimum's ORTModelForCausalLM
      edgeft export smollm2-135m --int4 --output smollm2-int4  # the base model, no fine-tuning
      edgeft export runs/recipes --as-adapter  # a small adapter for a base shared by many runs
    A run trained on an export's weights (edgeft tune --model EXPORT) exports its adapter for that
    export by default: a merged int4 export would round the trained weights again.
    """
    require_extra("export", "export")
    from edgeft import artifacts
    from edgeft.artifacts import Run
    from edgeft.export.onnx import export as run_export
    from edgeft.fidelity import table

    cfg = ExportConfig(precision=precision, **options)
    if not cfg.as_adapter and "precision" not in explicit(ctx, {"precision": precision}):
        cfg.as_adapter = _trained_on_export(Path(target))
    if cfg.as_adapter:
        from edgeft.export.adapters import export as export_adapter

        _report_adapter(export_adapter(target, cfg, force=force))
        return
    if Run.is_run(Path(target)) and not Run.open(Path(target)).has_merged():
        from edgeft.pipeline.merge import merge as merge_run

        log.info(f"{target} has no merged model yet: merging first.")
        merge_run(target, force=True, allow_drift=cfg.allow_drift)
    out = run_export(target, cfg, force=force)
    info = artifacts.read_json(out / "edgeft-export.json", "export record")
    size, merged = info["size_bytes"], info["merged_size_bytes"]
    click.echo(f"Exported {info['precision']} ({info['backend']} backend) in {info['seconds']:.0f} s: {out}")
    click.echo(
        f"  size                   {artifacts.human_size(size)} ({size / merged:.0%} of the merged model's {artifacts.human_size(merged)})"
    )
    if info["verification"]:
        click.echo("Verification against the model as trained:")
        for line in table(info["verification"]):
            click.echo(line)
    click.echo(f"Chat with it: edgeft chat {out}")


def _trained_on_export(target: Path) -> bool:
    """A run trained against an export's weights (`edgeft tune --model EXPORT`)?"""
    from edgeft.artifacts import Run
    from edgeft.export.dequantize import source_export

    if not Run.is_run(target) or (export := source_export(Run.open(target).base_model().path)) is None:
        return False
    log.info(
        f"{target} was trained against the weights of {export}: exporting its adapter for that export (as "
        "--as-adapter does). For a merged export, which rounds the trained weights again, pass --int4."
    )
    return True


def _report_adapter(out: Path) -> None:
    from edgeft import artifacts
    from edgeft.fidelity import table

    info = artifacts.read_json(out / "edgeft-export.json", "export record")
    click.echo(f"Exported the adapter in {info['seconds']:.0f} s: {out}")
    click.echo(f"  adapter                {artifacts.human_size(info['size_bytes'])}")
    click.echo(f"  base (shared)          {artifacts.human_size(info['base_size_bytes'])}  {info['base']}")
    if info["verification"]:
        click.echo("Verification of base + adapter against the model as trained:")
        for line in table(info["verification"]):
            click.echo(line)
    click.echo(f"Chat with it: edgeft chat {info['base']} --adapter {out}")


# --- eval ---------------------------------------------------------------------------------


@cli.command("eval")
@click.argument("models", nargs=-1, required=True)
@click.option(
    "--data",
    type=click.Path(dir_okay=False),
    help="Held-out chat data; the last assistant message is the reference.  "
    "[default: the run's --eval-file, else the validation split it held out]",
)
@click.option(
    "--shots",
    default=0,
    show_default=True,
    help="Also evaluate each base model with K training examples in the prompt.",
)
@click.option(
    "--rag",
    default=0,
    show_default=True,
    metavar="K",
    help="Also evaluate each base model with the K training examples most like each prompt (BM25) in its prompt.",
)
@click.option(
    "--shots-file",
    type=click.Path(dir_okay=False),
    help="Where the shots and retrieved examples come from (default: the run's training data).",
)
@click.option("--limit", type=int, help="Evaluate only the first N examples (quick checks).")
@click.option(
    "--max-tokens",
    type=click.IntRange(min=1),
    help="New tokens per answer.  [default: the longest reference in the model's tokens, and 8]",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    help="Prompts per batch for PyTorch models.  [default: as many as fit 1 GiB of KV cache, at most 32]",
)
@click.option(
    "--json-schema",
    metavar="FILE|auto",
    help="Also evaluate each fine-tuned ONNX export with its answers constrained to this JSON Schema "
    "(auto: inferred from the references).",
)
@click.option(
    "--base-sample",
    default=BASE_SAMPLE,
    show_default=True,
    metavar="N",
    type=click.IntRange(min=0),
    help="A base row first answers N examples drawn at random and stops there when none matches exactly "
    "(the table gives the 95% upper bound of its exact match); 0 answers every example.",
)
@click.option(
    "--merged/--no-merged",
    default=True,
    show_default=True,
    help="A run's merged PyTorch model gets its own row (--no-merged saves its time: the merge already "
    "checked it against the model as trained).",
)
@click.option(
    "--output",
    type=click.Path(dir_okay=False),
    help="JSON report path.  [default: RUN/logs/eval.json or ./edgeft-eval.json]",
)
def eval_cmd(
    models, data, shots, rag, shots_file, limit, max_tokens, batch_size, json_schema, base_sample, merged, output
) -> None:
    """Compare models on held-out data: base, base with examples in the prompt, fine-tuned, exported.

    \b
    MODELS are any mix of a built-in name or HF folder (base model), a run (its merged model, or base +
    adapter), a merged folder, an ONNX export folder, and a runtime adapter's folder (RUN/onnx-adapter:
    its shared base answering with it). Example:
      edgeft eval smollm2-135m runs/recipes runs/recipes/onnx-int4 --data samples/recipes/eval.jsonl --shots 3 --rag 3
    Metrics: exact match (JSON compared parsed), token F1, JSON validity, perplexity of the reference,
    answers that stop on their own, latency.
    """
    if rag or not all((Path(m) / "genai_config.json").is_file() for m in models):
        require_extra("eval", "train")  # ONNX exports alone are evaluated by the base install's runtime
    from edgeft.evaluate import evaluate, table

    report = evaluate(
        list(models),
        data,
        shots=shots,
        rag=rag,
        shots_file=shots_file,
        limit=limit,
        max_tokens=max_tokens,
        batch_size=batch_size,
        output=output,
        json_schema=json_schema,
        merged=merged,
        base_sample=base_sample,
    )
    click.echo(f"{report['samples']} examples from {report['data']}, greedy, up to {report['max_tokens']} new tokens:")
    for line in table(report):
        click.echo(line)
    click.echo(f"Report: {report['path']}")


# --- bench --------------------------------------------------------------------------------


@cli.command()
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--compare", is_flag=True, help="Also measure PyTorch, Optimum's ORTModelForCausalLM and llama.cpp (if installed)."
)
@click.option("--runs", default=3, show_default=True, help="Repetitions; the median and the spread are reported.")
@click.option("--threads", default=0, show_default=True, help="Threads for every engine (0 = all cores).")
@click.option("--decode-tokens", default=128, show_default=True, help="Tokens generated for the decode speed.")
@click.option(
    "--gguf", type=click.Path(exists=True, dir_okay=False), help="GGUF for llama.cpp (default: the base model's)."
)
@click.option("--output", type=click.Path(file_okay=False), help="Where bench.json/.md/.png go.  [default: RUN/logs]")
def bench(
    path: Path, compare: bool, runs: int, threads: int, decode_tokens: int, gguf: str | None, output: str | None
) -> None:
    """Measure an export: load time, time to first token (32 and 512-token prompts), decode speed, memory, size.

    \b
    PATH is runs/NAME or an export folder. Every engine runs in its own process with the same threads.
      edgeft bench runs/recipes
      edgeft bench runs/recipes --compare      # + PyTorch, Optimum, llama.cpp, as ratios
    """
    from edgeft.bench import Settings, markdown
    from edgeft.bench import bench as run_bench

    report = run_bench(
        path,
        compare=compare,
        gguf=gguf,
        output=output,
        settings=Settings(runs=runs, threads=threads, decode_tokens=decode_tokens),
    )
    for line in markdown(report):
        click.echo(line)
    click.echo(f"Saved: {', '.join(report['paths'].values())}")


# --- chat & serve -------------------------------------------------------------------------


@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--system", help="A system prompt that starts every conversation.")
@click.option("-p", "--prompt", help="Answer this one message and exit. Text piped on stdin does the same.")
@click.option("--max-tokens", type=int, help="Most new tokens per answer.  [default: up to the context size]")
@click.option("--temperature", type=float, help="0 = greedy, up to 2 = wild.  [default: the model's own]")
@click.option("--top-p", type=float, help="Nucleus sampling mass, (0, 1].")
@click.option("--top-k", type=int, help="Sample among the k most likely tokens; 0 = no limit.")
@click.option("--repetition-penalty", type=float, help="> 1 discourages repetition; 1 = off.")
@click.option("--stop", multiple=True, help="A string that ends the answer (repeatable, up to 4).")
@click.option("--seed", type=int, help="Makes sampled answers repeatable.")
@click.option("--json", "json_object", is_flag=True, help="Answer with a JSON object (every token constrained).")
@click.option(
    "--json-schema",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Answer with JSON that fits this JSON Schema file (every token constrained).",
)
@click.option(
    "--adapter",
    type=click.Path(path_type=Path),
    help="Answer with this runtime LoRA adapter (runs/NAME, its onnx-adapter folder or .onnx_adapter file) on PATH, the shared base it was exported for.",
)
@click.option(
    "--tools",
    "tools_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="A JSON file of OpenAI function definitions the model may call; you type each call's result.",
)
@click.option("--threads", type=int, help="CPU threads for ONNX Runtime.  [default: all cores]")
@click.option("--stats", is_flag=True, help="After each answer, print tokens/s and time to first token.")
def chat(
    path: Path,
    system: str | None,
    prompt: str | None,
    adapter: Path | None,
    threads: int | None,
    stats: bool,
    json_object: bool,
    json_schema: Path | None,
    tools_file: Path | None,
    **generation,
) -> None:
    """Chat with an exported model in the terminal: PATH is runs/NAME or runs/NAME/onnx-int4.

    \b
    In the chat: Ctrl-C stops the answer, /reset starts over, /exit or Ctrl-D leaves.
    For scripts: edgeft chat runs/NAME --prompt "..."   or   echo "..." | edgeft chat runs/NAME
    A runtime adapter (edgeft export runs/NAME --as-adapter) on its shared base:
      edgeft chat ~/.cache/edgeft/bases/BASE --adapter runs/NAME
    Function calling (a model trained on calls): edgeft chat runs/NAME --tools tools.json
    """
    from edgeft.runtime import ChatModel, GenerationOptions, json_schema_format
    from edgeft.runtime.chat import answer_once, chat_loop

    options = {k: (list(v) if k == "stop" else v) for k, v in generation.items() if v not in (None, ())}
    if json_schema is not None:
        options["response_format"] = json_schema_format(json_schema)
    elif json_object:
        options["response_format"] = {"type": "json_object"}
    GenerationOptions(**options)  # bad options fail before the model loads
    if tools_file is not None:
        from edgeft.runtime.tooluse import load_tools

        options["tools"] = load_tools(tools_file)
    if prompt is None and not sys.stdin.isatty():
        prompt = sys.stdin.read()
    model = ChatModel.load(path, threads=threads, adapter=adapter)
    if prompt is not None:
        answer_once(model, prompt, system=system, options=options, stats=stats)
    else:
        chat_loop(model, system=system, options=options, stats=stats)


@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; 0.0.0.0 opens it to others.")
@click.option("--port", default=8000, show_default=True, help="TCP port.")
@click.option(
    "--api-key", envvar="EDGEFT_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1.  [env: EDGEFT_API_KEY]"
)
@click.option(
    "--parallel",
    default=1,
    show_default=True,
    help="Answers generated at once, decoded together in one batch (continuous batching): 4 clients got 2.3x one "
    "client's tokens/s on 2 cores. Each extra answer holds a KV cache row; the batch adds about the export's size in memory.",
)
@click.option(
    "--prompt-cache-mb",
    default=1024,
    show_default=True,
    help="Memory for the KV caches of recent prompts: a request that begins like one (a system prompt, "
    "the earlier turns of a chat) runs only what is new. 0 = off.",
)
@click.option("--queue-size", default=8, show_default=True, help="Requests that may wait for a slot; more get 503.")
@click.option("--max-body", default=1_000_000, show_default=True, help="Largest request body accepted, in bytes.")
@click.option("--threads", type=int, help="CPU threads for ONNX Runtime per answer.  [default: all cores]")
@click.option(
    "--adapter",
    "adapters",
    multiple=True,
    metavar="NAME=PATH",
    help="Also serve a runtime LoRA adapter on PATH's base, as model NAME (repeatable). PATH: runs/RUN, its onnx-adapter folder or .onnx_adapter file; NAME= may be left out (then the run's name).",
)
@click.option(
    "--cors-origins",
    multiple=True,
    metavar="ORIGIN",
    help="Let web pages from ORIGIN (e.g. http://localhost:3000) call the API (repeatable). Others are refused.",
)
def serve(
    path: Path,
    host: str,
    port: int,
    api_key: str | None,
    parallel: int,
    queue_size: int,
    max_body: int,
    threads: int | None,
    adapters: tuple[str, ...],
    cors_origins: tuple[str, ...],
    prompt_cache_mb: int,
) -> None:
    """Serve an exported model: OpenAI-compatible API at /v1 and a web chat page at /.

    \b
    PATH is runs/NAME or runs/NAME/onnx-int4. Then, for example:
      curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "edgeft", "messages": [{"role": "user", "content": "Hi!"}]}'
    or open http://127.0.0.1:8000/ in a browser.
    Without --api-key on 127.0.0.1 it answers only to localhost names and JSON bodies, and no web
    page of another origin may call it (unless --cors-origins): a site you visit cannot use it.
    Several fine-tunes on one base (edgeft export runs/NAME --as-adapter): a request's "model" picks one.
      edgeft serve ~/.cache/edgeft/bases/BASE --adapter recipes=runs/recipes --adapter support=runs/support
    """
    for name, value, low in (
        ("--parallel", parallel, 1),
        ("--queue-size", queue_size, 0),
        ("--max-body", max_body, 1),
        ("--prompt-cache-mb", prompt_cache_mb, 0),
    ):
        if value < low:
            raise ConfigError(f"{name} must be at least {low}, got {value}.")
    from edgeft.runtime.server import serve as run_server  # says to install edgeft[serve] if fastapi is missing

    run_server(
        path,
        host=host,
        port=port,
        api_key=api_key,
        threads=threads,
        parallel=parallel,
        max_queue=queue_size,
        max_body=max_body,
        cors_origins=cors_origins,
        adapters=adapters,
        prompt_cache_bytes=prompt_cache_mb << 20,
    )


def main() -> None:
    # SIGTERM (kill, docker stop, a CI timeout) unwinds like Ctrl-C: staged folders are removed and a
    # running builder or pip subprocess is killed, instead of hidden temp folders left forever.
    # (Training and the server install their own handlers while they run.)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        cli(prog_name="edgeft")
    except KeyboardInterrupt:  # landed outside a command (Click's start or the unwinding after one)
        _interrupted()


def _interrupted() -> None:
    click.echo("\nInterrupted.", err=True)
    sys.exit(130)


class Terminated(KeyboardInterrupt):
    """SIGTERM, unwinding like Ctrl-C (every `except KeyboardInterrupt` cleans up). A subclass on
    purpose: CPython kills itself with SIGINT at exit when an exception of exactly the type
    KeyboardInterrupt ended the main module or any code run through its C API, whatever exit
    code we chose; CI saw exit -2 instead of 130 under load."""


def _terminate(signum, frame) -> None:
    raise Terminated
