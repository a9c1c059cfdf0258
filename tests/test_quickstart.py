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
    """A machine like the reference's, asked the same work, expects the reference's times; a CPU half
    as fast, twice as long for every stage; half the steps halve only the fine-tune, half the
    examples only the evaluation; no native bf16 lengthens the fine-tune alone."""
    from edgeft.quickstart import REFERENCES, expected_seconds

    ref = REFERENCES["vnni"]
    like = {"gflops": ref["gflops"], "bf16": True, "kind": "vnni"}
    steps, examples = 100, 200
    base = expected_seconds(like, steps, examples)
    assert expected_seconds(like, ref["steps"], ref["examples"]) == pytest.approx(ref["stages"])
    assert expected_seconds({**like, "gflops": ref["gflops"] / 2}, steps, examples) == pytest.approx(
        {stage: 2 * seconds for stage, seconds in base.items()}
    )

    def changed(other: dict) -> dict:
        return {
            stage: round(other[stage] / base[stage], 6) for stage in base if other[stage] != pytest.approx(base[stage])
        }

    assert changed(expected_seconds(like, steps // 2, examples)) == {"fine-tune (QLoRA)": 0.5}
    assert changed(expected_seconds(like, steps, examples // 2)) == {"evaluate": 0.5}
    fp32 = changed(expected_seconds({**like, "bf16": False}, steps, examples))
    assert list(fp32) == ["fine-tune (QLoRA)"] and fp32["fine-tune (QLoRA)"] > 1.2  # measured 1.4


def test_the_announced_estimate_follows_the_measured_speed(monkeypatch, caplog):
    """What quickstart prints before any work: the total of the stage estimates for the speed the
    probe measured; a probe three times slower prints a total three times longer."""
    import logging

    from edgeft import quickstart
    from edgeft.progress import duration

    monkeypatch.setattr(logging.getLogger("edgeft"), "propagate", True)  # the CLI turns it off; caplog needs it
    reference = quickstart.REFERENCES["vnni"]["gflops"]

    def announced(gflops: float) -> tuple[float, str]:
        probe = {"gflops": gflops, "bf16": True, "kind": "vnni", "flags": ["avx2", "avx512_vnni"]}
        monkeypatch.setattr(quickstart, "probe_speed", lambda: probe)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="edgeft"):
            expected = quickstart._announce(quickstart.QuickstartConfig())
        return sum(expected.values()), caplog.text

    total, text = announced(reference)
    slow_total, slow_text = announced(reference / 3)
    assert slow_total == pytest.approx(3 * total)
    assert f"Expected: about {duration(total)} on this machine" in text
    assert f"Expected: about {duration(slow_total)} on this machine" in slow_text
    assert f"({reference / 3:.0f} GFLOPS against {reference:.0f})" in slow_text


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
