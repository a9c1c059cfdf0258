"""Nothing lost, no promise broken (issue 33): the windows where a kill, a crash, a proxy or a new
uvicorn would lose work or break a promise, each opened on purpose (monkeypatch, a real SIGKILL)."""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeft import artifacts, bench, models
from edgeft.artifacts import Run
from edgeft.cli import cli
from edgeft.config import tomllib
from edgeft.errors import EdgeftError, RunError
from tests.helpers import run_cli

REPO = Path(__file__).resolve().parents[1]


# --- staged_dir: replacing a folder never hides both ------------------------------------------


def _folder(path: Path, text: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "f").write_text(text)
    return path


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux's")
def test_staged_dir_swaps_a_folder_in_one_atomic_exchange(tmp_path, monkeypatch):
    target = _folder(tmp_path / "out", "old")
    renames, real = [], os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (renames.append((a, b)), real(a, b))[1])
    with artifacts.staged_dir(target, force=True) as tmp:
        (tmp / "f").write_text("new")
    assert (target / "f").read_text() == "new"
    assert renames == []  # no rename that leaves a moment without `out`
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_staged_dir_puts_the_old_folder_back_when_the_second_rename_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(artifacts, "_exchange", lambda a, b: False, raising=False)  # no atomic exchange here
    target = _folder(tmp_path / "out", "old")
    calls, real = [], os.replace

    def replace(a, b):
        calls.append(a)
        if len(calls) == 2:
            raise OSError(5, "Input/output error")
        real(a, b)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="Input/output"), artifacts.staged_dir(target, force=True) as tmp:
        (tmp / "f").write_text("new")
    assert (target / "f").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# A process that replaces `argv[1]` where the atomic exchange is missing and is killed (SIGKILL:
# no finally, no except) right after the first of the two renames.
KILLED_MID_SWAP = """
import os, signal, sys
from pathlib import Path
from edgeft import artifacts

artifacts._exchange = lambda a, b: False
real = os.replace

def replace(src, dst):
    real(src, dst)
    os.kill(os.getpid(), signal.SIGKILL)

os.replace = replace
with artifacts.staged_dir(Path(sys.argv[1]), force=True) as tmp:
    (tmp / "f").write_text("new")
"""


