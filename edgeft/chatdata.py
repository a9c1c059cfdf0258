"""Chat data and the chat-format rules every stage shares.

Reading: four formats, all normalized to chat messages (plain text excepted):
- chat:       {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": "...", "weight": 0|1}]}
              OpenAI's fine-tuning format in full: `tools` (or `functions`) on the example, assistant
              `tool_calls`, `tool` results, `parallel_tool_calls` (rendered by edgeft.toolcalls)
- alpaca:     {"instruction": "...", "input": "...", "output": "..."}  (input and system optional)
- completion: {"prompt": "...", "completion": "..."}
- text:       {"text": "..."}  (continued pre-training: every token is trained)
Each problem is reported with its line. Rules: the token that ends an assistant turn, the ids a
model stops on, rendering with the model's chat template (and which tokens are trained), and the
(prompt, reference answer) pairs held-out data gives.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeft import toolcalls
from edgeft.errors import DataError

# Tokens that close an assistant turn in the chat formats we know, most specific first.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|end|>", "<|eot_id|>", "<end_of_turn>", "<|endoftext|>", "</s>")


FORMATS = ("chat", "alpaca", "completion", "text", "preference")
ROLES = ("system", "user", "assistant", "tool")
MESSAGE_KEYS = {"role", "content", "weight", "name", "tool_calls", "tool_call_id", "function_call"}
MAX_EXAMPLE_BYTES = 8_000_000  # one example this large is a data bug; it would be truncated anyway
IGNORE = -100  # label that the loss skips

# Keys that identify each format, in detection order.
SIGNATURES = {
    "preference": ("preferred_output", "non_preferred_output"),  # OpenAI's preference (DPO) format
    "preference-pairs": ("prompt", "chosen", "rejected"),  # TRL's and most tools' (read as "preference")
    "chat": ("messages",),
    "alpaca": ("instruction", "output"),
    "completion": ("prompt", "completion"),
    "text": ("text",),
}


@dataclass
class Problem:
    where: str  # "line 7" (JSONL) or "item 7" (JSON array)
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass
class Example:
    where: str
    messages: list[dict] = field(default_factory=list)
    text: str | None = None  # set for the plain-text format
    tools: list[dict] = field(default_factory=list)  # the functions it declares (see edgeft.toolcalls)
    # preference data: `messages` is the prompt and the preferred answer, `rejected` the prompt and
    # the answer not preferred (each answer the last message, the only one trained)
    rejected: list[dict] | None = None


@dataclass
class Dataset:
    path: Path
    format: str
    detected: bool
    examples: list[Example]
    problems: list[Problem]
    sha256: str


# --- reading -----------------------------------------------------------------------------


def load_dataset(path: str | Path, fmt: str = "auto") -> Dataset:
    """Read and check a data file. Content problems are collected, not raised; unreadable files raise."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if path.is_dir():
        raise DataError(f"{path} is a directory; pass a .jsonl or .json file.")
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(f"{path} is empty. Add one JSON object per line (see samples/ for examples).")
    records, problems = _parse(raw, path)
    detected = fmt == "auto"
    if detected:
        fmt = _detect(records)
        if fmt is None:
            problems.append(
                Problem(
                    "file",
                    "cannot detect the format: expected 'messages' (chat), 'instruction'+'output' "
                    "(alpaca), 'prompt'+'completion', 'text', or 'preferred_output'+'non_preferred_output' "
                    "or 'prompt'+'chosen'+'rejected' (preference) keys. Pass --format to force one.",
                )
            )
            return Dataset(path, "unknown", True, [], problems, hashlib.sha256(raw).hexdigest())
    examples = []
    for where, obj in records:
        example, errors = NORMALIZERS[fmt](where, obj)
        problems += errors
        if example is not None and not errors:
            examples.append(example)
    problems.sort(key=lambda p: int(p.where.split()[-1]) if p.where[-1].isdigit() else 0)  # in file order
    return Dataset(path, fmt, detected, examples, problems, hashlib.sha256(raw).hexdigest())


