"""Function calling at run time: OpenAI's `tools`, `tool_choice` and `parallel_tool_calls` read and
checked here; the stream that generates calls is engine.ToolCallStream.

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
