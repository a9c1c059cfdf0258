"""Progress a person can see: a tqdm bar on a terminal, and a plain log line at least every 30 s
when stderr is piped (CI logs, `| tee`), so a long stage never looks hung."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

log = logging.getLogger("edgeft")

PIPED_EVERY_S = 30.0
T = TypeVar("T")


def progress(items: Iterable[T], *, desc: str, unit: str, total: int | None = None) -> Iterator[T]:
    """Iterate over `items`, showing how far along it is."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        yield from tqdm(items, desc=desc, unit=unit, total=total, dynamic_ncols=True)
        return
    start = last = time.monotonic()
    for done, item in enumerate(items, start=1):
        yield item
        now = time.monotonic()
        if now - last >= PIPED_EVERY_S:
            of = f"/{total}" if total else ""
            left = f", about {eta(now - start, done, total)} left" if total and done < total else ""
            log.info(f"  {desc}: {done}{of} {unit if done == 1 else plural(unit)} in {now - start:.0f} s{left}")
            last = now


def plural(word: str) -> str:
    return word + ("es" if word.endswith(("ch", "sh", "s", "x")) else "s")


def eta(elapsed: float, done: int, total: int) -> str:
    """The time left at the pace so far, as a person reads it: "40 s", "3 min"."""
    return duration(elapsed / done * (total - done))


def duration(seconds: float) -> str:
    """A time as a person reads it: "40 s", "3 min"."""
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def run_with_heartbeat(cmd: list[str], *, desc: str) -> subprocess.CompletedProcess:
    """subprocess.run(cmd, capture_output=True, text=True), saying every 30 s that it still runs.

    On any exception (Ctrl-C, SIGTERM) the child is killed before the exception goes on.
    """
    start = time.monotonic()
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            while True:
                try:
                    out, err = proc.communicate(timeout=PIPED_EVERY_S)
                    break
                except subprocess.TimeoutExpired:
                    log.info(f"  {desc}: still working ({time.monotonic() - start:.0f} s)")
        except BaseException:
            proc.kill()
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
