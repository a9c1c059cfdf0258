"""The task suite's path, reduced: each task shape of samples/ goes through the README's commands
(tune with its defaults but a few steps, export --int4, eval on its hidden test set) and every
command ends with exit 0. The full runs, and their numbers, are benchmarks/task_suite.py's."""

import importlib.util
import json

import pytest

from tests.conftest import REPO

spec = importlib.util.spec_from_file_location("task_suite", REPO / "benchmarks" / "task_suite.py")
task_suite = importlib.util.module_from_spec(spec)
spec.loader.exec_module(task_suite)


@pytest.mark.real
# the recipe sample's path is the quickstart's, which tests/test_quickstart.py runs
@pytest.mark.parametrize("task", sorted(set(task_suite.TASKS) - {"recipes"}))
def test_each_task_shape_goes_the_readme_way(task, smollm2, tmp_path):
    result = task_suite.run_task(task, tmp_path, quick=True)
    log = (tmp_path / f"{task}.log").read_text()
    assert result["exit"] == {"tune": 0, "export": 0, "eval": 0}, log[-3000:]
    assert result["held_out"] > 0 and result["train_examples"] > result["held_out"]  # no eval file: a split
    manifest = json.loads((tmp_path / task / "edgeft.json").read_text())
    verification = manifest["stages"]["export"]["verification"]
    assert verification["exact_match_samples"] == verification["samples"]  # checked on the task's own prompts
    assert None not in (result["as_trained"], result["int4"], result["base"])  # every row answered
    assert result["export"].endswith("int8 attention in blocks of 64/256")  # the layout as the graph has it


@pytest.mark.real
def test_the_preference_sample_goes_the_readme_way(smollm2, tmp_path):
    """samples/returns, reduced: SFT, DPO from it (OpenAI's preference JSONL as is), both exported to
    int4 and evaluated on the test pairs; every command ends with exit 0 and every row has its
    preference score. The full runs' numbers are benchmarks/dpo_sample.py's."""
    spec = importlib.util.spec_from_file_location("dpo_sample", REPO / "benchmarks" / "dpo_sample.py")
    dpo_sample = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dpo_sample)
    result = dpo_sample.run(tmp_path, quick=True)
    assert set(result["exit"].values()) == {0}, (tmp_path / "dpo_sample.log").read_text()[-3000:]
    assert len(result["rows"]) == 4 and all(r["preference_accuracy"] is not None for r in result["rows"])
    assert json.loads((tmp_path / "dpo" / "edgeft.json").read_text())["stages"]["tune"]["config"]["start_from"]
