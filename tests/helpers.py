"""Small helpers shared by the tests."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from edgeft.cli import cli


def run_cli(*args: str, input: str | None = None, ok: bool = True) -> Result:
    """Invoke the CLI as a user would; by default assert success and show the output if not."""
    result = CliRunner().invoke(cli, [str(a) for a in args], input=input, catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, f"edgeft {' '.join(map(str, args))} failed ({result.exit_code}):\n{result.output}"
    return result


def recipes_like(path, n: int = 24, seed: int = 0):
    """A small chat dataset with a learnable pattern, shaped like the recipe sample."""
    import random

    rng = random.Random(seed)
    words = ["tomato", "onion", "garlic", "salt", "pepper", "basil", "cheese", "egg", "flour", "sugar"]
    with open(path, "w") as f:
        for _ in range(n):
            items = rng.sample(words, 3)
            user = "Ingredients: " + ", ".join(f"2 cups {w}" for w in items)
            messages = [{"role": "user", "content": user}, {"role": "assistant", "content": json.dumps(items)}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


def tiny_run(model_dir, root, **overrides):
    """A finished LoRA run on a tiny model, with eval data: the input of merge and export tests."""
    from edgeft.pipeline.config import TuneConfig
    from edgeft.pipeline.tune import tune

    root.mkdir(parents=True, exist_ok=True)
    cfg = dict(
        model=str(model_dir),
        data=str(recipes_like(root / "train.jsonl")),
        output=str(root / "run"),
        method="lora",
        eval_file=str(recipes_like(root / "eval.jsonl", n=6, seed=1)),
        epochs=1,
        batch_tokens=128,
        max_seq_len=64,
        precision="fp32",
    )
    return tune(TuneConfig(**{**cfg, **overrides}))


def merged(run_dir):
    """The run with its merged model: the input of the export stage (the CLI merges by itself)."""
    from edgeft.pipeline.merge import merge

    merge(run_dir)
    return run_dir


def wait_for(condition, timeout: float = 10) -> None:
    """Poll `condition` until it is true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


class LiveServer:
    """A uvicorn server on a free loopback port, in a background thread."""

    def __init__(self, app, **options):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", **options))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)

    def client(self, api_key: str = "unused", **kwargs):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=30, **kwargs)

    def post(self, body, **kwargs):
        import httpx

        content = body if isinstance(body, (bytes, str)) else json.dumps(body)
        headers = {"Content-Type": "application/json", **kwargs.pop("headers", {})}
        kwargs.setdefault("timeout", 30)
        return httpx.post(f"{self.url}/v1/chat/completions", content=content, headers=headers, **kwargs)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


class SlowModel:
    """A ChatModel whose answers trickle out (20 ms a piece), so tests can act mid-answer.

    The tiny models write thousands of tokens a second: too fast to disconnect in the middle.
    Every stream it hands out is kept, so a test can check how each one ended.
    """

    def __init__(self, model, delay: float = 0.02):
        self.model, self.delay, self.streams, self.calls = model, delay, [], []
        self.name, self.context_length, self.path = model.name, model.context_length, model.path

    def __getattr__(self, name):  # the rest is the model's (what the server reads, BatchDecoder.start)
        return getattr(self.model, name)

    def stream(self, messages, **options):
        stream = SlowStream(self.model.stream(messages, **options), self.delay)
        self.calls.append(messages)
        self.streams.append(stream)
        return stream


class SlowStream:
    def __init__(self, inner, delay):
        self.inner, self.delay = inner, delay

    def __iter__(self):
        for piece in self.inner:
            time.sleep(self.delay)
            yield piece

    def cancel(self):
        self.inner.cancel()

    @property
    def result(self):
        return self.inner.result


def small_config(model, data, out, **kw):
    """A fine-tune of a few seconds on a tiny model: LoRA, fp32, 128-token rows."""
    from edgeft.pipeline.config import TuneConfig

    base = dict(
        model=str(model),
        data=str(data),
        output=str(out),
        method="lora",
        epochs=1,
        batch_tokens=128,
        max_seq_len=64,
        save_every=100,
        precision="fp32",
    )
    return TuneConfig(**{**base, **kw})


PAUSED_CLI = Path(__file__).resolve().parent / "paused_cli.py"


def paused_edgeft(target: str, call, *args, launcher: tuple[str, ...] = ()) -> subprocess.Popen:
    """`edgeft ARGS` in its own process (started as `python LAUNCHER paused_cli.py ...`), returned
    once it waits at the CALL-th call of TARGET (tests/paused_cli.py): a signal sent now lands at
    that moment, not at a guessed one. The lines it printed before are in `proc.seen`."""
    from tests.paused_cli import PAUSED_LINE

    proc = subprocess.Popen(
        [sys.executable, *launcher, str(PAUSED_CLI), target, str(call), *map(str, args)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    proc.seen = []
    for line in proc.stdout:
        if line.rstrip("\n") == PAUSED_LINE:
            return proc
        proc.seen.append(line)
    pytest.fail(f"edgeft ended ({proc.wait()}) before it reached {target}:\n{''.join(proc.seen)[-3000:]}")
