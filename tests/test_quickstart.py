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
    assert "Expected: about" in out and "(expected: about" in out and "left at this pace" in out
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
    recorded = run.manifest()["quickstart"]
    assert set(recorded["expected"]) == set(recorded["timings"]) and recorded["probe"]["onnx_decode"] > 0
    took, guessed = sum(recorded["timings"].values()), sum(recorded["expected"].values())
    assert f"({took / guessed - 1:+.0%} off)" in report
    assert "answers as the model as trained: checked by the merge on" in report
    again = run_cli(*args, "--allow-drift")
    assert again.output.count("reusing") == 6  # nothing is redone


def changed(other: dict, base: dict) -> dict:
    """The stages whose expected time differs from `base`, and by what factor."""
    return {stage: round(other[stage] / base[stage], 6) for stage in base if other[stage] != pytest.approx(base[stage])}


def test_the_expected_duration_scales_with_the_machine_and_the_work():
    """A machine that probes like the reference's, asked the same work, expects the reference's
    times (its base rows cut to their sample); every probe half as fast, twice as long for every
    stage; half the steps halve only the fine-tune, fewer examples shorten only the evaluation (in
    proportion below the base rows' sample); slower training kernels lengthen only the
    fine-tune, and slower int4 kernels only the stages that run ONNX Runtime, each by less than the
    kernels slowed (a stage spends only part of its time in them)."""
    from edgeft.evaluate import BASE_SAMPLE
    from edgeft.quickstart import REFERENCE, STAGE_PROBES, expected_seconds

    like = dict(REFERENCE["probe"])
    steps, examples = 100, 200
    base = expected_seconds(like, steps, examples)
    # the reference machine and work: the reference run's times, but for its base rows, which now
    # answer BASE_SAMPLE of the 200 examples
    stages = dict(REFERENCE["stages"])
    stages["evaluate"] -= REFERENCE["evaluate_base_rows"] * (1 - BASE_SAMPLE / REFERENCE["examples"])
    assert expected_seconds(like, REFERENCE["steps"], REFERENCE["examples"]) == pytest.approx(stages)
    few = BASE_SAMPLE // 2  # below the base rows' sample every row answers every example
    assert changed(expected_seconds(like, steps, few), expected_seconds(like, steps, 2 * few)) == {"evaluate": 0.5}
    assert expected_seconds({k: v / 2 for k, v in like.items()}, steps, examples) == pytest.approx(
        {stage: 2 * seconds for stage, seconds in base.items()}
    )

    assert changed(expected_seconds(like, steps // 2, examples), base) == {"fine-tune (QLoRA)": 0.5}
    fewer = changed(expected_seconds(like, steps, examples // 2), base)  # the base rows' part stays
    assert list(fewer) == ["evaluate"] and 0.5 < fewer["evaluate"] < 1
    slow_training = changed(expected_seconds({**like, "train": like["train"] / 1.4}, steps, examples), base)
    assert list(slow_training) == ["fine-tune (QLoRA)"] and 1 < slow_training["fine-tune (QLoRA)"] < 1.4
    slow_onnx = changed(expected_seconds({**like, "onnx_prompt": like["onnx_prompt"] / 2}, steps, examples), base)
    assert set(slow_onnx) == {stage for stage, probes in STAGE_PROBES.items() if probes.get("onnx_prompt")}
    assert {"evaluate", "export int4", "benchmark"} <= set(slow_onnx)
    assert all(1 < ratio < 2 for ratio in slow_onnx.values())


def test_the_announced_estimate_follows_the_measured_speed(monkeypatch, caplog):
    """What quickstart prints before any work: the total of the stage estimates for the speeds the
    probe measured, and those speeds beside the reference's; a machine three times slower at
    everything prints a total three times longer."""
    import logging

    from edgeft import quickstart
    from edgeft.progress import duration

    monkeypatch.setattr(logging.getLogger("edgeft"), "propagate", True)  # the CLI turns it off; caplog needs it
    reference = quickstart.REFERENCE["probe"]

    def announced(slower: float) -> tuple[float, str]:
        probe = {k: v / slower for k, v in reference.items()}
        probe.update(bf16=True, flags=["avx2", "avx512_vnni"])
        monkeypatch.setattr(quickstart, "probe_speed", lambda: probe)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="edgeft"):
            expected, _ = quickstart._announce(quickstart.QuickstartConfig())
        return sum(expected.values()), caplog.text

    total, text = announced(1)
    slow_total, slow_text = announced(3)
    assert slow_total == pytest.approx(3 * total)
    assert f"Expected: about {duration(total)} on this machine" in text
    assert f"Expected: about {duration(slow_total)} on this machine" in slow_text
    assert f"fp32 {reference['fp32'] / 3:.0f} GFLOPS ({reference['fp32']:.0f})" in slow_text
    assert "flags: avx2 avx512_vnni" in slow_text


def test_what_is_left_follows_the_pace_of_the_stages_that_ran():
    """After each stage the rest is re-estimated: a fine-tune that took 1.25x its estimate makes
    the stages to come 1.25x theirs (the probe at the start cannot see a machine that slows later);
    reused stages say nothing about the pace, and nothing is said after the last stage."""
    from edgeft.quickstart import time_left

    expected = {"fine-tune": 480.0, "merge": 30.0, "evaluate": 420.0}
    timings = {"fine-tune": 600.0, "merge": 30.0}
    line = time_left(expected, timings, ["fine-tune"], ["merge", "evaluate"])
    assert line == " (expected 8 min); about 9 min left at this pace (1.25x the estimate)"  # 1.25 x 450 s
    assert "(1.24x the estimate)" in time_left(expected, timings, ["fine-tune", "merge"], ["evaluate"])  # 630 / 510
    assert time_left(expected, timings, [], ["merge", "evaluate"]) == ""
    assert time_left(expected, timings, ["fine-tune", "merge"], []) == ""


def test_the_probe_measures_the_kernels_the_stages_run():
    """Each probe runs here and gives a speed; the ONNX probe runs int4 and int8 MatMulNBits, and a
    single-token pass is faster than a 512-token one."""
    from edgeft.quickstart import _onnx_probe_model, probe_speed

    probe = probe_speed()
    assert all(probe[k] > 0 for k in ("train", "fp32", "onnx_prompt", "onnx_decode"))
    assert probe["onnx_decode"] > probe["onnx_prompt"] / 512
    bits = sorted(attr.i for node in _onnx_probe_model().graph.node for attr in node.attribute if attr.name == "bits")
    assert bits == [4] * 4 + [8] * 4


def test_the_bar_counts_a_base_row_that_stopped_early_at_its_upper_bound(tmp_path):
    """A base row that matched none of its random sample scored 0.0 on few examples: the gain the
    bar asks for is measured from its 95% upper bound, and the report says both."""
    from edgeft.artifacts import Run
    from edgeft.evaluate import upper_bound_95
    from edgeft.report import _quality

    run = Run.create(tmp_path / "run")

    def row(label, kind, exact, shots=0, samples=200, **extra):
        return dict(
            label=label, kind=kind, backend="onnx", shots=shots, exact_match=exact, token_f1=exact, json_valid=None,
            perplexity=None, stop_rate=99.0, latency_s=0.1, tokens_per_second=10.0, samples=samples, **extra
        )  # fmt: skip

    def bar(samples: int) -> list[str]:
        stop = {"examples": 200, "exact_match_upper95": round(upper_bound_95(samples), 1)}
        rows = [row("zero", "base", 0.0, samples=samples, stopped_early=stop), row("few", "base", 0.0, shots=3)]
        rows += [row("as trained", "as-trained", 72.0), row("int4", "fine-tuned", 70.0)]
        report = tmp_path / "eval.json"
        report.write_text(json.dumps({"samples": 200, "data": "eval.jsonl", "rows": rows}))
        return [line for line in _quality(run, {"report": str(report)}, (40.0, 3.0, 95.0)) if "above every" in line]

    assert bar(50) == [
        (
            "- PASS: fine-tuned int4 exact match 70.0% is at least 40 points above every base row: "
            "zero-shot 0.0% (at most 5.8%, 50 examples), 3-shot 0.0%"
        )
    ]
    assert bar(6)[0].startswith("- NOT MET:")  # 0 of 6 allows up to 39.3%: 70 is not 40 above that
