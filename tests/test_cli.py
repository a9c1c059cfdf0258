import subprocess
import sys

import click

from edgeft.cli import cli
from tests.helpers import run_cli


def listed_commands(*group: str) -> set[str]:
    """The command names under "Commands:" in `edgeft [GROUP] --help`."""
    out = run_cli(*group, "--help").output
    section = out.split("\nCommands:\n", 1)[1]
    return {line.split()[0] for line in section.splitlines() if line.startswith("  ") and line.strip()}


def test_help_lists_commands():
    """Every command of the group, and every subcommand of its groups (models, data), is in --help."""
    known = {"quickstart", "doctor", "models", "data", "tune", "merge", "export", "eval", "bench", "chat"}
    shown = {name for name, command in cli.commands.items() if not command.hidden}
    assert shown >= known | {"serve"}  # the group is the real one
    assert listed_commands() == shown
    for name, command in cli.commands.items():
        if isinstance(command, click.Group):
            assert listed_commands(name) == {n for n, c in command.commands.items() if not c.hidden}, name


def test_python_dash_m_works():
    out = subprocess.run([sys.executable, "-m", "edgeft", "--version"], capture_output=True, text=True, check=True)
    assert "edgeft, version" in out.stdout


ROWS = ("torch device", "bitsandbytes 4-bit", "onnxruntime providers", "free disk", "cache", "cpu flags")


def _free_disk(monkeypatch, free: int) -> None:
    import shutil
    from types import SimpleNamespace

    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=2 * free, used=free, free=free))


def test_doctor_reports_the_machine(monkeypatch):
    """With room on the disk every check passes on a machine set up for the tests (exit 0), and the
    CPU flags shown are the ones edgeft.cpu finds on this CPU; too little disk is marked and exits 1."""
    from edgeft.bench import machine
    from edgeft.cpu import cpu_flags

    _free_disk(monkeypatch, 50 * 2**30)
    result = run_cli("doctor")  # exit 0: torch, bitsandbytes 4-bit and onnxruntime all work here
    rows = {line[4:].split("  ", 1)[0].strip(): line for line in result.output.splitlines()}
    for row in ROWS:
        assert row in rows, result.output
    assert not any(line.startswith("!!") for line in result.output.splitlines()), result.output
    for row in ("torch device", "bitsandbytes 4-bit", "onnxruntime providers", "free disk"):
        assert rows[row].startswith("ok"), rows[row]
    flags = " ".join(cpu_flags())
    assert rows["cpu flags"].endswith(flags or "unknown (no /proc/cpuinfo)"), rows["cpu flags"]
    assert machine().endswith("CPU flags: " + (flags or "unknown"))

    _free_disk(monkeypatch, 10**9)  # under the 2 GB a run needs
    result = run_cli("doctor", ok=False)
    assert result.exit_code == 1
    disk = next(line for line in result.output.splitlines() if "free disk" in line)
    assert disk.startswith("!!") and "1.0 GB at" in disk, disk


def test_user_errors_are_one_line_without_traceback():
    result = run_cli("models", "pull", "nope", ok=False)
    assert result.exit_code == 1
    assert result.output.startswith("Error: unknown built-in model 'nope'")
    assert "Traceback" not in result.output


def test_verbose_shows_the_traceback():
    result = run_cli("-v", "models", "pull", "nope", ok=False)
    assert "Traceback" in result.output
