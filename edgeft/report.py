"""report.md for a run: what ran, how long it took, does fine-tuning pay off, how fast is the result.

Everything is read from the run's manifest and logs, so every number is one measured in that run.
"""

from __future__ import annotations

import json
from pathlib import Path

from edgeft import __version__, artifacts
from edgeft.artifacts import Run


def write_report(run: Run, bar: tuple[float, float, float]) -> Path:
    """Write RUN/report.md and return its path."""
    from edgeft.bench import machine

    manifest = run.manifest()
    stages = manifest["stages"]
    timings = manifest.get("quickstart", {}).get("timings", {})
    lines = [
        f"# edgeft report: {run.path.name}",
        "",
        f"Measured on {machine()}, {artifacts.now()[:10]}, edgeft {__version__}. Every number below was measured in this run.",
        "",
        "## What ran",
        "",
        "| stage | time | result |",
        "|---|---:|---|",
        *_stage_rows(run, stages, timings),
        f"| **total** | **{_minutes(sum(timings.values()))}** | |",
        "",
        *_estimate(manifest.get("quickstart", {})),
    ]
    lines += _quality(run, stages.get("eval"), bar)
    lines += _training(run, stages.get("tune", {}))
    lines += _export(stages.get("export"))
    lines += _speed(run, stages.get("bench"))
    lines += [
        "## Use it",
        "",
        "```bash",
        f"edgeft chat {run.path}                 # chat in the terminal",
        f"edgeft serve {run.path}                # OpenAI-compatible API + web page on http://127.0.0.1:8000",
        "```",
        "",
    ]
    path = run.path / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def _estimate(quickstart: dict) -> list[str]:
    """How far the time announced at the start was from the time the stages took."""
    expected, timings = quickstart.get("expected"), quickstart.get("timings", {})
    if not expected or set(expected) != set(timings):
        return []
    took, guessed = sum(timings.values()), sum(expected.values())
    line = (
        f"Announced at the start: about {_minutes(guessed)} ({took / guessed - 1:+.0%} off), from this CPU's "
        "speed at training, fp32 matmuls and ONNX Runtime's int4 kernels against the reference run's."
    )
    return [line, ""]


def _stage_rows(run: Run, stages: dict, timings: dict) -> list[str]:
    rows = []
    tune, merge, export, evaluation, bench = (stages.get(k) for k in ("tune", "merge", "export", "eval", "bench"))
    if tune and tune.get("metrics"):
        m, c = tune["metrics"], tune["config"]
        rows.append(
            f"| fine-tune | {_minutes(timings.get('fine-tune (QLoRA)', m['train_seconds']))} | {c['method']} "
            f"({tune.get('precision', '?')}) on {tune.get('device', '?')}: {m['steps']} steps, {m['train_tokens']:,} tokens "
            f"at {m['tokens_per_second']} tokens/s, peak memory {m.get('peak_memory_mb', '?')} MB |"
        )
    if merge:
        rows.append(
            f"| merge | {_minutes(timings.get('merge', merge['seconds']))} | {merge['path']}/ "
            f"({artifacts.human_size(merge['size_bytes'])}), {merge.get('base_weights', 'original')} base weights, "
            f"{_verdict(merge.get('fidelity'))} |"
        )
    if export:
        rows.append(
            f"| export int4 | {_minutes(timings.get('export int4', export['seconds']))} | {export['path']}/ "
            f"({artifacts.human_size(export['size_bytes'])}, {export['size_bytes'] / export['merged_size_bytes']:.0%} "
            f"of the merged model), {export['backend']} backend, {_verdict(export.get('verification'))} |"
        )
    if "export the base model" in timings:
        rows.append(
            f"| export the base model | {_minutes(timings['export the base model'])} | the same int4 path, for the base rows |"
        )
    if evaluation:
        report = json.loads(Path(evaluation["report"]).read_text())
        stopped = [r for r in report["rows"] if r.get("stopped_early")]
        rows.append(
            f"| evaluate | {_minutes(timings.get('evaluate', 0))} | {report['samples']} held-out examples x "
            f"{len(report['rows']) - len(stopped)} models"
            + (
                f", {stopped[0]['samples']} x {len(stopped)} base rows (no exact match: stopped early)"
                if stopped
                else ""
            )
            + " |"
        )
    if bench:
        rows.append(f"| benchmark | {_minutes(timings.get('benchmark', 0))} | {len(bench['results'])} engines |")
    return rows


