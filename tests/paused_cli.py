"""Run by tests/test_hardening.py and tests/test_power_cut.py: the edgeft CLI in its own process, with
one function made to stop and say so, so a test sends its signal at a known moment instead of after
a guessed sleep.

    python tests/paused_cli.py MODULE:ATTRIBUTE CALL EDGEFT_ARGS...

The CALL-th call (from 1) of MODULE.ATTRIBUTE (ATTRIBUTE may be dotted: Run.record_stage) prints
PAUSED_LINE on stdout and waits for a line on stdin; then the real function runs. CALL may be
`N:PATTERN`: then only the calls whose first argument, as a string, matches the regular expression
PATTERN count (write_json_atomic, say, paused for one file of many). Everything else is the real
command, with the CLI's own signal handlers: a SIGTERM that makes it raise lands in the wait
(inside the paused function), one that only sets a flag lets the function go on once released.
"""

from __future__ import annotations

import functools
import importlib
import re
import sys

PAUSED_LINE = "edgeft-test: paused"


def pause_at(target: str, call: int, pattern: str | None = None) -> None:
    module_name, attribute = target.split(":")
    *owners, name = attribute.split(".")
    owner = importlib.import_module(module_name)
    for part in owners:
        owner = getattr(owner, part)
    real, calls = getattr(owner, name), 0

    @functools.wraps(real)
    def paused(*args, **kwargs):
        nonlocal calls
        if pattern is not None and not (args and re.search(pattern, str(args[0]))):
            return real(*args, **kwargs)
        calls += 1
        if calls == call:
            print(PAUSED_LINE, flush=True)
            sys.stdin.readline()
        return real(*args, **kwargs)

    setattr(owner, name, paused)


if __name__ == "__main__":
    call, _, pattern = sys.argv[2].partition(":")
    pause_at(sys.argv[1], int(call), pattern or None)
    from edgeft.cli import main

    sys.argv = ["edgeft", *sys.argv[3:]]
    main()
