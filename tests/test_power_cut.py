"""A power cut at any moment: SIGKILL (no handler runs, nothing is cleaned up) at 17 kill points of
`tune` (6), `merge` (3) and `export` (8), then the command a user would run next. It must end with a
usable result, or with one `Error:` line that says what to run and that command working; never a
traceback, a run no command repairs, a hidden temporary folder left behind, or a partial folder
that loads as if whole.

Each kill lands at a known moment: the real CLI runs under tests/paused_cli.py, which stops it in a
named function and says so; the test checks what is on disk at that moment, then kills it.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from edgeft import artifacts
from edgeft.artifacts import Run
from tests.helpers import paused_edgeft, recipes_like, wait_for

# paused_cli.py on a system without renameat2 (or a file system without RENAME_EXCHANGE): a folder
# replaced by --force then takes two renames, and a kill can land between them.
WITHOUT_EXCHANGE = (
    "import runpy, sys; import edgeft.artifacts as a; a._renameat2 = lambda: None; "
    "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)


@pytest.fixture(autouse=True)
def one_torch_thread(monkeypatch):
    """The tiny models gain nothing from more threads, and on a busy machine torch's threads spin
    against each other (a tiny merge: 28 s with two, 6 s with one, on 2 loaded cores)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


# --- the kill and the next command ------------------------------------------------------------


def killed(target: str, call: str, *args, check=None, until_child: str = "", without_exchange: bool = False) -> int:
    """`edgeft ARGS` stopped at the CALL-th call of TARGET (tests/paused_cli.py), `check()` run while
    it waits, then SIGKILLed; returns its pid once it is gone. With `until_child`, it is let go on
    from there until it has started a process of that name, and killed then."""
    launcher = ("-c", WITHOUT_EXCHANGE) if without_exchange else ()
    proc = paused_edgeft(target, call, *args, launcher=launcher)
    seen = proc.seen
    try:
        if check:
            check()
        if until_child:
            proc.stdin.write("go\n")
            proc.stdin.flush()
            wait_for(lambda: _children(proc.pid, until_child), timeout=60)
    finally:
        proc.kill()
        proc.stdout.read()
        code = proc.wait(timeout=60)
    assert code == -signal.SIGKILL, f"edgeft ended with {code}, not by the kill:\n{''.join(seen)[-3000:]}"
    return proc.pid


def edgeft(*args) -> tuple[int, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "edgeft", *map(str, args)], capture_output=True, text=True, check=False
    )
    return proc.returncode, proc.stdout + proc.stderr


def next_command(*args, then: str | None = None) -> str:
    """Run what a user runs next. `then` is None when it must just work; "--force" or a command when
    it must first refuse in one `Error:` line that says so, and that must then work."""
    code, out = edgeft(*args)
    assert "Traceback" not in out, out[-3000:]
    if then is None:
        assert code == 0, f"edgeft {' '.join(map(str, args))} failed ({code}) after the kill:\n{out[-3000:]}"
        return out
    errors = [line for line in out.splitlines() if line.startswith("Error:")]
    assert code != 0 and errors == out.strip().splitlines()[-1:], out[-3000:]  # one line, the last
    assert then in errors[0], f"expected the message to name {then!r}:\n{out[-3000:]}"
    retry = [*args, "--force"] if then == "--force" else then.split()[1:]
    code, out = edgeft(*retry)
    assert code == 0 and "Traceback" not in out, f"edgeft {' '.join(retry)} failed ({code}):\n{out[-3000:]}"
    return out


def hidden_leftovers(run_dir: Path) -> list[Path]:
    """Temporary files and folders (.NAME.XXXX.tmp, .NAME.old-PID) anywhere in the run."""
    return [p for p in run_dir.rglob(".*") if p.name not in artifacts.LOCK_FILES]


def _children(pid: int, name: str) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid), "-f", name], capture_output=True, text=True, check=False)
    return [int(p) for p in found.stdout.split()]


def stale_lock_of(run_dir: Path, pid: int) -> None:
    """The killed command's lock record is still there and names it, but the lock itself went with
    the process: the next command is not blocked."""
    import fcntl

    lock = run_dir / artifacts.LOCK_FILES[0]
    assert f"(pid {pid})" in lock.read_text()
    with open(lock) as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError if still held