def _killed_mid_swap(target: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", KILLED_MID_SWAP, str(target)], cwd=REPO, check=False)
    assert proc.returncode == -signal.SIGKILL
    assert not target.exists()  # the window: the old folder hidden, the new one not in place
    assert [p.name for p in target.parent.glob(f".{target.name}.old-*")]


def test_a_folder_hidden_by_a_kill_is_restored_by_the_run_that_holds_it(tmp_path):
    run = Run.create(tmp_path / "run")
    merged = _folder(run.merged_dir, "old")
    _killed_mid_swap(merged)
    Run.open(run.path)
    assert (merged / "f").read_text() == "old"
    assert not list(run.path.glob(".merged.old-*"))


def test_a_folder_hidden_by_a_kill_is_restored_by_the_next_staged_dir(tmp_path):
    target = _folder(tmp_path / "out", "old")
    _killed_mid_swap(target)
    with pytest.raises(RunError, match="already exists"), artifacts.staged_dir(target):
        pass
    assert (target / "f").read_text() == "old"


def test_a_model_hidden_by_a_kill_is_restored_by_the_lookup(monkeypatch):
    path = _sealed_entry()
    _killed_mid_swap(path)
    monkeypatch.setattr(models, "pull_builtin", lambda m, p: pytest.fail("a model in the cache was fetched again"))
    assert models.ensure_builtin("smollm2-135m") == path
    assert (path / "model.safetensors").is_file()


# --- bench: an engine that dies is reported at once, with how ----------------------------------


def _engine_killed_by_sigill(target, settings):
    print("loading the model", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGILL)


def _engine_that_exits(target, settings):
    print("loading the model", file=sys.stderr, flush=True)
    sys.exit(1)


@pytest.mark.parametrize(
    "engine, how",
    [
        (_engine_killed_by_sigill, "killed by SIGILL (illegal instruction: built for a CPU this one is not)"),
        (_engine_that_exits, "exited with code 1"),
    ],
)
def test_bench_reports_an_engine_that_died_at_once(tmp_path, monkeypatch, caplog, engine, how):
    monkeypatch.setitem(bench.ENGINES, "genai", engine)
    monkeypatch.setattr(logging.getLogger("edgeft"), "propagate", True)  # the CLI turns it off; caplog needs it
    start = time.monotonic()
    with caplog.at_level(logging.DEBUG, logger="edgeft"):
        result = bench.run_engine("genai", tmp_path, bench.Settings(), timeout=120)
    assert time.monotonic() - start < 60  # not the wait for a result that cannot come
    assert result["error"].startswith(f"the genai engine died: {how}")
    assert "loading the model" in result["error"]  # the tail of its stderr
    if engine is _engine_killed_by_sigill:  # -v (debug) shows where it crashed
        assert "Fatal Python error" in caplog.text and "_engine_killed_by_sigill" in caplog.text


def _engine_that_measures(target, settings):
    return {"load_s": 0.5, "target": target}


def _engine_that_raises(target, settings):
    raise ValueError(f"{target} has no genai_config.json")


def test_bench_still_reports_measurements_and_engine_errors(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(bench.ENGINES, "genai", _engine_that_measures)
    assert bench.run_engine("genai", tmp_path, bench.Settings()) == {"load_s": 0.5, "target": str(tmp_path)}
    monkeypatch.setitem(bench.ENGINES, "genai", _engine_that_raises)
    monkeypatch.setattr(logging.getLogger("edgeft"), "propagate", True)
    with caplog.at_level(logging.DEBUG, logger="edgeft"):
        result = bench.run_engine("genai", tmp_path, bench.Settings())
    assert result == {"error": f"ValueError: {tmp_path} has no genai_config.json"}
    assert "Traceback" in caplog.text and "_engine_that_raises" in caplog.text  # with -v


# --- -v shows the cause a one-line user error hides --------------------------------------------


def test_verbose_shows_the_exception_behind_a_user_error(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "edgeft.json").write_text("{")  # raised as RunError(...) from None: the JSON error is the cause
    plain = CliRunner().invoke(cli, ["bench", str(run)])
    assert plain.exit_code == 1
    (line,) = plain.output.strip().splitlines()  # one line, as before
    assert line.startswith(f"Error: run manifest {run / 'edgeft.json'} is not valid JSON")
    verbose = CliRunner().invoke(cli, ["-v", "bench", str(run)])
    assert verbose.exit_code == 1
    assert "json.decoder.JSONDecodeError: Expecting property name" in verbose.output
    assert "edgeft.errors.RunError: run manifest" in verbose.output


# --- the model cache: hashed when made and on --verify, not on every command -------------------

HOUR_AGO = time.time() - 3600


def _sealed_entry(name: str = "smollm2-135m") -> Path:
    path = models.models_dir() / name
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"weights" * 100)
    (path / "config.json").write_text("{}")
    for f in path.iterdir():  # written well before the seal, as a conversion's files are
        os.utime(f, (HOUR_AGO, HOUR_AGO))
    models._seal(path, name=name, source="test")
    return path


@pytest.fixture
def hashed(monkeypatch) -> list[str]:
    """The names of the files hashed from now on."""
    names, real = [], artifacts.sha256_file
    monkeypatch.setattr(artifacts, "sha256_file", lambda p, *a, **k: (names.append(Path(p).name), real(p, *a, **k))[1])
    return names


def test_model_lookups_hash_nothing_that_did_not_change(monkeypatch, hashed):
    path = _sealed_entry()
    _sealed_entry("gguf-mine-0123456789ab")
    hashed.clear()
    monkeypatch.setattr(models, "pull_builtin", lambda m, p: pytest.fail("an intact entry was fetched again"))
    assert models.ensure_builtin("smollm2-135m") == path
    assert models.ensure_builtin("smollm2-135m") == path
    assert {r.name: r.status for r in models.list_models()} == {
        "smollm2-135m": "ready",
        "gguf-mine-0123456789ab": "ready",
    }
    assert hashed == []


def test_models_list_hashes_an_entry_once_at_most(hashed):
    path = _sealed_entry("gguf-mine-0123456789ab")
    marker = json.loads((path / models.MARKER).read_text())
    for meta in marker["files"].values():  # a marker written before times were recorded
        meta.pop("mtime_ns", None)
    (path / models.MARKER).write_text(json.dumps(marker))
    hashed.clear()
    assert [r.status for r in models.list_models()] == ["not downloaded", "ready"]
    assert sorted(hashed) == ["config.json", "model.safetensors"]
    hashed.clear()
    models.list_models()
    assert hashed == []  # the times it found were recorded


def test_a_changed_model_file_is_still_found(hashed):
    path = _sealed_entry()
    weights = path / "model.safetensors"
    recorded = json.loads((path / models.MARKER).read_text())["files"]["model.safetensors"]["mtime_ns"]
    weights.write_bytes(b"WEIGHTS" * 100)  # same size, other bytes, a new time
    assert "checksum mismatch" in models.cache_entry_problem(path)
    os.utime(weights, ns=(recorded, recorded))  # and the old time put back: only --verify hashes it
    assert models.cache_entry_problem(path) is None
    assert "checksum mismatch" in run_cli("models", "list", "--verify").output
    weights.write_bytes(b"short")
    hashed.clear()
    assert models.cache_entry_problem(path) == "model.safetensors has the wrong size"
    assert hashed == []


# --- the hub check dials what the hub client will dial -----------------------------------------

PROXY_VARS = [v for name in ("http", "https", "all", "no") for v in (f"{name}_proxy", f"{name.upper()}_PROXY")]


@pytest.mark.parametrize(
    "env, dialled",
    [
        ({}, ("huggingface.co", 443)),
        ({"HTTPS_PROXY": "http://proxy.corp:3128"}, ("proxy.corp", 3128)),
        ({"https_proxy": "proxy.corp:8080"}, ("proxy.corp", 8080)),
        ({"HTTPS_PROXY": "http://proxy.corp:3128", "NO_PROXY": "localhost,huggingface.co"}, ("huggingface.co", 443)),
        ({"HTTPS_PROXY": "http://proxy.corp:3128", "HF_ENDPOINT": "http://mirror.lan:8000"}, ("mirror.lan", 8000)),
    ],
)
def test_hub_check_dials_the_proxy_the_hub_client_uses(monkeypatch, env, dialled):
    for var in [*PROXY_VARS, "HF_ENDPOINT"]:
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    dials = []
    monkeypatch.setattr(
        socket, "create_connection", lambda address, timeout=None: dials.append(address) or contextlib.nullcontext()
    )
    assert models.hub_reachable()
    assert dials == [dialled]


# --- serve: uvicorn's private protocol -------------------------------------------------------


def test_serve_refuses_in_one_line_a_uvicorn_whose_protocol_changed(monkeypatch):
    pytest.importorskip("uvicorn")
    from uvicorn.protocols.http.h11_impl import H11Protocol

    from edgeft.runtime import connections

    monkeypatch.delattr(H11Protocol, "on_response_complete")
    try:
        with pytest.raises(EdgeftError, match=r"H11Protocol has no on_response_complete\. .*edgeft\[serve\]") as e:
            importlib.reload(connections)
        assert "\n" not in str(e.value)
    finally:
        monkeypatch.undo()
        importlib.reload(connections)


def test_uvicorn_is_bounded_to_the_versions_checked_with_its_private_protocol():
    serve = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["serve"]
    assert all("<" in requirement for requirement in serve), serve
