"""The loop's state and its log: what a checkpoint saves, and the metrics file the run keeps."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from edgeft import artifacts


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    next: int = 0  # index of the next step inside the epoch
    tokens: int = 0  # tokens trained on, all processes together
    seconds: float = 0.0
    best_eval_loss: float | None = None
    best_step: int | None = None
    last_eval_step: int | None = None
    evals_since_best: int = 0  # evaluations in a row that did not lower the best eval loss
    stopped_early: bool = False  # --patience ended the run before its last epoch

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainState:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def append_metrics(path: Path, entry: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")


def truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines for steps after the checkpoint (the resumed run writes them again), and a line
    torn by a kill or a full disk; the file is replaced in one rename, never left half-written."""
    if path.exists():
        kept = [json.dumps(row) + "\n" for row in read_metrics(path) if row["step"] <= step]
        artifacts.write_text_atomic(path, "".join(kept))


def read_metrics(path: Path) -> list[dict]:
    """The metrics log; a line that is not a whole JSON object (torn by a kill) is skipped."""
    rows = []
    for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def summarise(state: TrainState, metrics_path: Path) -> dict:
    rows = read_metrics(metrics_path)
    train = [r for r in rows if r["type"] == "train"]
    evals = [r for r in rows if r["type"] == "eval"]
    tail = train[-10:]
    return {
        "steps": state.step,
        "train_tokens": state.tokens,
        "train_seconds": round(state.seconds, 1),
        "tokens_per_second": round(state.tokens / state.seconds, 1) if state.seconds else None,
        "train_loss": round(sum(r["loss"] for r in tail) / len(tail), 4) if tail else None,
        "eval_loss": round(evals[-1]["eval_loss"], 4) if evals else None,
        "eval_ppl": round(evals[-1]["eval_ppl"], 3) if evals else None,
        "best_eval_loss": round(state.best_eval_loss, 4) if state.best_eval_loss is not None else None,
        "best_step": state.best_step,
        "stopped_early": state.stopped_early,
        **_preference_metrics(evals, state.best_step),
    }


def _preference_metrics(evals: list[dict], best_step: int | None) -> dict:
    """A DPO run's held-out preference accuracy and reward margin, at the checkpoint kept."""
    kept = [e for e in evals if e.get("eval_reward_accuracy") is not None]
    if not kept:
        return {}
    best = next((e for e in reversed(kept) if e["step"] == best_step), kept[-1])
    return {
        "eval_reward_accuracy": round(best["eval_reward_accuracy"], 4),
        "eval_reward_margin": round(best["eval_reward_margin"], 4),
    }
