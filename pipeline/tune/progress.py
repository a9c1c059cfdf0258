"""What the user sees while training runs: the progress bar (or log lines when piped), Ctrl-C, and
time estimates from this machine's past runs."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path

from edgeft import artifacts, models
from edgeft.cpu import usable_cpus

log = logging.getLogger(__name__)


class Progress:
    """A tqdm bar on a terminal; a log line every ~10% (and at most every 30 s) otherwise.

    Only the main process shows it; its numbers already count every process.
    """

    def __init__(self, total: int, initial: int, *, enabled: bool = True):
        from tqdm.auto import tqdm

        self.total, self.initial, self.enabled = total, initial, enabled
        self.tty = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, disable=not self.tty)
        self.last_log, self.start = 0.0, time.monotonic()
        self.smoothed = None

    def update(self, epoch: int, entry: dict) -> None:
        if not self.enabled:
            return
        self.smoothed = entry["loss"] if self.smoothed is None else 0.9 * self.smoothed + 0.1 * entry["loss"]
        if self.tty:
            self.bar.set_description(f"epoch {epoch + 1}")
            self.bar.set_postfix(
                loss=f"{self.smoothed:.3f}", tok_s=f"{entry['tokens_per_second']:.0f}", lr=f"{entry['lr']:.1e}"
            )
            self.bar.update(1)
            return
        step, now = entry["step"], time.monotonic()
        if step == self.total or now - self.last_log > 30 or step % max(1, self.total // 10) == 0:
            elapsed = now - self.start
            # the steps to come at this process's pace so far (the bar shows its own on a terminal)
            left = elapsed / max(step - self.initial, 1) * (self.total - step)
            log.info(
                f"step {step}/{self.total}  epoch {entry['epoch']:.2f}  loss {self.smoothed:.3f}  "
                f"{entry['tokens_per_second']:.0f} tokens/s  elapsed {elapsed / 60:.1f} min  left {left / 60:.1f} min"
            )
            self.last_log = now

    def close(self) -> None:
        self.bar.close()


class StopFlag:
    """SIGINT/SIGTERM asks the loop to checkpoint and stop at the end of the step; a second Ctrl-C
    stops at once. A SIGTERM after the first signal does not abort: launchers (torchrun) follow a
    Ctrl-C with SIGTERM to every process, and the checkpoint is what the user wants then."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.requested = True
        log.warning("\nStopping after this step and writing a checkpoint (press Ctrl-C again to abort at once)...")

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# --- time estimates ------------------------------------------------------------------------


def _throughput_file() -> Path:
    return models.edgeft_home() / "throughput.json"


def _measured() -> dict:
    """The training speeds measured on this machine; a damaged or foreign file counts as none (it
    only feeds an estimate, and the next finished run writes it anew)."""
    try:
        data = json.loads(_throughput_file().read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, dict) and isinstance(v.get("tokens_per_second"), (int, float)) and v["tokens_per_second"] > 0}  # fmt: skip


def record_throughput(model: str, method: str, device: str, tokens_per_second: float) -> None:
    path = _throughput_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _measured()
    data[f"{model}|{method}|{device}"] = {"tokens_per_second": tokens_per_second, "measured_at": artifacts.now()}
    artifacts.write_json_atomic(path, data)


def estimate_seconds(model: str, model_path: Path, method: str, device: str, tokens: int) -> tuple[float, str]:
    """Training time for `tokens`, from this machine's last measured run when there is one."""
    data = _measured()
    if (known := data.get(f"{model}|{method}|{device}")) is not None:
        return tokens / known["tokens_per_second"], f"measured {known['tokens_per_second']:.0f} tokens/s here"
    # Rough rule from measurements: ~190 tokens/s for a 135M model on 2 CPU cores; scales with 1/params.
    params = _param_count(model_path)
    if device == "cuda":
        rate = 5e13 / params
    else:
        rate = 2.6e10 / params * usable_cpus() / 2
    return tokens / rate, "rough guess; measured after your first run"


def _param_count(model_path: Path) -> float:
    try:
        c = json.loads((Path(model_path) / "config.json").read_text())
        h, layers, vocab = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"]
        return 12 * layers * h * h + vocab * h
    except (OSError, KeyError, ValueError):
        return 1.35e8
