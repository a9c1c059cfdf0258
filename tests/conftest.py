"""Shared fixtures: no network, isolated caches, tiny random Llama / Phi-3 checkpoints, the real SmolLM2."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from edgeft.chatdata import END_OF_TURN_TOKENS  # the export must stop on them as well as on eos
from tests.tiny import build_tiny_llama, build_tiny_phi3


def _pin_xdist_worker() -> None:
    """Under pytest-xdist (`make test`), each worker gets its own share of the CPUs before torch or
    ONNX Runtime start: they size their thread pools from it (edgeft.cpu.usable_cpus), and so do the
    edgeft commands a test runs, which inherit it. Unpinned, 2 workers on 2 cores ran 4 threads that
    took turns; pinned, two reduced task-suite runs side by side took 181 s against 221 one after
    the other."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER", ""), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if count < 2 or not worker.startswith("gw") or not hasattr(os, "sched_setaffinity"):
        return
    cpus = sorted(os.sched_getaffinity(0))
    share = len(cpus) // count
    if share:
        index = int(worker[2:]) % count
        os.sched_setaffinity(0, cpus[index * share : (index + 1) * share])


_pin_xdist_worker()  # the imports above start no thread pool (neither torch nor ONNX Runtime is loaded yet)

REPO = Path(__file__).resolve().parents[1]
_real_connect = socket.socket.connect


def _guarded_connect(self, address):
    host = address[0] if isinstance(address, tuple) else address
    try:
        if self.family == socket.AF_UNIX or ipaddress.ip_address(host).is_loopback:
            return _real_connect(self, address)
    except ValueError:
        if host == "localhost":
            return _real_connect(self, address)
    raise OSError(f"network access is forbidden in tests (tried to connect to {address})")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Every test gets its own cache dirs, HF offline, and no sockets except loopback."""
    home = tmp_path / "home"
    monkeypatch.setenv("EDGEFT_HOME", str(home / "edgeft"))
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setattr(socket.socket, "connect", _guarded_connect)
    monkeypatch.chdir(tmp_path)
    yield tmp_path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer Llama (hidden 64) with a ChatML template: the shape of SmolLM2."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_phi3(tmp_path_factory) -> Path:
    """A 2-layer Phi-3 (fused qkv_proj / gate_up_proj) with Phi-3's template and eos."""
    return build_tiny_phi3(tmp_path_factory.mktemp("tiny-phi3"))


@pytest.fixture(params=["llama", "phi3"])
def tiny_model(request) -> Path:
    """Both tiny architectures, one after the other."""
    return request.getfixturevalue(f"tiny_{request.param}")


def _build_test_export(hf_dir: Path, out: Path) -> Path:
    """An fp32 onnxruntime-genai export of a tiny HF checkpoint, shaped like `edgeft export` output.

    The model builder writes genai_config.json and model.onnx; then the HF tokenizer files are
    copied over with the chat template inside tokenizer_config.json, and model.eos_token_id lists
    every token that ends a turn (Phi-3's eos is <|endoftext|>, but a turn ends with <|end|>).
    """
    cache = out.parent / f"{out.name}-builder-cache"
    cmd = [
        sys.executable,
        "-m",
        "onnxruntime_genai.models.builder",
        "-i",
        str(hf_dir),
        "-o",
        str(out),
        "-p",
        "fp32",
        "-e",
        "cpu",
        "-c",
        str(cache),
    ]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)  # the builder is very noisy
    if proc.returncode != 0:
        raise RuntimeError(f"model builder failed for {hf_dir}:\n{(proc.stdout + proc.stderr)[-3000:]}")
    shutil.rmtree(cache, ignore_errors=True)

    tokenizer_config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    template_file = hf_dir / "chat_template.jinja"  # where transformers >= 4.56 saves the template
    tokenizer_config.setdefault("chat_template", template_file.read_text() if template_file.exists() else None)
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    shutil.copy(hf_dir / "tokenizer.json", out / "tokenizer.json")
    (out / "chat_template.jinja").unlink(missing_ok=True)

    ids = {t["content"]: t["id"] for t in json.loads((hf_dir / "tokenizer.json").read_text())["added_tokens"]}
    ends = [tokenizer_config["eos_token"]] + [t for t in END_OF_TURN_TOKENS if t in tokenizer_config["chat_template"]]
    genai_config = json.loads((out / "genai_config.json").read_text())
    genai_config["model"]["eos_token_id"] = sorted({ids[t] for t in ends})
    (out / "genai_config.json").write_text(json.dumps(genai_config, indent=4))
    return out


@pytest.fixture(scope="session")
def tiny_llama_export(tiny_llama, tmp_path_factory) -> Path:
    """tiny_llama exported for onnxruntime-genai (fp32, ChatML, stops on <|im_end|>)."""
    return _build_test_export(tiny_llama, tmp_path_factory.mktemp("exports") / "llama-onnx-fp32")


@pytest.fixture(scope="session")
def tiny_phi3_export(tiny_phi3, tmp_path_factory) -> Path:
    """tiny_phi3 exported for onnxruntime-genai (fp32, Phi-3 template, stops on <|end|> and <|endoftext|>)."""
    return _build_test_export(tiny_phi3, tmp_path_factory.mktemp("exports") / "phi3-onnx-fp32")


@pytest.fixture(params=["llama", "phi3"])
def tiny_export(request) -> Path:
    """Both tiny exports, one after the other."""
    return request.getfixturevalue(f"tiny_{request.param}_export")


def _session_run(model_dir: Path, root: Path) -> Path:
    from tests.helpers import tiny_run

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGEFT_HOME", str(root / "home"))
        return tiny_run(model_dir, root)


@pytest.fixture(scope="session")
def tiny_llama_run_session(tiny_llama, tmp_path_factory) -> Path:
    return _session_run(tiny_llama, tmp_path_factory.mktemp("llama-run"))


@pytest.fixture(scope="session")
def tiny_phi3_run_session(tiny_phi3, tmp_path_factory) -> Path:
    return _session_run(tiny_phi3, tmp_path_factory.mktemp("phi3-run"))


@pytest.fixture(params=["llama", "phi3"])
def tiny_run_dir(request, tmp_path) -> Path:
    """A private copy of a finished tiny LoRA run (both architectures), for merge and export tests."""
    source = request.getfixturevalue(f"tiny_{request.param}_run_session")
    return Path(shutil.copytree(source, tmp_path / f"{request.param}-run"))


@pytest.fixture
def tiny_llama_run(tiny_llama_run_session, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_llama_run_session, tmp_path / "llama-run"))


@pytest.fixture(scope="session")
def real_home(tmp_path_factory) -> Path:
    """An EDGEFT_HOME holding the real built-in SmolLM2, fetched once per session.

    Set EDGEFT_TEST_HOME to reuse a cache across sessions (the download is ~93 MB, the conversion ~30 s).
    """
    home = Path(os.environ.get("EDGEFT_TEST_HOME") or tmp_path_factory.mktemp("edgeft-real-home"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGEFT_HOME", str(home))
        from edgeft.models import ensure_builtin

        ensure_builtin("smollm2-135m")
    return home


@pytest.fixture
def smollm2(real_home, monkeypatch) -> Path:
    """The real SmolLM2 folder, with EDGEFT_HOME pointing at the shared session cache."""
    monkeypatch.setenv("EDGEFT_HOME", str(real_home))
    return real_home / "models" / "smollm2-135m"
