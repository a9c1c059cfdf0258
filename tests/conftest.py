"""Shared fixtures: no network, isolated caches, tiny random Llama / Phi-3 checkpoints, the real SmolLM2."""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path

import pytest

from tests.tiny import build_tiny_llama, build_tiny_phi3

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