def nothing_partial_shows(run_dir: Path) -> None:
    """Right after the kill: every folder a later command reads is whole, or not there at all.
    Looked at through Run(...), not Run.open, which would itself put back a folder left hidden."""
    from edgeft.runtime.engine import check_export

    run = Run(run_dir)
    run.manifest()  # whole JSON
    if run.adapter_dir.exists():
        assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in run.adapter_dir.iterdir()}
    if run.merged_dir.exists():
        assert run.has_merged() and (run.merged_dir / "model.safetensors").is_file()
    for folder in run_dir.glob("onnx-*"):
        assert (folder / "edgeft-export.json").is_file(), f"{folder} has no export record"
        check_export(folder)


# --- tune ---------------------------------------------------------------------------------------

TUNE = ("--method", "lora", "--epochs", "1", "--max-steps", "3", "--save-every", "1")
TUNE += ("--batch-tokens", "128", "--max-seq-len", "64", "--precision", "fp32")


def staged(folder: Path, name: str) -> None:
    assert list(folder.glob(f".{name}.*.tmp")), f"no staged {name} in {folder}: the pause is elsewhere"


def loaded_not_trained(run_dir: Path) -> None:
    assert Run(run_dir).stage("tune")["status"] == "running" and not (run_dir / "checkpoints").exists()


def in_step_two(run_dir: Path) -> None:
    checkpoints = run_dir / "checkpoints"
    assert json.loads((checkpoints / "latest.json").read_text())["step"] == 1
    assert not (checkpoints / "step-000002").exists()


def landed_before_pointer(run_dir: Path) -> None:
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "step-000002" / "state.json").is_file()
    assert json.loads((checkpoints / "latest.json").read_text())["step"] == 1


def adapter_before_done(run_dir: Path) -> None:
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert Run(run_dir).stage("tune")["status"] == "running"


@pytest.mark.parametrize(
    ("target", "call", "on_disk", "follow"),
    [
        # the model loaded, no step yet: no checkpoint, so --resume trains from the start
        ("edgeft.pipeline.tune.loop:loss_head", "1", loaded_not_trained, ("tune", "--resume")),
        ("edgeft.pipeline.tune.loop:train_step", "2", in_step_two, ("tune", "--resume")),
        (
            "edgeft.pipeline.tune.checkpoints:_write_adapter",
            "2",
            lambda run: staged(run / "checkpoints", "step-000002"),
            ("tune", "--resume"),
        ),
        # step 2's checkpoint renamed into place, latest.json still names step 1
        ("edgeft.artifacts:write_json_atomic", r"2:latest\.json$", landed_before_pointer, ("tune", "--resume")),
        # the final adapter half written: merge says training is unfinished and how to finish it
        ("edgeft.pipeline.tune.checkpoints:_write_adapter", "4", lambda run: staged(run, "adapter"), ("merge",)),
        ("edgeft.artifacts:Run.record_stage", "1", adapter_before_done, ("tune", "--resume")),  # the last write
    ],
    ids=["model-loaded", "in-a-step", "checkpoint-staged", "checkpoint-landed", "adapter-staged", "manifest-done"],
)
def test_a_power_cut_during_tune(tmp_path, tiny_llama, target, call, on_disk, follow):
    data = recipes_like(tmp_path / "train.jsonl", n=24)
    held = recipes_like(tmp_path / "eval.jsonl", n=6, seed=1)
    run_dir = tmp_path / "run"
    args = ("tune", "--model", tiny_llama, "--data", data, "--eval-file", held, "--output", run_dir, *TUNE)
    pid = killed(target, call, *args, check=lambda: on_disk(run_dir))
    nothing_partial_shows(run_dir)
    stale_lock_of(run_dir, pid)
    then = f"edgeft tune --resume {run_dir}" if follow == ("merge",) else None
    out = next_command(*follow, run_dir, then=then)
    assert "Fine-tuned" in out, out[-3000:]
    run = Run.open(run_dir)
    assert run.stage("tune")["status"] == "done" and run.stage("tune")["metrics"]["steps"] == 3
    assert (run.adapter_dir / "adapter_model.safetensors").is_file() and not run.checkpoints_dir.exists()
    assert not hidden_leftovers(run_dir), hidden_leftovers(run_dir)