def _parse(raw: bytes, path: Path) -> tuple[list[tuple[str, Any]], list[Problem]]:
    """JSON array files by item, everything else as JSONL by line."""
    stripped = raw.lstrip()
    if path.suffix.lower() == ".json" or stripped[:1] == b"[":
        try:
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            return [], [
                Problem(_line_of(raw, e.start), f"not valid UTF-8 (byte 0x{raw[e.start]:02x}); save the file as UTF-8")
            ]
        except json.JSONDecodeError as e:
            return [], [Problem(f"line {e.lineno}", f"invalid JSON: {e.msg} (column {e.colno})")]
        except (RecursionError, ValueError) as e:  # nested thousands deep; a number of thousands of digits
            return [], [Problem("item 1", f"unusable JSON: {_json_trouble(e)}")]
        if isinstance(data, list):
            return [(f"item {i + 1}", obj) for i, obj in enumerate(data)], []
        return [("item 1", data)], []
    records, problems = [], []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        where = f"line {number}"
        if len(line) > MAX_EXAMPLE_BYTES:
            problems.append(
                Problem(
                    where,
                    f"is {len(line) / 1e6:.1f} MB long; one example must stay under "
                    f"{MAX_EXAMPLE_BYTES / 1e6:.0f} MB (is a newline missing?)",
                )
            )
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            problems.append(
                Problem(
                    where,
                    f"not valid UTF-8 (byte 0x{line[e.start]:02x} at column {e.start + 1}); save the file as UTF-8",
                )
            )
            continue
        try:
            records.append((where, json.loads(text)))
        except json.JSONDecodeError as e:
            problems.append(Problem(where, f"invalid JSON: {e.msg} (column {e.colno})"))
        except (RecursionError, ValueError) as e:
            problems.append(Problem(where, f"unusable JSON: {_json_trouble(e)}"))
    return records, problems


def _json_trouble(e: Exception) -> str:
    if isinstance(e, RecursionError):
        return "nested too deeply to be an example"
    return str(e).split(";")[0]  # e.g. "Exceeds the limit (4300 digits) for integer string conversion"


def _line_of(raw: bytes, offset: int) -> str:
    number = raw.count(b"\n", 0, offset) + 1
    return f"line {number}"


def _detect(records: list[tuple[str, Any]]) -> str | None:
    for _, obj in records:
        if isinstance(obj, dict):
            for fmt, keys in SIGNATURES.items():
                if all(k in obj for k in keys):
                    return fmt.split("-")[0]
    return None


# --- normalizing & checking --------------------------------------------------------------


def _text_problem(value: Any, name: str) -> str | None:
    if not isinstance(value, str):
        return f"{name} must be a string, found {type(value).__name__}"
    if not value.strip():
        return f"{name} is empty"
    return None


