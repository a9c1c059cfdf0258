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
    from edgeft.quickstart import BF16_SPEEDUP, REFERENCES, expected_seconds

    ref = REFERENCES["vnni"]
    same = expected_seconds({"gflops": ref["gflops"], "bf16": True, "kind": "vnni"}, ref["steps"], ref["examples"])
    assert same == pytest.approx(ref["stages"])
    # half the speed, no bf16, a quarter of the steps and half the examples
    probe = {"gflops": ref["gflops"] / 2, "bf16": False, "kind": "vnni"}
    other = expected_seconds(probe, ref["steps"] // 4 + 1, 100)
    tune = ref["stages"]["fine-tune (QLoRA)"]
    assert other["fine-tune (QLoRA)"] == pytest.approx(tune * 2 * BF16_SPEEDUP * (ref["steps"] // 4 + 1) / 165)
    assert other["evaluate"] == pytest.approx(ref["stages"]["evaluate"])  # 2x slower, half the work
    assert other["merge"] == pytest.approx(2 * ref["stages"]["merge"])


def test_an_avx2_only_machine_is_judged_by_the_avx2_reference(monkeypatch):
    """Its int8 prompt passes take twice as long, which the fp32 probe does not see."""
    import edgeft.cpu
    from edgeft.quickstart import REFERENCES, expected_seconds, probe_speed

    monkeypatch.setattr(edgeft.cpu, "cpu_flags", lambda: ["avx2", "fma"])
    probe = probe_speed()
    assert probe["kind"] == "avx2"
    avx2 = REFERENCES["avx2"]
    expected = expected_seconds({**probe, "gflops": avx2["gflops"], "bf16": False}, avx2["steps"], avx2["examples"])
    assert expected == pytest.approx(avx2["stages"])
    assert expected["evaluate"] > REFERENCES["vnni"]["stages"]["evaluate"] * 1.2  # 1.27 on one machine
    monkeypatch.setattr(edgeft.cpu, "cpu_flags", lambda: ["avx2", "fma", "avx_vnni"])
    assert probe_speed()["kind"] == "vnni"