def _verdict(check: dict | None) -> str:
    if not check or "gate" not in check:
        return "not checked against the model as trained"
    gate = check["gate"]
    verdict = "passed" if gate["passed"] else ("FAILED (accepted with --allow-drift)" if gate["accepted"] else "FAILED")
    return f"fidelity gate against the model as trained {verdict} (perplexity {check['ppl_change_pct']:+.2f}%)"


def _row(rows: list[dict], match) -> dict | None:
    return next((r for r in rows if match(r)), None)


def _quality(run: Run, evaluation: dict | None, bar: tuple[float, float, float]) -> list[str]:
    if not evaluation:
        return []
    from edgeft.evaluate import table

    report = json.loads(Path(evaluation["report"]).read_text())
    rows = report["rows"]
    lines = [
        "## Does fine-tuning pay off?",
        "",
        (
            f"{report['samples']} held-out examples from `{Path(report['data']).name}`, greedy decoding, exact match of the "
            "answer (JSON compared as parsed data)."
        ),
        "",
        *table(report),
        "",
    ]
    zero = _row(rows, lambda r: r["kind"] == "base" and r["shots"] == 0)
    few = _row(rows, lambda r: r["kind"] == "base" and r["shots"] > 0 and not r.get("retrieved"))
    # a base row that stopped early (no exact match in its random sample) counts at its 95% upper bound
    best_base = max((_at_most(r) for r in rows if r["kind"] == "base"), default=None)
    trained = _row(rows, lambda r: r["kind"] == "as-trained")
    merged = _row(rows, lambda r: r["kind"] == "merged")
    onnx_ft = _row(rows, lambda r: r["kind"] == "fine-tuned" and r["backend"] == "onnx" and not r.get("constrained"))
    if zero and few and trained and onnx_ft:
        gain, drop, stops = bar
        checks = [
            (
                onnx_ft["exact_match"] - best_base >= gain,
                (
                    f"fine-tuned int4 exact match {onnx_ft['exact_match']:.1f}% is at least {gain:.0f} points above every "
                    f"base row: zero-shot {_base_score(zero)}, {few['shots']}-shot {_base_score(few)}"
                    + "".join(
                        f", {r['label']} {_base_score(r)}" for r in rows if r["kind"] == "base" and r.get("retrieved")
                    )
                ),
            ),
            (
                trained["exact_match"] - onnx_ft["exact_match"] <= drop,
                f"int4 ({onnx_ft['exact_match']:.1f}%) is within {drop:.0f} points of the model as trained ({trained['exact_match']:.1f}%)",
            ),
            (
                min(onnx_ft["stop_rate"], trained["stop_rate"]) >= stops,
                (
                    f"the fine-tuned model stops at the end of its turn on "
                    f"{min(onnx_ft['stop_rate'], trained['stop_rate']):.1f}% of prompts (bar: {stops:.0f}%)"
                ),
            ),
        ]
        if merged:
            checks.insert(
                1,
                (
                    trained["exact_match"] - merged["exact_match"] <= drop,
                    (
                        f"the merged model ({merged['exact_match']:.1f}%) is within {drop:.0f} points of the model as "
                        f"trained ({trained['exact_match']:.1f}%)"
                    ),
                ),
            )
        elif merge_check := _merge_check(run):
            checks.insert(1, merge_check)
        lines += [
            "Quality bar: against the model as trained (for QLoRA, the NF4 base + adapter through bitsandbytes and peft).",
            "",
        ]
        lines += [f"- {'PASS' if ok else 'NOT MET'}: {text}" for ok, text in checks]
        lines.append("")
    lines += _cost(run, rows)
    lines += _examples(Path(evaluation["report"]), zero, onnx_ft)
    return lines


