"""Training data checks: read with edgeft.chatdata, check every example, count and report.

The checks follow OpenAI's fine-tuning data preparation: each problem is reported with its line.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from edgeft.chatdata import IGNORE, ChatRenderer, Dataset, Example, Problem, Tokenized, end_of_turn_for, load_dataset
from edgeft.errors import DataError

# --- statistics ---------------------------------------------------------------------------


@dataclass
class DataStats:
    examples: int
    usable: int  # examples with at least one trained token after truncation
    tokens_min: int
    tokens_median: float
    tokens_p90: float
    tokens_max: int
    trained_tokens: int
    truncated: int
    tokens_per_epoch: int

    @classmethod
    def of(cls, tokenized: list[Tokenized]) -> DataStats:
        lengths = sorted(t.length_before_truncation for t in tokenized) or [0]
        return cls(
            examples=len(tokenized),
            usable=sum(t.trained > 0 for t in tokenized),
            tokens_min=lengths[0],
            tokens_median=statistics.median(lengths),
            tokens_p90=lengths[min(len(lengths) - 1, math.ceil(0.9 * len(lengths)) - 1)],
            tokens_max=lengths[-1],
            trained_tokens=sum(t.trained for t in tokenized),
            truncated=sum(t.length_before_truncation > len(t.input_ids) for t in tokenized),
            tokens_per_epoch=sum(len(t.input_ids) for t in tokenized if t.trained),
        )


def split_validation(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out a deterministic fraction of the examples (at least one, if any are asked for)."""
    import random

    if fraction <= 0 or len(examples) < 2:
        return examples, []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(examples) * fraction))
    held = set(order[:n_val])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


# --- the report `edgeft data check` prints and `edgeft tune` refuses bad data with ----------


@dataclass
class DataReport:
    dataset: Dataset
    tokenized: list[Tokenized]
    stats: DataStats | None
    problems: list[Problem]

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def usable(self) -> list[Tokenized]:
        """Examples with at least one trained target after truncation."""
        return [t for t in self.tokenized if any(label != IGNORE for label in t.labels[1:])]

    def lines(self, max_seq_len: int, max_problems: int = 20) -> list[str]:
        d = self.dataset
        how = "detected" if d.detected else "forced"
        out = [f"{d.path}: {len(d.examples)} valid example(s), format {d.format} ({how})"]
        if self.stats:
            s = self.stats
            out += [
                f"  tokens per example   min {s.tokens_min}  median {s.tokens_median:.0f}  p90 {s.tokens_p90:.0f}  max {s.tokens_max}",
                f"  trained tokens       {s.trained_tokens:,} (assistant turns and their end-of-turn token)",
                f"  longer than {max_seq_len:<8} {s.truncated} (truncated to {max_seq_len} tokens)",
                f"  tokens per epoch     {s.tokens_per_epoch:,}",
            ]
        if self.problems:
            out.append(f"{len(self.problems)} problem(s):")
            out += [f"  {p}" for p in self.problems[:max_problems]]
            if len(self.problems) > max_problems:
                out.append(f"  ... and {len(self.problems) - max_problems} more")
        return out


def check_data(
    path: str | Path, tokenizer, *, fmt: str = "auto", max_seq_len: int = 1024, train_on_prompt: bool = False
) -> DataReport:
    """Everything `edgeft data check` reports: format problems by line, then token statistics."""
    dataset = load_dataset(path, fmt)
    problems = list(dataset.problems)
    if not dataset.examples:
        if not problems:
            problems.append(Problem("file", "no examples found"))
        return DataReport(dataset, [], None, problems)
    if dataset.format != "text" and not tokenizer.chat_template:
        problems.append(
            Problem(
                "model",
                "the tokenizer has no chat template, so chat data cannot be rendered; use --format text or a chat model",
            )
        )
        return DataReport(dataset, [], None, problems)
    eot = None if dataset.format == "text" else end_of_turn_for(tokenizer)
    renderer = ChatRenderer(tokenizer, eot, train_on_prompt=train_on_prompt, max_seq_len=max_seq_len)
    tokenized = []
    for example in dataset.examples:
        try:
            tokenized.append(renderer.tokenize(example))
        except DataError as e:
            problems.append(Problem(example.where, str(e).split(": ", 1)[-1]))
    report = DataReport(dataset, tokenized, DataStats.of(tokenized), problems)
    if tokenized and not report.usable:
        problems.append(
            Problem(
                "file", f"no example has a trained token within the first {max_seq_len} tokens; raise --max-seq-len"
            )
        )
    return report
