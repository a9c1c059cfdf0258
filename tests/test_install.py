"""`pip install edgeft` is a path of its own: what the wheel carries and what each install can do.

In this process: a base install (no torch) answers a training or export command with one line that
names the extra, before any work. Marked `real`: the wheel is built and installed into new virtual
environments, the base one resolving its dependencies from the package index configured on this
machine (fast with a warm pip cache, but not offline).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeft import evaluate as evaluate_module
from edgeft.cli import cli
from edgeft.config import tomllib
from edgeft.errors import EdgeftError
from tests.conftest import REPO

# --- a base install, simulated in this process ------------------------------------------------

COMMANDS = [  # (arguments, the command as the message names it, the extra it needs)
    (["tune", "--data", "x.jsonl"], "tune", "train"),
    (["data", "check", "x.jsonl"], "data check", "train"),
    (["merge", "runs/x"], "merge", "train"),
    (["eval", "smollm2-135m", "--data", "x.jsonl"], "eval", "train"),
    (["export", "runs/x"], "export", "export"),
    (["quickstart"], "quickstart", "export"),
]
NAMES = {"train": "training", "export": "export"}


@pytest.fixture
def no_torch(monkeypatch):
    """This process as a base install sees it: importlib.util.find_spec answers None for torch."""
    monkeypatch.setitem(sys.modules, "torch", None)


@pytest.mark.parametrize(("args", "command", "extra"), COMMANDS, ids=[c[1] for c in COMMANDS])
def test_a_base_install_names_the_extra_in_one_line(no_torch, args, command, extra):
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1
    assert result.output == (
        f'Error: edgeft {command} needs the {NAMES[extra]} extra (torch is not installed): pip install "edgeft[{extra}]"\n'
    )


def test_export_names_its_own_extra_when_only_that_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)
    result = CliRunner().invoke(cli, ["export", "runs/x"])
    assert result.exit_code == 1
    assert (
        result.output
        == 'Error: edgeft export needs the export extra (onnx is not installed): pip install "edgeft[export]"\n'
    )


def test_a_base_install_still_shows_help(no_torch):
    for args in (["--help"], ["tune", "--help"], ["data", "check", "--help"], ["quickstart", "--help"]):
        result = CliRunner().invoke(cli, args, prog_name="edgeft")
        assert result.exit_code == 0, (args, result.output)
        assert result.output.startswith(f"Usage: edgeft {' '.join(args[:-1])}".rstrip())


def test_a_base_install_evaluates_onnx_exports_without_the_training_extra(no_torch, monkeypatch, tmp_path):
    export = tmp_path / "onnx-int4"
    export.mkdir()
    (export / "genai_config.json").write_text("{}")

    def reached(*args, **kwargs):
        raise EdgeftError("evaluate was reached")

    monkeypatch.setattr(evaluate_module, "evaluate", reached)
    result = CliRunner().invoke(cli, ["eval", str(export), "--data", "x.jsonl"])
    assert result.output == "Error: evaluate was reached\n"
    result = CliRunner().invoke(cli, ["eval", str(export), "--data", "x.jsonl", "--rag", "3"])  # BM25: bm25s
    assert "needs the training extra" in result.output


# --- the wheel, installed ---------------------------------------------------------------------


def _run(*cmd, ok: bool = True, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], check=False, capture_output=True, text=True, **kwargs)
    if ok:
        assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _pip(python: Path, *args, **kwargs) -> subprocess.CompletedProcess:
    """This environment's pip working on another interpreter's environment (no pip needed in it)."""
    return _run(sys.executable, "-m", "pip", "--python", python, *args, "--disable-pip-version-check", "-q", **kwargs)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wheel")
    build = _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", root, REPO)
    (root / "build.log").write_text(build.stdout + build.stderr)
    return next(root.glob("edgeft-*.whl"))


def _new_env(root: Path, python: str = sys.executable) -> Path:
    _run(python, "-m", "venv", "--without-pip", root)
    return root / "bin" / "python"


@pytest.fixture(scope="module")
def fresh_env(wheel, tmp_path_factory) -> Path:
    """A new venv (no system site-packages) with only the edgeft wheel and its base dependencies, as pip
    resolves them for a user (no constraints file)."""
    python = _new_env(tmp_path_factory.mktemp("fresh") / "venv")
    _pip(python, "install", wheel)
    return python


@pytest.fixture(scope="module")
def training_env(wheel, tmp_path_factory) -> Path:
    """The wheel with the training stack: a new venv that also sees this environment's packages, the wheel
    installed into it with --no-deps.

    The cheapest honest check: installing torch and the rest again (GBs, minutes) would test pip, and the
    base venv above is the clean one. `venv --system-site-packages` would not do it: it shows the base
    interpreter's site-packages, not this environment's; one .pth line does, after the venv's own (so the
    wheel's edgeft wins over this environment's editable one, whose .pth is not read; pip does not uninstall
    that one: it lies outside the new venv).
    """
    pytest.importorskip("torch")
    python = _new_env(tmp_path_factory.mktemp("training") / "venv")
    site = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    (site / "edgeft-test-parent.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _pip(python, "install", "--no-deps", wheel)
    return python


@pytest.mark.real
def test_the_wheel_builds_quietly_and_carries_the_web_page_and_the_recipe_sample(wheel):
    log = (wheel.parent / "build.log").read_text()
    assert "Warning" not in log and "warn" not in log.lower(), log  # a new user's first screen is clean
    names = zipfile.ZipFile(wheel).namelist()
    assert "edgeft/runtime/web/index.html" in names
    assert {"edgeft/samples/recipes/train.jsonl", "edgeft/samples/recipes/eval.jsonl"} <= set(names)
    assert not [n for n in names if n.endswith(".toml") or ("samples/" in n and "/recipes/" not in n)]
    assert wheel.stat().st_size < 1_000_000  # 0.32 MB with the recipe sample (0.21 without)


@pytest.mark.real
def test_base_install_runs_the_runtime_without_torch(fresh_env, tiny_llama_export):
    listed = _run(sys.executable, "-m", "pip", "--python", fresh_env, "list", "--format=freeze").stdout.lower()
    assert "onnxruntime-genai" in listed
    for heavy in ("torch", "transformers", "fastapi"):
        assert f"\n{heavy}==" not in f"\n{listed}"
    code = (
        "import sys\n"
        "import edgeft.runtime\n"
        "from edgeft.runtime import ChatModel\n"
        f"m = ChatModel.load({str(tiny_llama_export)!r})\n"
        "r = m.chat([{'role': 'user', 'content': 'hi'}], max_tokens=4, temperature=0)\n"
        "assert r.usage['completion_tokens'] == 4, r\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
        "print('ok')\n"
    )
    assert _run(fresh_env, "-c", code).stdout.strip() == "ok"


@pytest.mark.real
def test_base_install_answers_training_commands_with_the_extra_to_install(fresh_env):
    edgeft = fresh_env.parent / "edgeft"
    assert _run(edgeft, "--help").stdout.startswith("Usage: edgeft")
    assert _run(edgeft, "tune", "--help").stdout.startswith("Usage: edgeft tune")
    for args, command, extra in COMMANDS:
        proc = _run(edgeft, *args, ok=False)
        assert proc.returncode == 1, (args, proc.stdout, proc.stderr)
        assert proc.stdout == ""
        assert proc.stderr == (
            f"Error: edgeft {command} needs the {NAMES[extra]} extra (torch is not installed): "
            f'pip install "edgeft[{extra}]"\n'
        )


@pytest.mark.real
def test_base_install_evaluates_an_export_on_the_packaged_sample(fresh_env, tiny_llama_export, tmp_path):
    samples = Path(_run(fresh_env, "-c", "from edgeft.quickstart import SAMPLES; print(SAMPLES)").stdout.strip())
    assert samples.is_relative_to(fresh_env.parents[1]), samples  # the installed copy, not the clone's
    out = _run(
        fresh_env.parent / "edgeft",
        "eval",
        tiny_llama_export,
        "--data",
        samples / "eval.jsonl",
        "--limit",
        "2",
        "--max-tokens",
        "4",
        "--output",
        tmp_path / "eval.json",
    )
    assert "2 examples" in out.stdout and (tmp_path / "eval.json").is_file()


@pytest.mark.real
def test_base_install_benchmarks_without_matplotlib(fresh_env, tiny_llama_export, tmp_path):
    edgeft = fresh_env.parent / "edgeft"
    out = _run(edgeft, "bench", tiny_llama_export, "--runs", "1", "--decode-tokens", "4", "--output", tmp_path / "b")
    assert "bench.md" in out.stdout and "bench.png" not in out.stdout
    assert (tmp_path / "b" / "bench.json").is_file()


@pytest.mark.real
def test_base_install_has_the_chat_command_and_explains_serve(fresh_env, tiny_llama_export):
    edgeft = fresh_env.parent / "edgeft"
    out = _run(edgeft, "chat", tiny_llama_export, "--prompt", "hi", "--max-tokens", "3")
    assert out.stdout.endswith("\n")
    proc = _run(edgeft, "serve", tiny_llama_export, ok=False)
    assert proc.returncode == 1
    assert "pip install 'edgeft[serve]'" in proc.stderr


@pytest.mark.real
def test_training_install_checks_the_packaged_sample(training_env, tiny_llama):
    """No reduced quickstart fits a test (its shortest run exports twice and evaluates: many minutes), so
    the installed quickstart's own data goes through `edgeft data check` with the training stack."""
    code = "import edgeft; from edgeft.quickstart import SAMPLES; print(edgeft.__file__); print(SAMPLES)"
    package, samples = map(Path, _run(training_env, "-c", code).stdout.split())
    venv_root = training_env.parents[1]
    assert package.is_relative_to(venv_root) and samples.is_relative_to(venv_root), (package, samples)
    edgeft = training_env.parent / "edgeft"
    assert "recipe sample" in _run(edgeft, "quickstart", "--help").stdout
    out = _run(edgeft, "data", "check", samples / "train.jsonl", "--model", tiny_llama)
    assert "No problems found." in out.stdout