def _at_most(row: dict) -> float:
    """A row's exact match, or for a base row that stopped early its 95% upper bound."""
    return (row.get("stopped_early") or {}).get("exact_match_upper95", row["exact_match"])


def _base_score(row: dict) -> str:
    if stop := row.get("stopped_early"):
        return f"{row['exact_match']:.1f}% (at most {stop['exact_match_upper95']:.1f}%, {row['samples']} examples)"
    return f"{row['exact_match']:.1f}%"


def _merge_check(run: Run) -> tuple[bool, str] | None:
    """Without a merged row in the evaluation: the merge stage's own check against the model as trained."""
    check = run.manifest()["stages"].get("merge", {}).get("fidelity")
    if not check or "gate" not in check:
        return None
    same = ""
    if check["greedy_samples"]:
        same = f"{check['identical_generations']}/{check['greedy_samples']} greedy answers identical, "
    text = (
        f"the merged model (the export's source) answers as the model as trained: checked by the merge on "
        f"{check['samples']} held-out prompts, {same}max logit difference {check['max_abs_logit_diff']}, "
        f"perplexity {check['ppl_change_pct']:+.2f}%"
    )
    return check["gate"]["passed"], text


def _cost(run: Run, rows: list[dict]) -> list[str]:
    """What each row costs per request, in one sentence and one chart."""
    from edgeft.evaluate import cost_comparison
    from edgeft.plots import quality_vs_latency

    lines = []
    if sentence := cost_comparison(rows):
        lines += [sentence, ""]
    if quality_vs_latency(rows, run.logs_dir / "quality-latency.png", title="Quality against latency, per model"):
        lines += ["![quality against latency](logs/quality-latency.png)", ""]
    return lines


def _examples(report_path: Path, zero: dict | None, tuned: dict | None, n: int = 2) -> list[str]:
    predictions = report_path.with_suffix(".predictions.jsonl")
    if not (predictions.exists() and zero and tuned):
        return []
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    # the same examples (a base row that stopped early answered only some)
    base = {r.get("example", i): r for i, r in enumerate(r for r in rows if r["model"] == zero["label"])}
    ft = {r.get("example", i): r for i, r in enumerate(r for r in rows if r["model"] == tuned["label"])}
    both = [i for i in base if i in ft][:n]
    lines = ["Two examples:", ""]
    for b, t in ((base[i], ft[i]) for i in both):
        lines += [
            f"- reference: `{t['reference']}`",
            f"  - base model: `{b['prediction'][:160]}{'...' if len(b['prediction']) > 160 else ''}`",
            f"  - fine-tuned int4: `{t['prediction'][:160]}`",
        ]
    return lines + [""]


def _training(run: Run, tune: dict) -> list[str]:
    if not tune.get("metrics"):
        return []
    d, m = tune["data"], tune["metrics"]
    lines = [
        "## Training",
        "",
        f"{d['train_examples']} examples ({d['tokens_per_epoch']:,} tokens per epoch, {d['trained_tokens']:,} of them "
        f"trained: assistant turns and their end-of-turn token), packed without padding. Final train loss "
        f"{m['train_loss']}"
        + (f", eval loss {m['eval_loss']} (perplexity {m['eval_ppl']})." if m.get("eval_loss") is not None else "."),
        "",
    ]
    if (run.logs_dir / "loss.png").exists():
        lines += ["![loss curve](logs/loss.png)", ""]
    return lines


def _export(export: dict | None) -> list[str]:
    if not export or not export.get("verification"):
        return []
    from edgeft.fidelity import table

    return [
        "## Export and verification",
        "",
        "The int4 ONNX model against the model as trained (verification at export time):",
        "",
        "```",
        *table(export["verification"]),
        "```",
        "",
    ]


def _speed(run: Run, bench: dict | None) -> list[str]:
    if not bench:
        return []
    from edgeft.bench import markdown

    report = json.loads(Path(bench["report"]).read_text())
    lines = ["## Speed", "", *markdown(report), ""]
    if (run.logs_dir / "bench.png").exists():
        lines += ["![speed](logs/bench.png)", ""]
    return lines
