"""Training data checks: read with edgeft.chatdata, check every example, count and report.

The checks follow OpenAI's fine-tuning data preparation: each problem is reported with its line.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from edgeft import toolcalls
from edgeft.chatdata import ChatRenderer, Dataset, Example, Pair, Problem, Tokenized, end_of_turn_for, load_dataset
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
    def of(cls, tokenized: list[Tokenized] | list[Pair]) -> DataStats:
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


# A validation split is held out by default only from data this large; it never takes more than
# MAX_HELD_OUT examples (enough for a steady loss and the checks' exact match, cheap to score).
MIN_FOR_SPLIT = 100
MAX_HELD_OUT = 200


def held_out_count(examples: int, fraction: float) -> int:
    """How many of `examples` a validation split of `fraction` holds out: none below MIN_FOR_SPLIT
    examples, at most MAX_HELD_OUT."""
    if fraction <= 0 or examples < MIN_FOR_SPLIT:
        return 0
    return min(MAX_HELD_OUT, max(1, round(examples * fraction)))


def split_validation(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """Hold out a deterministic random part of `items` (held_out_count of them), both parts in file order."""
    import random

    n_val = held_out_count(len(items), fraction)
    if not n_val:
        return items, []
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_val])
    return [e for i, e in enumerate(items) if i not in held], [items[i] for i in sorted(held)]


def write_examples(path: Path, examples: list[Example]) -> None:
    """Chat examples as a JSONL file any command reads back (written whole, or not at all)."""
    import json

    from edgeft.artifacts import write_text_atomic

    path.parent.mkdir(parents=True, exist_ok=True)

    def saved(m: dict) -> dict:  # a weight only where it says "not trained", as the format allows
        return {
            "role": m["role"],
            "content": m["content"],
            **({"weight": 0} if m["role"] == "assistant" and not m["weight"] else {}),
        }

    lines = [json.dumps({"messages": [saved(m) for m in e.messages]}, ensure_ascii=False) for e in examples]
    write_text_atomic(path, "\n".join(lines) + "\n")


# --- the report `edgeft data check` prints and `edgeft tune` refuses bad data with ----------


@dataclass
class DataReport:
    dataset: Dataset
    tokenized: list[Tokenized] | list[Pair]  # Pairs for preference data
    stats: DataStats | None
    problems: list[Problem]
    shown: str = ""  # one example as the model sees it, trained text marked (see `marked`)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def usable(self) -> list[Tokenized] | list[Pair]:
        """Examples with at least one trained target after truncation (in both answers of a pair)."""
        return [t for _, t in self.usable_examples]

    @property
    def usable_examples(self) -> list[tuple[Example, Tokenized | Pair]]:
        """The usable examples, each with its tokens."""
        return [(e, t) for e, t in zip(self.dataset.examples, self.tokenized) if t.learns]

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
        if self.shown and not self.problems:
            out += ["", *self.shown.splitlines(), ""]
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
    controls = _control_tokens(tokenizer) if dataset.format != "text" else []
    for example in dataset.examples:
        if forged := _written_control(example, controls):
            problems.append(forged)
            continue
        try:
            chosen = renderer.tokenize(example)
            if example.rejected is not None:  # preference data: the answer not preferred, after the same prompt
                chosen = Pair(chosen, renderer.tokenize(Example(example.where, example.rejected)))
            tokenized.append(chosen)
        except DataError as e:
            problems.append(Problem(example.where, str(e).split(": ", 1)[-1]))
    report = DataReport(dataset, tokenized, DataStats.of(tokenized), problems, _shown(renderer, dataset.examples))
    if tokenized and not report.usable:
        problems.append(
            Problem(
                "file", f"no example has a trained token within the first {max_seq_len} tokens; raise --max-seq-len"
            )
        )
    return report


def _control_tokens(tokenizer) -> list[str]:
    """The tokenizer's special tokens: the chat template's own markers (<|im_start|>, <|im_end|>, ...)."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return sorted(
        {t.content for t in added.values() if getattr(t, "special", False)} | set(tokenizer.all_special_tokens)
    )


def _written_control(example: Example, controls: list[str]) -> Problem | None:
    """A message whose text holds a control token: it would be trained as the token (a turn that ends,
    a turn that opens), not as text. Only the chat template writes those."""
    for i, m in enumerate(example.messages, start=1):
        if found := next((t for t in controls if t in m["content"]), None):
            return Problem(
                example.where,
                f"message {i} contains {found!r}, a control token of the model's chat format: it would be read as "
                "the token, not as text. Remove it or write it another way.",
            )
    return None


SHOWN_CHARS = 2500  # a longer example is cut in the middle of what `data check` shows


def _shown(renderer: ChatRenderer, examples: list[Example]) -> str:
    """One example (the first that calls a tool, else the first) rendered as the model sees it, its
    trained text marked."""
    example = next((e for e in examples if any(toolcalls.CALL_OPEN in m["content"] for m in e.messages)), None)
    example = example or examples[0]
    try:
        text, spans = renderer.spans(example)
    except DataError:
        return ""
    shown = marked(text, spans)
    if len(shown) > SHOWN_CHARS:
        shown = f"{shown[: SHOWN_CHARS // 2]}\n[... {len(shown) - SHOWN_CHARS:,} characters ...]\n{shown[-SHOWN_CHARS // 2 :]}"
    body = "\n".join(f"    {line}" for line in shown.splitlines())
    return f"  {example.where} as the model sees it; trained text between {TRAINED[0]} and {TRAINED[1]}:\n{body}"


TRAINED = ("⟦", "⟧")  # the marks around trained text in `data check`'s example


def marked(text: str, spans: list[tuple[int, int]]) -> str:
    """`text` with each trained span between the TRAINED marks."""
    out, cursor = [], 0
    for start, end in sorted(spans):
        out += [text[cursor:start], TRAINED[0], text[start:end], TRAINED[1]]
        cursor = end
    return "".join(out) + text[cursor:]
