import json

import pytest

from edgeft import artifacts
from edgeft.artifacts import Run
from edgeft.errors import DiskSpaceError, RunError


def test_create_writes_manifest(tmp_path):
    run = Run.create(tmp_path / "runs" / "a", base_model="smollm2-135m")
    data = json.loads((tmp_path / "runs" / "a" / "edgeft.json").read_text())
    assert data["schema_version"] == artifacts.SCHEMA_VERSION
    assert data["base_model"] == "smollm2-135m"
    assert data["stages"] == {}
    assert Run.open(run.path).manifest()["base_model"] == "smollm2-135m"


def test_existing_run_needs_force(tmp_path):
    run = Run.create(tmp_path / "r")
    (run.path / "adapter").mkdir()
    with pytest.raises(RunError, match="--force"):
        Run.create(tmp_path / "r")
    Run.create(tmp_path / "r", force=True)
    assert not (run.path / "adapter").exists()


def test_force_never_deletes_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(RunError, match="not an edgeft run"):
        Run.create(tmp_path / "mine", force=True)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


def test_open_errors_name_the_fix(tmp_path):
    with pytest.raises(RunError, match="edgeft tune"):
        Run.open(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(RunError, match="not an edgeft run"):
        Run.open(tmp_path / "plain")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "edgeft.json").write_text("{not json")
    with pytest.raises(RunError, match="not valid JSON"):
        Run.open(tmp_path / "bad")


def test_record_stage_merges_and_stamps(tmp_path):
    run = Run.create(tmp_path / "r")
    run.record_stage("tune", status="running")
    rec = run.record_stage("tune", status="done", metrics={"loss": 1.0})
    assert rec["status"] == "done" and rec["metrics"] == {"loss": 1.0} and "updated_at" in rec
    assert run.stage("tune")["status"] == "done"
    assert run.stage("merge") is None


def test_staged_dir_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(ValueError), artifacts.staged_dir(target) as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise ValueError("boom")
    assert list(tmp_path.iterdir()) == []


def test_staged_dir_replaces_only_with_force(tmp_path):
    target = tmp_path / "out"
    with artifacts.staged_dir(target) as tmp:
        (tmp / "v").write_text("1")
    with pytest.raises(RunError, match="--force"), artifacts.staged_dir(target):
        pass
    with artifacts.staged_dir(target, force=True) as tmp:
        (tmp / "v").write_text("2")
    assert (target / "v").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_json_survives_a_failed_write(tmp_path):
    path = tmp_path / "m.json"
    artifacts.write_json_atomic(path, {"a": 1})
    with pytest.raises(TypeError):
        artifacts.write_json_atomic(path, {"a": object.__new__(type("X", (), {"__str__": None}))})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_disk_space_check(tmp_path):
    with pytest.raises(DiskSpaceError, match="free"):
        artifacts.check_free_space(tmp_path, 10**18, "a huge job")
    artifacts.check_free_space(tmp_path, 1, "a tiny job")


def test_human_size():
    assert artifacts.human_size(999) == "999 B"
    assert artifacts.human_size(1500) == "1.5 KB"
    assert artifacts.human_size(86_300_000) == "86.3 MB"


def test_force_never_deletes_a_run_another_command_is_working_on(tmp_path):
    run = Run.create(tmp_path / "r")
    (run.path / "merged").mkdir()
    with run.lock("merge"), pytest.raises(RunError, match=r"is busy: edgeft merge \(pid \d+\) is working on it"):
        Run.create(tmp_path / "r", force=True)
    assert (run.path / "merged").is_dir() and Run.is_run(run.path)
    Run.create(tmp_path / "r", force=True)  # once it is done, --force starts the run over
    assert not (run.path / "merged").exists()


def test_concurrent_manifest_updates_are_never_lost(tmp_path):
    """eval, bench and quickstart record stages beside a running command: each read-modify-write is
    whole (without the manifest lock, about half of these updates were lost)."""
    import threading

    run = Run.create(tmp_path / "r")

    def writer(prefix):
        for i in range(40):
            Run(run.path).record_stage(f"{prefix}{i}", status="done")

    threads = [threading.Thread(target=writer, args=(p,)) for p in "abc"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(run.manifest()["stages"]) == 120
