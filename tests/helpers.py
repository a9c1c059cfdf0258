"""Small helpers shared by the tests."""

from __future__ import annotations

from click.testing import CliRunner, Result

from edgeft.cli import cli


def run_cli(*args: str, input: str | None = None, ok: bool = True) -> Result:
    """Invoke the CLI as a user would; by default assert success and show the output if not."""
    result = CliRunner().invoke(cli, [str(a) for a in args], input=input, catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, f"edgeft {' '.join(map(str, args))} failed ({result.exit_code}):\n{result.output}"
    return result
