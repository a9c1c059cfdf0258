"""Piped runs (CI logs, `| tee`) see a line at least every PIPED_EVERY_S, and never a stuck screen."""

import logging
import sys
import time

import pytest

from edgeft import progress as progress_module
from edgeft.progress import progress, run_with_heartbeat


@pytest.fixture
def lines():
    """What the edgeft logger says (the CLI may have stopped it from propagating to pytest's handler)."""
    said = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    logger = logging.getLogger("edgeft")
    logger.addHandler(handler)
    old_level, logger.level = logger.level, logging.INFO
    yield said
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def test_piped_progress_says_how_far_along(monkeypatch, lines):
    monkeypatch.setattr(progress_module, "PIPED_EVERY_S", 0.05)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    seen = []
    for item in progress(range(6), desc="evaluating", unit="example"):
        time.sleep(0.03)
        seen.append(item)
    assert seen == list(range(6))
    said = [line for line in lines if "evaluating:" in line]
    assert said and all("/6 example" in line for line in said)
    assert all(" left" in line for line in said if "6/6" not in line)  # an estimate of the rest


def test_eta_reads_like_a_person_would_say_it():
    from edgeft.progress import eta

    assert eta(10, 1, 5) == "40 s"
    assert eta(60, 1, 5) == "4 min"


def test_units_are_counted_in_english():
    from edgeft.progress import plural

    assert [plural(u) for u in ("batch", "example", "layer", "engine")] == ["batches", "examples", "layers", "engines"]


def test_a_long_subprocess_has_a_heartbeat(monkeypatch, lines):
    monkeypatch.setattr(progress_module, "PIPED_EVERY_S", 0.1)
    proc = run_with_heartbeat([sys.executable, "-c", "import time; time.sleep(0.5); print('done')"], desc="builder")
    assert proc.returncode == 0 and proc.stdout.strip() == "done"
    assert any("builder: still working" in line for line in lines)