# --- merge --------------------------------------------------------------------------------------


def not_merged(run_dir: Path) -> None:
    assert not list(run_dir.glob(".merged.*")) and not (run_dir / "merged").exists()


def merge_staged(run_dir: Path) -> None:
    staged(run_dir, "merged")
    assert not (run_dir / "merged").exists()


def merge_landed(run_dir: Path) -> None:
    assert Run(run_dir).has_merged() and Run(run_dir).stage("merge") is None


@pytest.mark.parametrize(
    ("target", "call", "on_disk", "then"),
    [
        ("edgeft.pipeline.merge:check_merged", "1", not_merged, None),  # merged in memory, being checked
        # merged/ staged with its weights, its record not written yet
        ("edgeft.artifacts:write_json_atomic", r"1:edgeft-merge\.json$", merge_staged, None),
        # merged/ in place with its own record, the manifest not updated: a finished merge
        ("edgeft.artifacts:Run.record_stage", "1", merge_landed, "--force"),
    ],
    ids=["checking", "merged-staged", "merged-landed"],
)
def test_a_power_cut_during_merge(tiny_llama_run, target, call, on_disk, then):
    pid = killed(target, call, "merge", tiny_llama_run, check=lambda: on_disk(tiny_llama_run))
    nothing_partial_shows(tiny_llama_run)
    stale_lock_of(tiny_llama_run, pid)
    next_command("merge", tiny_llama_run, then=then)
    run = Run.open(tiny_llama_run)
    assert run.has_merged() and run.stage("merge")["status"] == "done"
    assert not hidden_leftovers(tiny_llama_run), hidden_leftovers(tiny_llama_run)


# --- export -------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def merged_run_session(tiny_llama_run_session, tmp_path_factory) -> Path:
    from edgeft.pipeline.merge import merge

    run_dir = Path(shutil.copytree(tiny_llama_run_session, tmp_path_factory.mktemp("merged") / "run"))
    merge(run_dir)
    return run_dir


@pytest.fixture(scope="session")
def exported_run_session(merged_run_session, tmp_path_factory) -> Path:
    from edgeft.export.onnx import ExportConfig, export

    run_dir = Path(shutil.copytree(merged_run_session, tmp_path_factory.mktemp("exported") / "run"))
    export(run_dir, ExportConfig(precision="fp32", verify=False))
    return run_dir


def builders(run_dir: Path) -> list[int]:
    """The model builder processes working on this run."""
    found = subprocess.run(["pgrep", "-f", f"genai_builder.*{run_dir}"], capture_output=True, text=True, check=False)
    return [int(p) for p in found.stdout.split()]


def export_staged(run_dir: Path, precision: str = "fp32") -> None:
    """One staged export folder with the model in it, no export record, nothing in place yet."""
    tmp = list(run_dir.glob(f".onnx-{precision}.*.tmp"))
    assert len(tmp) == 1 and (tmp[0] / "genai_config.json").is_file()
    assert not (tmp[0] / "edgeft-export.json").exists() and not (run_dir / f"onnx-{precision}").exists()


def int4_staged(run_dir: Path) -> None:
    export_staged(run_dir, "int4")


def builder_started(run_dir: Path) -> None:
    """Paused just before the builder starts: its staging folder is there, empty."""
    tmp = list(run_dir.glob(".onnx-int4.*.tmp"))
    assert len(tmp) == 1 and not any(tmp[0].iterdir())


def export_landed(run_dir: Path) -> None:
    assert (run_dir / "onnx-fp32" / "edgeft-export.json").is_file() and Run(run_dir).stage("export") is None


def old_export_in_place(run_dir: Path) -> None:
    staged(run_dir, "onnx-fp32")
    assert (run_dir / "onnx-fp32" / "edgeft-export.json").is_file()


def exchanged(run_dir: Path) -> None:
    """The new export in place, the old one in the hidden folder the new one was staged in."""
    staged(run_dir, "onnx-fp32")
    assert (run_dir / "onnx-fp32" / "edgeft-export.json").is_file()


def between_renames(run_dir: Path) -> None:
    assert not (run_dir / "onnx-fp32").exists() and list(run_dir.glob(".onnx-fp32.old-*"))