def _claimed_python() -> tuple[int, int]:
    """The lowest Python that pyproject.toml's requires-python admits."""
    spec = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    return 3, int(re.search(r">=\s*3\.(\d+)", spec).group(1))


def _find_python(version: tuple[int, int]) -> str | None:
    """An interpreter of that version: on PATH, or one pyenv installed (its shims do not run it)."""
    name = f"python{version[0]}.{version[1]}"
    candidates = [name, *map(str, sorted(Path.home().glob(f".pyenv/versions/{version[0]}.{version[1]}.*/bin/{name}")))]
    for candidate in candidates:
        proc = subprocess.run(
            [candidate, "-c", "import sys; print(sys.version_info[:2])"], check=False, capture_output=True, text=True
        )
        if proc.returncode == 0 and proc.stdout.strip() == str(version):
            return candidate
    return None


@pytest.mark.real
def test_the_lowest_claimed_python_installs_and_runs_the_base(wheel, fresh_env, tmp_path):
    version = _claimed_python()
    if version == sys.version_info[:2]:
        python = fresh_env  # already built and checked above
    else:
        found = _find_python(version)
        if not found:
            pytest.skip(f"no Python {version[0]}.{version[1]} here (pyenv or apt-get can install it)")
        python = _new_env(tmp_path / "venv", found)
        _pip(python, "install", wheel)
    site = _run(python, "-c", "import edgeft, pathlib; print(pathlib.Path(edgeft.__file__).parent)").stdout.strip()
    _run(python, "-m", "compileall", "-q", site)  # every module, training code included, parses on that Python
    assert _run(python.parent / "edgeft", "--help").stdout.startswith("Usage: edgeft")
    assert "onnxruntime providers" in _run(python.parent / "edgeft", "doctor", ok=False).stdout


@pytest.mark.real
def test_the_developer_install_prints_nothing_but_its_progress(tmp_path):
    """`make setup`'s editable install of the project, into a new venv: setuptools' boxed notice (which
    every editable install of a package with mapped folders prints) must not reach the screen."""
    makefile = (REPO / "Makefile").read_text()
    quiet = re.search(r"^QUIET_EDITABLE := (\S+)$", makefile, re.MULTILINE).group(1)
    assert "PYTHONWARNINGS=$(QUIET_EDITABLE) $(PY) -m pip install -q -c constraints.txt -e" in makefile
    python = _new_env(tmp_path / "venv")
    env = {**os.environ, "PYTHONWARNINGS": quiet}
    proc = _pip(python, "install", "--no-deps", "-e", REPO, env=env)
    assert proc.stdout + proc.stderr == ""
    loud = _pip(python, "install", "--no-deps", "--force-reinstall", "-e", REPO)
    assert "!!" in loud.stderr  # what it hides (so the test fails if setuptools' notice moves elsewhere)