def _chat(where: str, obj: Any) -> tuple[Example | None, list[Problem]]:
    """OpenAI's chat format in full: system/user/assistant messages, `weight` on assistant messages,
    `tools` (or `functions`) with assistant `tool_calls` and `tool` results (edgeft.toolcalls renders
    them as text any chat template can hold)."""
    if not isinstance(obj, dict):
        return None, [Problem(where, f"entry is not a JSON object (found {type(obj).__name__})")]
    messages = obj.get("messages")
    if messages is None:
        return None, [Problem(where, "missing 'messages'")]
    if not isinstance(messages, list) or not messages:
        return None, [Problem(where, "'messages' must be a non-empty list")]
    functions, trouble = toolcalls.declared_tools(obj)
    if obj.get("parallel_tool_calls", True) not in (True, False):
        trouble.append("'parallel_tool_calls' must be true or false")
    problems = [Problem(where, p) for p in trouble]
    clean: list[dict] = []
    awaiting: dict[str, str] = {}  # the last assistant message's calls that no tool message answered yet: id -> name
    for i, m in enumerate(messages, start=1):
        label = f"message {i}"
        if not isinstance(m, dict):
            problems.append(Problem(where, f"{label} is not an object"))
            continue
        role = "tool" if m.get("role") == "function" else m.get("role")  # OpenAI's older name for a result
        calls, trouble = toolcalls.read_calls(m, functions) if role == "assistant" else ([], [])
        problems += [Problem(where, f"{label}: {p}") for p in trouble]
        if role is None or ("content" not in m and not (calls or trouble)):
            problems.append(Problem(where, f"{label} is missing {'role' if role is None else 'content'}"))
            continue
        if role not in ROLES:
            problems.append(Problem(where, f"{label} has unrecognized role {role!r} (use {', '.join(ROLES)})"))
            continue
        if unknown := sorted(set(m) - MESSAGE_KEYS):
            problems.append(Problem(where, f"{label} has unrecognized key(s) {', '.join(map(repr, unknown))}"))
        if "weight" in m and (m["weight"] not in (0, 1) or isinstance(m["weight"], bool) or role != "assistant"):
            problems.append(Problem(where, f"{label} weight must be 0 or 1, on assistant messages only"))
        content = m.get("content")
        if role == "tool":
            problem = toolcalls.answered_call(m, awaiting) or (
                None if isinstance(content, str) else f"content must be a string, found {type(content).__name__}"
            )
            if problem:
                problems.append(Problem(where, f"{label} (tool result) {problem}"))
            else:
                toolcalls.add_result(clean, content)
            continue
        if calls or trouble:
            if content is not None and not isinstance(content, str):
                problems.append(Problem(where, f"{label} content must be a string or null"))
                continue
            if len(calls) > 1 and obj.get("parallel_tool_calls") is False:
                problems.append(Problem(where, f"{label} makes {len(calls)} calls, but parallel_tool_calls is false"))
            awaiting = {c["id"]: c["name"] for c in calls}
            content = toolcalls.assistant_text(content, calls)
        elif problem := _text_problem(content, f"{label} content"):
            problems.append(Problem(where, problem))
            continue
        clean.append({"role": role, "content": content, "weight": m.get("weight", 1)})
    if not problems and not any(m["role"] == "assistant" for m in clean):
        problems.append(Problem(where, "no assistant message: nothing to learn from this example"))
    if not problems and not any(m["role"] == "assistant" and m["weight"] for m in clean):
        problems.append(Problem(where, "every assistant message has weight 0: nothing to learn from this example"))
    if problems:
        return Example(where, [], tools=functions), problems
    clean = toolcalls.with_tools(clean, functions)
    return Example(where, [{k: m[k] for k in ("role", "content", "weight")} for m in clean], tools=functions), []


def _pairs(
    where: str, obj: Any, prompt_keys: tuple[str, ...], answer_key: str, build
) -> tuple[Example | None, list[Problem]]:
    if not isinstance(obj, dict):
        return None, [Problem(where, f"entry is not a JSON object (found {type(obj).__name__})")]
    problems = [Problem(where, f"missing '{k}'") for k in (*prompt_keys, answer_key) if k not in obj]
    if problems:
        return None, problems
    for key in (*prompt_keys, answer_key):
        if problem := _text_problem(obj[key], f"'{key}'"):
            problems.append(Problem(where, problem))
    for key in ("input", "system"):
        if obj.get(key) not in (None, "") and not isinstance(obj[key], str):
            problems.append(Problem(where, f"'{key}' must be a string"))
    if problems:
        return None, problems
    messages = [{"role": "system", "content": obj["system"], "weight": 0}] if obj.get("system") else []
    messages += [
        {"role": "user", "content": build(obj), "weight": 0},
        {"role": "assistant", "content": obj[answer_key], "weight": 1},
    ]
    return Example(where, messages), []


def _alpaca(where: str, obj: Any):
    return _pairs(
        where,
        obj,
        ("instruction",),
        "output",
        lambda o: o["instruction"] + (f"\n\n{o['input']}" if o.get("input") else ""),
    )


def _completion(where: str, obj: Any):
    return _pairs(where, obj, ("prompt",), "completion", lambda o: o["prompt"])


def _text(where: str, obj: Any) -> tuple[Example | None, list[Problem]]:
    if not isinstance(obj, dict):
        return None, [Problem(where, f"entry is not a JSON object (found {type(obj).__name__})")]
    if "text" not in obj:
        return None, [Problem(where, "missing 'text'")]
    if problem := _text_problem(obj["text"], "'text'"):
        return None, [Problem(where, problem)]
    return Example(where, text=obj["text"]), []


