"""`pip install edgeft` (no extras) in a clean virtual environment is enough to chat with an export.

Marked `real`: it builds the wheel and lets pip resolve the base dependencies from the package
index configured on this machine (fast with a warm pip cache, but not offline).
"""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.real


def _run(*cmd, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], check=False, capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def fresh_env(tmp_path_factory) -> Path:
    """A new venv (no system site-packages) with only the edgeft wheel and its base dependencies."""
    root = tmp_path_factory.mktemp("fresh")
    build = _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", root / "dist", REPO)
    (root / "build.log").write_text(build.stdout + build.stderr)
    wheel = next((root / "dist").glob("edgeft-*.whl"))
    venv.EnvBuilder(with_pip=True, system_site_packages=False).create(root / "venv")
    python = root / "venv" / "bin" / "python"
    _run(python, "-m", "pip", "install", "--disable-pip-version-check", "-q", wheel)
    return python


def test_base_install_runs_the_runtime_without_torch(fresh_env, tiny_llama_export):
    listed = _run(fresh_env, "-m", "pip", "list", "--format=freeze").stdout.lower()
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


def test_the_wheel_builds_quietly_and_carries_the_web_page(fresh_env):
    import zipfile

    root = fresh_env.parents[2]
    log = (root / "build.log").read_text()
    assert "Warning" not in log and "warn" not in log.lower(), log  # a new user's first screen is clean
    wheel = next((root / "dist").glob("edgeft-*.whl"))
    assert "edgeft/runtime/web/index.html" in zipfile.ZipFile(wheel).namelist()


def test_base_install_benchmarks_without_matplotlib(fresh_env, tiny_llama_export, tmp_path):
    edgeft = fresh_env.parent / "edgeft"
    out = _run(edgeft, "bench", tiny_llama_export, "--runs", "1", "--decode-tokens", "4", "--output", tmp_path / "b")
    assert "bench.md" in out.stdout and "bench.png" not in out.stdout
    assert (tmp_path / "b" / "bench.json").is_file()


def test_base_install_has_the_chat_command_and_explains_serve(fresh_env, tiny_llama_export):
    edgeft = fresh_env.parent / "edgeft"
    out = _run(edgeft, "chat", tiny_llama_export, "--prompt", "hi", "--max-tokens", "3")
    assert out.stdout.endswith("\n")
    proc = subprocess.run([str(edgeft), "serve", str(tiny_llama_export)], check=False, capture_output=True, text=True)
    assert proc.returncode == 1
    assert "pip install 'edgeft[serve]'" in proc.stderr
