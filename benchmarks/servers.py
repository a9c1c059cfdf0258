"""Starting the servers the serving benchmarks compare, as a user starts them: `edgeft serve` and
llama.cpp's `llama-server`; each is ready when its /health answers 200."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _started(name: str, command: list[str], port: int) -> tuple[subprocess.Popen, str]:
    import httpx

    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if server.poll() is not None:
            raise SystemExit(f"{name} exited with {server.returncode}: {server.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return server, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.kill()
    raise SystemExit(f"{name} did not answer /health within 2 minutes")


def start_server(export: str, *extra: str) -> tuple[subprocess.Popen, str]:
    """`edgeft serve EXPORT --port N *extra`."""
    port = free_port()
    command = [sys.executable, "-m", "edgeft", "serve", export, "--port", str(port), *extra]
    return _started("edgeft serve", command, port)


def start_llama_server(binary: str, gguf: str, *, slots: int, slot_tokens: int, threads: int):
    """llama.cpp's server on `gguf` with `slots` parallel slots of `slot_tokens` tokens each
    (its -c is the whole context, which it splits among the slots), `threads` threads."""
    port = free_port()
    command = [binary, "-m", gguf, "--port", str(port), "-t", str(threads), "-tb", str(threads)]
    command += ["-np", str(slots), "-c", str(slots * slot_tokens), "--no-webui"]
    return _started("llama-server", command, port)


def stop(server: subprocess.Popen) -> None:
    server.terminate()
    server.wait(timeout=30)
