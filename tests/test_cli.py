import subprocess
import sys

from tests.helpers import run_cli


def test_help_lists_commands():
    out = run_cli("--help").output
    for command in ("doctor", "models"):
        assert command in out


def test_python_dash_m_works():
    out = subprocess.run([sys.executable, "-m", "edgeft", "--version"], capture_output=True, text=True, check=True)
    assert "edgeft, version" in out.stdout


def test_doctor_reports_the_machine():
    result = run_cli("doctor", ok=False)
    assert result.exit_code in (0, 1)
    for row in ("torch device", "bitsandbytes 4-bit", "onnxruntime providers", "free disk", "cache", "cpu flags"):
        assert row in result.output
    from edgeft.bench import machine
    from edgeft.cpu import cpu_flags

    assert "avx2" in cpu_flags() and machine().endswith("CPU flags: " + " ".join(cpu_flags()))  # x86-64 CI machines


def test_user_errors_are_one_line_without_traceback():
    result = run_cli("models", "pull", "nope", ok=False)
    assert result.exit_code == 1
    assert result.output.startswith("Error: unknown built-in model 'nope'")
    assert "Traceback" not in result.output


def test_verbose_shows_the_traceback():
    result = run_cli("-v", "models", "pull", "nope", ok=False)
    assert "Traceback" in result.output
