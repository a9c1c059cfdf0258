"""The `edgeft` command. Each command parses options, calls one library function, prints the result.

Heavy libraries (torch, transformers, onnxruntime) are imported inside the library functions, so
`edgeft --help` answers instantly.
"""

from __future__ import annotations

import logging
import sys
import traceback

import click

from edgeft import __version__
from edgeft.errors import EdgeftError

log = logging.getLogger("edgeft")


class EdgeftGroup(click.Group):
    """Turns our own exceptions into one clean line and a non-zero exit; -v shows the traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except EdgeftError as e:
            if ctx.find_root().params.get("verbose"):
                traceback.print_exc()
            click.secho(f"Error: {e}", err=True, fg="red")
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("\nInterrupted.", err=True)
            ctx.exit(130)


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
      edgeft export runs/NAME --int4                    ONNX int4, verified against PyTorch
      edgeft chat runs/NAME                             chat in the terminal
      edgeft serve runs/NAME                            OpenAI-compatible server + web page
    """
    _setup_logging(verbose)


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
def models_list() -> None:
    """Show built-in and cached models with their status, size and path."""
    from edgeft import artifacts
    from edgeft.models import list_models

    rows = list_models()
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


def main() -> None:
    cli(prog_name="edgeft")