INT4 = ("--int4", "--no-verify")
INT4_VERIFIED = ("--int4", "--verify-samples", "2")  # the default gate, on two of the run's prompts
FP32 = ("--fp32", "--no-verify")
FORCE = (*FP32, "--force")


@pytest.mark.parametrize(
    ("source", "target", "call", "flags", "on_disk", "then"),
    [
        # the model builder's process running (it quantizes as it writes)
        ("merged", "edgeft.export.onnx:run_with_heartbeat", "1", INT4, builder_started, None),
        ("merged", "edgeft.export.compact:compact_weights", "1", INT4, int4_staged, None),  # int4 weights reworked
        ("merged", "edgeft.export.verify:OnnxScorer.greedy", "1", INT4_VERIFIED, int4_staged, None),  # verifying
        # the folder staged whole, its export record not written yet
        ("merged", "edgeft.artifacts:write_json_atomic", r"1:edgeft-export\.json$", FP32, export_staged, None),
        ("merged", "edgeft.artifacts:Run.record_stage", "1", FP32, export_landed, "--force"),  # not yet recorded
        # --force over an existing export: the new one staged, the old one still in place
        ("exported", "edgeft.artifacts:_swap_in", "1", FORCE, old_export_in_place, None),
        # --force: swapped in one exchange, the old export not yet removed from the hidden folder
        ("exported", "edgeft.artifacts:shutil.rmtree", r"1:/\.onnx-fp32\.[^/]*\.tmp$", FORCE, exchanged, None),
        # --force without an atomic exchange: the old export renamed away, the new one not yet in
        (
            "exported-no-exchange",
            "edgeft.artifacts:os.replace",
            r"1:/\.onnx-fp32\.[^/]*\.tmp$",
            FORCE,
            between_renames,
            None,
        ),
    ],
    ids=[
        "builder",
        "int4-rework",
        "verifying-int4",
        "export-staged",
        "export-landed",
        "force-before-swap",
        "force-after-exchange",
        "force-between-renames",
    ],
)
def test_a_power_cut_during_export(request, tmp_path, source, target, call, flags, on_disk, then):
    from edgeft.runtime import ChatModel

    fixture = "exported_run_session" if source.startswith("exported") else "merged_run_session"
    run_dir = Path(shutil.copytree(request.getfixturevalue(fixture), tmp_path / "run"))
    before = Run.open(run_dir).stage("export")
    precision = flags[0].lstrip("-")
    pid = killed(
        target,
        call,
        "export",
        run_dir,
        *flags,
        check=lambda: on_disk(run_dir),
        until_child="genai_builder" if on_disk is builder_started else "",  # killed while it runs
        without_exchange="no-exchange" in source,
    )
    # The builder outlives the command (nothing killed it) until its next write to the dead
    # command's pipe: seconds. Let it go before the next command, whose clean-up it could race.
    wait_for(lambda: not builders(run_dir), timeout=60)
    if source.startswith("exported"):
        assert Run(run_dir).stage("export") == before  # the manifest still describes the old export
    nothing_partial_shows(run_dir)
    stale_lock_of(run_dir, pid)
    next_command("export", run_dir, *flags, then=then)
    record = Run.open(run_dir).stage("export")
    assert record["status"] == "done" and record["precision"] == precision and record["path"] == f"onnx-{precision}"
    if flags == INT4_VERIFIED:
        assert record["verification"]["gate"]["passed"]
    answer = ChatModel.load(run_dir / f"onnx-{precision}", threads=1).chat(
        [{"role": "user", "content": "hi"}], max_tokens=4
    )
    assert answer.usage["completion_tokens"] > 0
    assert not hidden_leftovers(run_dir), hidden_leftovers(run_dir)


def test_a_folder_being_staged_is_never_taken_for_an_abandoned_one(tmp_path):
    """The clean-up that removes what a kill left must not remove another command's work in progress."""
    abandoned = tmp_path / ".out.k1ll3d00.tmp"
    abandoned.mkdir()
    with artifacts.staged_dir(tmp_path / "out") as live:
        assert not abandoned.exists()  # no process holds it: removed
        (live / "f").write_text("x")
        artifacts._remove_abandoned(tmp_path / "out")  # as a second command writing `out` would
        assert (live / "f").read_text() == "x"
    assert (tmp_path / "out" / "f").read_text() == "x" and not list(tmp_path.glob(".out.*"))
