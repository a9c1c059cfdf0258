"""The main job, reduced: quickstart end to end on the real SmolLM2 (a few steps, a few examples)."""

import json

import pytest

from edgeft.artifacts import Run
from tests.helpers import run_cli


@pytest.mark.real
def test_reduced_quickstart_produces_every_artifact(smollm2, tmp_path):
    args = [
        "quickstart",
        "--output",
        tmp_path / "qs",
        "--max-steps",
        "4",
        "--limit",
        "6",
        "--shots",
        "2",
        "--bench-runs",
        "1",
    ]
    # Four steps teach the model nothing yet: its int4 export is the base model's, which drifts (measured
    # +23% perplexity, 11% token agreement against the model as trained). The gate stops the job...
    stopped = run_cli(*args, ok=False)
    assert stopped.exit_code == 3 and "does not behave like the model you trained" in stopped.output
    assert Run.open(tmp_path / "qs").stage("export")["status"] == "drift"
    # ...until the user accepts it, and the report says so.
    out = run_cli(*args, "--allow-drift").output
    assert "Expected: about" in out and "(expected: about" in out
    run = Run.open(tmp_path / "qs")
    stages = run.manifest()["stages"]
    assert [stages[s]["status"] for s in ("tune", "merge", "export", "eval", "bench")] == ["done"] * 5
    assert stages["tune"]["metrics"]["steps"] == 4 and stages["tune"]["metrics"]["tokens_per_second"] > 0
    assert (run.adapter_dir / "adapter_model.safetensors").is_file() and (
        run.merged_dir / "model.safetensors"
    ).is_file()
    for export in ("onnx-int4", "base-onnx-int4"):
        assert (run.path / export / "genai_config.json").is_file()
    assert stages["export"]["verification"]["samples"] > 0
    eval_report = json.loads((run.logs_dir / "eval.json").read_text())
    assert [r["label"] for r in eval_report["rows"]] == [
        "base-onnx-int4 zero-shot (ONNX)",
        "base-onnx-int4 2-shot (ONNX)",
        "base-onnx-int4 + 3 retrieved (ONNX)",
        "qs as trained (PyTorch)",  # no merged row: the merge stage's own check stands for it
        "onnx-int4 (ONNX)",
        "onnx-int4, constrained (ONNX)",  # the recipe answers are JSON: held to their inferred schema
    ]
    *scored, constrained = eval_report["rows"]
    assert all(r["samples"] == 6 and r["perplexity"] > 1 for r in scored)
    assert constrained["constrained"] and constrained["samples"] == 6
    bench = json.loads((run.logs_dir / "bench.json").read_text())
    assert [r["engine"] for r in bench["results"]] == ["genai", "pytorch"] and "error" not in bench["results"][1]
    for png in ("loss.png", "bench.png"):
        assert (run.logs_dir / png).stat().st_size > 5000
    report = (run.path / "report.md").read_text()
    for section in (
        "## What ran",
        "## Does fine-tuning pay off?",
        "Quality bar:",
        "## Training",
        "## Export and verification",
        "## Speed",
    ):
        assert section in report
    assert f"edgeft chat {tmp_path / 'qs'}" in out

    assert "FAILED (accepted with --allow-drift)" in report
    assert "answers as the model as trained: checked by the merge on" in report
    again = run_cli(*args, "--allow-drift")
    assert again.output.count("reusing") == 6  # nothing is redone


def test_the_expected_duration_scales_with_the_machine_and_the_work():
    from edgeft.quickstart import BF16_SPEEDUP, REFERENCE, expected_seconds

    same = expected_seconds({"gflops": REFERENCE["gflops"], "bf16": True}, REFERENCE["steps"], REFERENCE["examples"])
    assert same == pytest.approx(REFERENCE["stages"])
    # half the speed, no bf16, a quarter of the steps and half the examples
    other = expected_seconds({"gflops": REFERENCE["gflops"] / 2, "bf16": False}, REFERENCE["steps"] // 4 + 1, 100)
    tune = REFERENCE["stages"]["fine-tune (QLoRA)"]
    assert other["fine-tune (QLoRA)"] == pytest.approx(tune * 2 * BF16_SPEEDUP * (REFERENCE["steps"] // 4 + 1) / 165)
    assert other["evaluate"] == pytest.approx(REFERENCE["stages"]["evaluate"])  # 2x slower, half the work
    assert other["merge"] == pytest.approx(2 * REFERENCE["stages"]["merge"])
