"""Function calling at run time: OpenAI's `tools`, `tool_choice` and `parallel_tool_calls`.

The tools are rendered into the prompt as training rendered them (edgeft.toolcalls). An answer is
generated in up to two parts:
1. free text, unless a call is required, with `<tool_call>` as an extra stop string: the model
   either answers in text (done) or begins a call;
2. the calls, constrained by a grammar made from the declared schemas (onnxruntime-genai's
   guidance), continuing after the text and `<tool_call>`: what comes out always parses, names a
   declared function and fits its schema.
tool_choice: "auto" (default) lets the model choose; "none" never calls; "required" always calls;
{"type": "function", "function": {"name": ...}} calls that function.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from edgeft import toolcalls
from edgeft.errors import ConfigError, GenerationError


def functions_of(tools: Any) -> list[dict]:
    """The declared functions of a request's `tools`, or a GenerationError naming what is wrong."""
    functions, problems = toolcalls.declared_tools({"tools": tools if tools is not None else []})
    if problems:
        raise GenerationError(f"{problems[0]}.")
    return functions


def load_tools(path: str | Path) -> list[dict]:
    """OpenAI function definitions from a JSON file: a list of them, or {"tools": [...]}."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read the tools file {path}: {e.strerror or e}.") from None
    except ValueError as e:
        raise ConfigError(f"{path} is not JSON ({e}); a list of OpenAI function definitions is expected.") from None
    tools = data.get("tools") if isinstance(data, dict) else data
    try:
        functions_of(tools)
    except GenerationError as e:
        raise ConfigError(f"{path}: {e}") from None
    if not tools:
        raise ConfigError(f"{path} declares no function.")
    return tools


def resolve_choice(tool_choice: Any, functions: list[dict]) -> tuple[str, list[dict]]:
    """("none" | "auto" | "required", the functions a call may name)."""
    if tool_choice is None:
        return ("auto" if functions else "none"), functions
    if tool_choice in ("none", "auto", "required"):
        if tool_choice != "none" and not functions:
            raise GenerationError(f"tool_choice {tool_choice!r} needs tools.")
        return tool_choice, functions
    name = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) else None
    if not isinstance(name, str):
        raise GenerationError(
            'tool_choice must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}.'
        )
    named = [f for f in functions if f["name"] == name]
    if not named:
        raise GenerationError(f"tool_choice names {name!r}, which is not among the tools.")
    return "required", named


def openai_calls(calls: list[dict]) -> list[dict]:
    """Parsed calls as OpenAI's tool_calls: an id each, arguments as a JSON string."""
    return [
        {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)},
        }
        for c in calls
    ]


class ToolCallStream:
    """A ChatStream's interface (iterate for text pieces, `.result`, `cancel()`, `close()`) over an
    answer that may call the declared functions; `.result.tool_calls` holds the calls."""

    def __init__(self, model, prompt_ids: list[int], options, max_tokens: int, *, choice, functions, parallel, cache):
        from edgeft.runtime.engine import ChatStream

        self.model, self._prompt_ids, self._options, self._max_tokens = model, prompt_ids, options, max_tokens
        self._functions, self._parallel, self._choice = functions, parallel, choice
        self.prompt_tokens = len(prompt_ids)
        self.result = None
        self._current = None
        self._cancelled = False
        self._pieces: Iterator[str] | None = None
        self._calls = None
        if choice == "required":
            self._calls_stream("")  # a grammar that does not compile fails here, before any generation
        else:  # free text first, up to where a call begins ("none": a call the model begins ends the answer)
            stops = replace(options, stop=(*options.stop, toolcalls.CALL_OPEN))
            self._current = ChatStream(model, prompt_ids, stops, max_tokens, cache=cache)

    @property
    def reused_tokens(self) -> int:
        return getattr(self._current, "reused_tokens", 0)

    def _calls_stream(self, text: str):
        """The constrained continuation after `text` and `<tool_call>`."""
        from edgeft.runtime.engine import ChatStream, GenerationOptions

        grammar = toolcalls.calls_grammar(self._functions, parallel=self._parallel)
        opts = GenerationOptions(
            temperature=self._options.temperature,
            top_p=self._options.top_p,
            top_k=self._options.top_k,
            repetition_penalty=self._options.repetition_penalty,
            seed=self._options.seed,
            response_format={"type": "lark_grammar", "grammar": grammar},
        )
        # the text and the opening tag as training tokenized them: one piece of text
        ids = self._prompt_ids + [int(t) for t in self.model._tokenizer.encode(text + toolcalls.CALL_OPEN)]
        room = min(self._max_tokens, self.model.context_length - len(ids))
        if room < 1:
            return None
        stream = ChatStream(self.model, ids, opts, room)
        self._calls = stream
        return stream

    def cancel(self) -> None:
        self._cancelled = True
        if self._current is not None:
            self._current.cancel()

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def __iter__(self) -> ToolCallStream:
        return self

    def __next__(self) -> str:
        if self._pieces is None:
            self._pieces = self._generate()
        return next(self._pieces)

    def text(self) -> str:
        return "".join(self)

    def close(self) -> None:
        self.cancel()
        if self._pieces is not None:
            self._pieces.close()

    def _generate(self) -> Iterator[str]:
        from edgeft.runtime.engine import ChatResult

        text, free = "", None
        if self._current is not None:
            free = self._current
            for piece in free:
                text += piece
                yield piece
            if self._choice == "none" or free.stopped_on != toolcalls.CALL_OPEN:
                self.result = free.result
                return
        calls_stream = self._calls if free is None else self._calls_stream(text)
        if calls_stream is None or self._cancelled:
            self.result = free.result if free else None
            return
        self._current = calls_stream
        written = "".join(calls_stream)
        done = calls_stream.result
        _, calls = toolcalls.parse_calls(toolcalls.CALL_OPEN + written)
        before = free.result if free else None
        used = (before.usage["completion_tokens"] if before else 0) + done.usage["completion_tokens"]
        complete = done.finish_reason == "stop" and bool(calls)  # else cut short: the raw text, as OpenAI does
        first = before.time_to_first_token if before and before.usage["completion_tokens"] > 1 else None
        self.result = ChatResult(
            text=text.strip() if complete else text + toolcalls.CALL_OPEN + written,
            finish_reason="tool_calls" if complete else done.finish_reason,
            usage={
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": used,
                "total_tokens": self.prompt_tokens + used,
            },
            time_to_first_token=first if first is not None else done.time_to_first_token,
            elapsed=(before.elapsed if before else 0.0) + done.elapsed,
            cached_tokens=before.cached_tokens if before else 0,
            tool_calls=openai_calls(calls) if complete else None,
        )