def _preference(where: str, obj: Any) -> tuple[Example | None, list[Problem]]:
    """A prompt with an answer preferred and one not: OpenAI's preference format
    ({"input": {"messages", "tools"?}, "preferred_output": [message], "non_preferred_output": [message]})
    or prompt/chosen/rejected (each a string or OpenAI messages). Each side is checked as a chat
    example (tool calls included); only its last message, the answer, is trained."""
    if not isinstance(obj, dict):
        return None, [Problem(where, f"entry is not a JSON object (found {type(obj).__name__})")]
    if "preferred_output" in obj or "input" in obj:
        context = obj.get("input")
        if not isinstance(context, dict) or not isinstance(context.get("messages"), list) or not context["messages"]:
            return None, [Problem(where, "'input' must be an object with a non-empty 'messages' list")]
        prompt, names = context, ("preferred_output", "non_preferred_output")
    else:
        raw = obj.get("prompt")
        messages = [{"role": "user", "content": raw}] if isinstance(raw, str) else raw
        if not isinstance(messages, list) or not messages:
            return None, [Problem(where, "'prompt' must be a string or a non-empty list of messages")]
        prompt, names = (
            {**{k: v for k, v in obj.items() if k in ("tools", "functions")}, "messages": messages},
            (
                "chosen",
                "rejected",
            ),
        )
    sides, problems = [], []
    for name in names:
        answer = obj.get(name)
        if isinstance(answer, str):
            answer = [{"role": "assistant", "content": answer}]
        if not isinstance(answer, list) or len(answer) != 1 or not isinstance(answer[0], dict):
            problems.append(Problem(where, f"'{name}' must hold exactly one assistant message"))
            continue
        if answer[0].get("role") != "assistant":
            problems.append(Problem(where, f"'{name}' must be an assistant message"))
            continue
        context = [
            {**m, "weight": 0} if isinstance(m, dict) and m.get("role") == "assistant" else m
            for m in prompt["messages"]
        ]
        example, trouble = _chat(where, {**prompt, "messages": [*context, answer[0]]})
        problems += [Problem(where, f"'{name}': {p.message}") for p in trouble]
        sides.append(example)
    if problems:
        return None, problems
    chosen, rejected = sides
    if chosen.messages[-1]["content"].strip() == rejected.messages[-1]["content"].strip():
        return None, [Problem(where, f"'{names[0]}' and '{names[1]}' are the same answer: nothing to prefer")]
    return Example(where, chosen.messages, tools=chosen.tools, rejected=rejected.messages), []


NORMALIZERS = {"chat": _chat, "alpaca": _alpaca, "completion": _completion, "text": _text, "preference": _preference}


# --- rendering & masking -----------------------------------------------------------------


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]  # IGNORE where the token is not trained
    length_before_truncation: int

    @property
    def trained(self) -> int:
        return sum(label != IGNORE for label in self.labels)

    @property
    def learns(self) -> bool:
        """Is a token trained within the kept tokens (a target for some position)?"""
        return any(label != IGNORE for label in self.labels[1:])


@dataclass
class Pair:
    """A preference example's two sequences: the prompt with the preferred answer, and with the other."""

    chosen: Tokenized
    rejected: Tokenized

    @property
    def input_ids(self) -> list[int]:  # both sequences' tokens: what a step holds (packing, statistics)
        return self.chosen.input_ids + self.rejected.input_ids

    @property
    def trained(self) -> int:
        return self.chosen.trained + self.rejected.trained

    @property
    def length_before_truncation(self) -> int:
        return self.chosen.length_before_truncation + self.rejected.length_before_truncation

    @property
    def learns(self) -> bool:
        return self.chosen.learns and self.rejected.learns


