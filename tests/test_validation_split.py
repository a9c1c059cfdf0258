"""Held-out data without asking: a run trained without --eval-file holds out a validation split of its
data, trains on the rest, keeps the best checkpoint on it, and every later check uses the user's own
prompts (that split, then training prompts): never the built-in generic ones while there is data."""

import json

import pytest

from edgeft.artifacts import Run
from edgeft.chatdata import load_dataset
from edgeft.evaluate import _example_pool, candidates, evaluate
from edgeft.pipeline.data import MAX_HELD_OUT, MIN_FOR_SPLIT, held_out_count
from edgeft.pipeline.merge import MERGE_CHECK_SAMPLES, merge
from tests.helpers import recipes_like, run_cli


@pytest.mark.parametrize(
    ("examples", "fraction", "held"),
    [(MIN_FOR_SPLIT - 1, 0.1, 0), (MIN_FOR_SPLIT, 0.1, 10), (460, 0.1, 46), (5000, 0.1, MAX_HELD_OUT), (460, 0.0, 0)],
)
def test_how_much_is_held_out(examples, fraction, held):
    assert held_out_count(examples, fraction) == held


def tune_cli(tiny_llama, data, out, *extra):
    return run_cli(
        "tune", "--model", tiny_llama, "--data", data, "--output", out, "--method", "lora", "--epochs", "1",
        "--batch-tokens", "128", "--max-seq-len", "64", "--precision", "fp32", *extra,
    )  # fmt: skip


def test_a_run_without_eval_file_holds_out_a_split_and_is_checked_on_it(tmp_path, tiny_llama, monkeypatch):
    data = recipes_like(tmp_path / "train.jsonl", n=120)
    out = tune_cli(tiny_llama, data, tmp_path / "run", "--eval-every", "4").output
    assert "Validation: 12 of 120 examples held out (--val-split 0.1)" in out  # said before training
    assert "validation  12 examples held out" in out  # and in the summary
    run = Run.open(tmp_path / "run")
    record = run.stage("tune")
    assert record["data"]["train_examples"] == 108 and record["data"]["held_out"]["examples"] == 12
    held = load_dataset(run.held_out_file)
    assert not held.problems and len(held.examples) == 12
    trained_on = {json.dumps(e.messages) for e in load_dataset(data).examples}
    assert all(json.dumps(e.messages) in trained_on for e in held.examples)  # examples of the user's file, as they are
    # eval loss on the split during training, the best step kept and recorded
    evals = [json.loads(line) for line in (run.logs_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["type"] == "eval"]
    assert len(evals) >= 2
    best = min(evals, key=lambda r: r["eval_loss"])
    assert record["metrics"]["best_step"] == best["step"]
    assert run.tune_record().check_files() == [run.held_out_file, data.resolve()]
    # the merge's check: the split's prompts first, then training prompts; every one with the user's answer
    merge(tmp_path / "run")
    check = Run.open(tmp_path / "run").stage("merge")["fidelity"]
    assert check["samples"] == check["exact_match_samples"] == MERGE_CHECK_SAMPLES
    # `edgeft eval RUN` needs no --data: the split is the held-out data
    report = evaluate([str(tmp_path / "run")], limit=3, merged=False)
    assert report["data"] == str(run.held_out_file.resolve()) and report["samples"] == 3
    # GPTQ calibrates on the training data without the split the export's check then uses
    from edgeft.export import gptq
    from edgeft.export.onnx import ExportConfig, export

    calibrated = {}

    def spy(tokenizer, data_file, *args, **kwargs):
        calibrated.update(held_out=kwargs.get("held_out"), ids=original(tokenizer, data_file, *args, **kwargs))
        calibrated["checked"] = original(tokenizer, run.held_out_file)
        return calibrated["ids"]

    original = gptq.calibration_ids
    monkeypatch.setattr(gptq, "calibration_ids", spy)
    export(tmp_path / "run", ExportConfig(verify_samples=2, allow_drift=True))
    assert Run.open(tmp_path / "run").stage("export")["rounding"] == "gptq"
    assert calibrated["held_out"] == run.held_out_file and len(calibrated["checked"]) == 12
    assert not {tuple(x) for x in calibrated["ids"]} & {tuple(x) for x in calibrated["checked"]}


def test_val_split_0_trains_on_everything_and_checks_on_training_prompts(tmp_path, tiny_llama):
    data = recipes_like(tmp_path / "train.jsonl", n=120)
    out = tune_cli(tiny_llama, data, tmp_path / "run", "--val-split", "0").output
    assert "Validation: none (--val-split 0); the merge's and export's checks will use training prompts" in out
    run = Run.open(tmp_path / "run")
    assert run.stage("tune")["data"]["train_examples"] == 120 and not run.held_out_file.exists()
    assert run.tune_record().check_files() == [data.resolve()]
    merge(tmp_path / "run")
    assert Run.open(tmp_path / "run").stage("merge")["fidelity"]["exact_match_samples"] == MERGE_CHECK_SAMPLES
    refused = run_cli("eval", tmp_path / "run", ok=False)
    assert refused.exit_code == 1 and "no held-out data to evaluate on: pass --data FILE" in refused.output


def test_small_data_holds_nothing_out(tmp_path, tiny_llama):
    out = tune_cli(tiny_llama, recipes_like(tmp_path / "train.jsonl", n=24), tmp_path / "run").output
    assert f"Validation: none (fewer than {MIN_FOR_SPLIT} examples)" in out


def test_shots_never_show_a_held_out_answer(tmp_path, tiny_llama):
    """The split is part of the training file: the base model's few-shot examples must skip it."""
    data = recipes_like(tmp_path / "train.jsonl", n=120)
    tune_cli(tiny_llama, data, tmp_path / "run", "--max-steps", "1")
    run = Run.open(tmp_path / "run")
    todo = candidates([str(tmp_path / "run")], shots=3)
    pool = _example_pool(todo, None, run.held_out_file)
    held = {json.dumps(e.messages[-1]["content"]) + json.dumps(e.messages[0]["content"]) for e in load_dataset(run.held_out_file).examples}  # fmt: skip
    assert 100 <= len(pool) <= 120 - 12  # the rest of the file (a copy of a held-out example is left out too)
    assert not [s for s in pool if json.dumps(s.reference) + json.dumps(s.messages[0]["content"]) in held]
