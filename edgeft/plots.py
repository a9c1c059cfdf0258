"""PNG charts for runs and reports (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_curve(rows: list[dict], path: Path, title: str = "") -> Path | None:
    """Training loss per step (raw and smoothed) and eval loss points, from metrics.jsonl rows."""
    train = [r for r in rows if r["type"] == "train"]
    if not train:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    steps, losses = [r["step"] for r in train], [r["loss"] for r in train]
    ax.plot(steps, losses, color="#9ab", linewidth=0.8, label="train loss")
    smooth, value = [], losses[0]
    for loss in losses:
        value = 0.9 * value + 0.1 * loss
        smooth.append(value)
    ax.plot(steps, smooth, color="#1f5f8b", linewidth=1.8, label="train loss (smoothed)")
    evals = [r for r in rows if r["type"] == "eval"]
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", color="#d9534f", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (per trained token)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def quality_vs_latency(rows: list[dict], path: Path, *, title: str) -> Path | None:
    """Each evaluated model as a point: median latency per answer (x, log scale) against exact match."""
    points = [r for r in rows if r.get("latency_p50_s")]
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for r in points:
        color = "#d9534f" if r["kind"] == "fine-tuned" else "#1f5f8b" if r["kind"] == "base" else "#9ab"
        ax.scatter(r["latency_p50_s"], r["exact_match"], s=50, color=color, zorder=3)
        ax.annotate(
            r["label"], (r["latency_p50_s"], r["exact_match"]), fontsize=7, xytext=(5, 4), textcoords="offset points"
        )
    ax.set_xscale("log")
    ax.set_xlabel("median latency per answer, s (log scale)")
    ax.set_ylabel("exact match %")
    ax.set_ylim(-5, 105)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def bar_chart(labels: list[str], values: list[float], path: Path, *, title: str, ylabel: str) -> Path:
    """A simple labelled bar chart (speed and quality comparisons in reports)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    bars = ax.bar(labels, values, color=["#1f5f8b", "#5b9bd5", "#9ab", "#c9d6df", "#d9534f"][: len(values)])
    ax.bar_label(bars, fmt="%.1f")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    plt.setp(ax.get_xticklabels(), rotation=12, ha="right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
