"""Piped runs (CI logs, `| tee`) see a line at least every PIPED_EVERY_S, and never a stuck screen."""

import logging
import sys
import time

from edgeft import progress as progress_module
from edgeft.progress import progress, run_with_heartbeat


def test_piped_progress_says_how_far_along(monkeypatch, caplog):
    monkeypatch.setattr(progress_module, "PIPED_EVERY_S", 0.05)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    caplog.set_level(logging.INFO, logger="edgeft")
    seen = []
    for item in progress(range(6), desc="evaluating", unit="example"):
        time.sleep(0.03)
        seen.append(item)
    assert seen == list(range(6))
    lines = [r.message for r in caplog.records if "evaluating:" in r.message]
    assert lines and all("/6 example" in line for line in lines)


def test_a_long_subprocess_has_a_heartbeat(monkeypatch, caplog):
    monkeypatch.setattr(progress_module, "PIPED_EVERY_S", 0.1)
    caplog.set_level(logging.INFO, logger="edgeft")
    proc = run_with_heartbeat([sys.executable, "-c", "import time; time.sleep(0.5); print('done')"], desc="builder")
    assert proc.returncode == 0 and proc.stdout.strip() == "done"
    assert any("builder: still working" in r.message for r in caplog.records)