class ChatRenderer:
    """Renders examples with the model's own chat template and marks the tokens to train.

    Trained: the content of each assistant turn with weight 1 plus the end-of-turn token that
    closes it (so the model learns to stop). Found by character offsets in the rendered text, so
    it works for any template that writes the assistant content verbatim.
    """

    def __init__(self, tokenizer, end_of_turn: str | None, *, train_on_prompt: bool = False, max_seq_len: int = 1024):
        if not getattr(tokenizer, "is_fast", False):
            raise DataError("edgeft needs a fast (Rust) tokenizer for the model: tokenizer.json is missing.")
        self.tokenizer = tokenizer
        self.end_of_turn = end_of_turn
        self.train_on_prompt = train_on_prompt
        self.max_seq_len = max_seq_len

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        if not self.tokenizer.chat_template:
            raise DataError(
                "the model has no chat template, so chat data cannot be rendered. Use --format text or a chat model."
            )
        plain = [{"role": m["role"], "content": m["content"]} for m in messages]
        return self.tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=add_generation_prompt)

    def spans(self, example: Example) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text and the character spans to train."""
        if example.text is not None:
            return example.text, [(0, len(example.text))]
        full = self.render(example.messages)
        spans, cursor = [], 0
        for i, message in enumerate(example.messages):
            if message["role"] != "assistant":
                continue
            prefix = self.render(example.messages[:i], add_generation_prompt=True)
            if full.startswith(prefix):
                cursor = max(cursor, len(prefix))
            content = message["content"].strip()
            start = full.find(content, cursor)
            if start < 0:
                raise DataError(
                    f"{example.where}: the chat template changed an assistant message, so its tokens cannot be located."
                )
            end = start + len(content)
            eot = full.find(self.end_of_turn, end, end + len(self.end_of_turn) + 16) if self.end_of_turn else -1
            if eot >= 0:
                end = eot + len(self.end_of_turn)
            if message.get("weight", 1):
                spans.append((start, end))
            cursor = end
        if self.train_on_prompt:
            spans = [(0, len(full))]
        return full, spans

    def tokenize(self, example: Example) -> Tokenized:
        text, spans = self.spans(example)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        labels = [tok if any(s <= start < e for s, e in spans) else IGNORE for tok, (start, _) in zip(ids, offsets)]
        return Tokenized(ids[: self.max_seq_len], labels[: self.max_seq_len], len(ids))


# --- the chat format's rules ----------------------------------------------------------------


def end_of_turn_token(chat_template: str, vocab: dict) -> str | None:
    """The token that closes an assistant turn in this chat format."""
    for token in END_OF_TURN_TOKENS:
        if token in vocab and token in chat_template:
            return token
    return None


def end_of_turn_for(tokenizer) -> str:
    """The token that closes an assistant turn for this tokenizer's chat format."""
    return end_of_turn_token(tokenizer.chat_template or "", tokenizer.get_vocab()) or tokenizer.eos_token


# Prompts for checking a model that has no data of its own (a base model's export).
BUILTIN_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
    "List three fruits that are red.",
    "How do I boil an egg?",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 7?",
    "Give me a tip for writing clean code.",
    "Name the largest planet in the solar system.",
    "Summarize the water cycle in one sentence.",
]


def reference_pairs(tokenizer, files: Sequence[str | Path], n: int) -> list[tuple[list[int], list[int] | None]]:
    """Up to `n` (prompt ids, reference answer ids) pairs rendered with the model's chat template, from
    the user's own data: `files` in order (held-out data first, then the training data), the last
    assistant message as the answer (+ end-of-turn token). Only where those give no chat example
    (no files, plain text) are the built-in prompts used, without answers: a narrowly fine-tuned
    model's answers to generic prompts say nothing about its task."""
    pairs, seen = [], set()
    eot = tokenizer.convert_tokens_to_ids(end_of_turn_for(tokenizer))
    for path in files:
        for example in load_dataset(path).examples:
            if len(pairs) >= n:
                return pairs
            if (pair := prompt_and_reference(example)) is None:
                continue
            messages, reference = pair
            prompt = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
            if tuple(prompt) not in seen:  # an eval file may repeat a training prompt
                seen.add(tuple(prompt))
                pairs.append((prompt, tokenizer.encode(reference, add_special_tokens=False) + [eot]))
    for text in BUILTIN_PROMPTS[: n if not pairs else 0]:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
        )
        pairs.append((list(prompt), None))
    return pairs


def stop_ids(tokenizer) -> list[int]:
    """The ids a model must stop on: the end of an assistant turn, and eos (they differ for Phi-3)."""
    eot = tokenizer.convert_tokens_to_ids(end_of_turn_for(tokenizer))
    return sorted({i for i in (eot, tokenizer.eos_token_id) if i is not None})


def prompt_and_reference(example: Example) -> tuple[list[dict], str] | None:
    """A held-out chat example as (the prompt's messages, the reference answer), or None when it
    does not end with an assistant answer (or is plain text)."""
    if example.text is not None or example.messages[-1]["role"] != "assistant":
        return None
    *prompt, answer = example.messages
    return [{"role": m["role"], "content": m["content"]} for m in prompt], answer["content"]
