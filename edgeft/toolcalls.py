"""Function calling: OpenAI's `tools` and `tool_calls`, written as text a model learns, and read back.

Training data, `edgeft chat`, `edgeft serve` and the Python API all render tools the same way, so a
fine-tuned model sees at run time exactly what it was trained on, with any chat template (even one
that knows nothing of tools):

- the declared tools go at the end of the system message (one is added when there is none):
      {system text}

      # Tools
      To call a function, answer with one line per call:
      <tool_call>{"name": "...", "arguments": {...}}</tool_call>
      Functions:
      {"name": "...", "description": "...", "parameters": {...}}      (one line per function)
- an assistant message's calls follow its text, one `<tool_call>` line each;
- tool results become a user message, one `<tool_response>...</tool_response>` line per result
  (consecutive results share the message), so user and assistant turns still alternate.

`parse_calls` reads a model's answer back into text and calls. OpenAI's older `functions` /
`function_call` / `function` role are read as tools too.
"""

from __future__ import annotations

import json
import re
from typing import Any

from edgeft.errors import GenerationError

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
RESULT_OPEN, RESULT_CLOSE = "<tool_response>", "</tool_response>"
TOOLS_HEADER = (
    "# Tools\nTo call a function, answer with one line per call:\n"
    f'{CALL_OPEN}{{"name": "...", "arguments": {{...}}}}{CALL_CLOSE}\nFunctions:'
)
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
# JSON laid out as Python's json.dumps writes it (and as the samples train): llguidance's flexible
# default lets a model pad with whitespace without end (a random model wrote 200 newlines). A
# schema's own "x-guidance" key overrides this.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_CALLS = re.compile(re.escape(CALL_OPEN) + r"(.*?)" + re.escape(CALL_CLOSE), re.DOTALL)


# --- declared tools -------------------------------------------------------------------------


def declared_tools(obj: dict) -> tuple[list[dict], list[str]]:
    """The example's (or request's) functions as [{"name", "description", "parameters"}], and what is
    wrong with them; `tools` (OpenAI's current form) or `functions` (its older one)."""
    raw = obj.get("tools")
    legacy = raw is None and obj.get("functions") is not None
    if legacy:
        raw = (
            [{"type": "function", "function": f} for f in obj["functions"]] if isinstance(obj["functions"], list) else 0
        )
    if raw is None:
        return [], []
    key = "functions" if legacy else "tools"
    if not isinstance(raw, list):
        return [], [f"'{key}' must be a list of function definitions"]
    functions, problems = [], []
    for i, tool in enumerate(raw, start=1):
        label = f"{key}[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            problems.append(f'{label} must be {{"type": "function", "function": {{...}}}}')
            continue
        function = tool.get("function")
        if not isinstance(function, dict):
            problems.append(f"{label} has no 'function' object")
            continue
        name = function.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            problems.append(f"{label} needs a 'name' of letters, digits, '_' or '-' (at most 64), found {name!r}")
            continue
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            problems.append(f"{label} ({name}): 'parameters' must be a JSON Schema object")
            continue
        if any(f["name"] == name for f in functions):
            problems.append(f"{label}: function {name!r} is declared twice")
            continue
        description = function.get("description", "")
        functions.append({"name": name, "description": description if isinstance(description, str) else ""})
        functions[-1]["parameters"] = parameters
    return functions, problems


def with_tools(messages: list[dict], functions: list[dict]) -> list[dict]:
    """The conversation with the tools at the end of its system message (one is added where there is none)."""
    if not functions:
        return messages
    block = tools_block(functions)
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": f"{messages[0]['content'].rstrip()}\n\n{block}"}, *messages[1:]]
    return [{"role": "system", "content": block, "weight": 1}, *messages]


def add_result(messages: list[dict], content: str) -> None:
    """Append a tool result: to the user message of the results before it (one turn's calls), else as a new one."""
    if messages and messages[-1].get("results"):
        messages[-1]["content"] += "\n" + result_text(content)
    else:
        messages.append({"role": "user", "content": result_text(content), "weight": 0, "results": True})


def answered_call(message: dict, awaiting: dict[str, str]) -> str | None:
    """Pair a tool result with the call it answers (by `tool_call_id`, or by `name`, or the only one
    waiting); what is wrong when it answers none."""
    if not awaiting:
        return "has no assistant tool call before it to answer"
    call_id = message.get("tool_call_id")
    if call_id is None and isinstance(message.get("name"), str):
        call_id = next((i for i, name in awaiting.items() if name == message["name"]), None)
    if call_id is None and len(awaiting) == 1:
        call_id = next(iter(awaiting))
    if call_id not in awaiting:
        shown = repr(message.get("tool_call_id")) if message.get("tool_call_id") is not None else "no tool_call_id"
        return (
            f"has {shown}, which matches no call of the assistant message before it ({', '.join(map(repr, awaiting))})"
        )
    del awaiting[call_id]
    return None


def plain_conversation(messages: list[dict], functions: list[dict]) -> list[dict]:
    """An OpenAI conversation (assistant tool_calls, tool results; already checked) as plain
    {'role', 'content'} messages rendered the way training renders them."""
    plain: list[dict] = []
    awaiting: dict[str, str] = {}
    for i, m in enumerate(messages):
        role = "tool" if m.get("role") == "function" else m.get("role")
        if role == "tool":
            if problem := answered_call(m, awaiting):
                raise GenerationError(f"messages[{i}] (a tool result) {problem}.")
            add_result(plain, m.get("content") if isinstance(m.get("content"), str) else json.dumps(m.get("content")))
            continue
        content = m.get("content") or ""
        if role == "assistant" and (m.get("tool_calls") or m.get("function_call")):
            calls, problems = read_calls(m, [{"name": n, "parameters": {}} for n in _called_names(m)])
            if problems:
                raise GenerationError(f"messages[{i}]: {problems[0]}.")
            awaiting = {c["id"]: c["name"] for c in calls}
            content = assistant_text(content, calls)
        plain.append({"role": role, "content": content})
    return [{"role": m["role"], "content": m["content"]} for m in with_tools(plain, functions)]


def _called_names(message: dict) -> list[str]:
    raw = message.get("tool_calls") or [{"function": message.get("function_call")}]
    return [c["function"]["name"] for c in raw if isinstance(c, dict) and isinstance(c.get("function"), dict)]


def tools_block(functions: list[dict]) -> str:
    """The text that declares `functions` to the model, appended to the system message."""
    lines = [TOOLS_HEADER]
    for f in functions:
        shown = {"name": f["name"], **({"description": f["description"]} if f["description"] else {})}
        lines.append(json.dumps({**shown, "parameters": f["parameters"]}, ensure_ascii=False))
    return "\n".join(lines)


# --- calls ------------------------------------------------------------------------------------


def read_calls(message: dict, functions: list[dict]) -> tuple[list[dict], list[str]]:
    """An assistant message's calls as [{"id", "name", "arguments": dict}], and what is wrong with them
    (not JSON, a function the tools do not declare, arguments against its schema)."""
    raw = message.get("tool_calls")
    if raw is None and message.get("function_call") is not None:  # the older single-call form
        raw = [{"type": "function", "function": message["function_call"]}]
    if raw is None:
        return [], []
    if not isinstance(raw, list) or not raw:
        return [], ["'tool_calls' must be a non-empty list"]
    calls, problems = [], []
    schemas = {f["name"]: f["parameters"] for f in functions}
    for i, call in enumerate(raw, start=1):
        label = f"tool call {i}"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or call.get("type", "function") != "function":
            problems.append(f'{label} must be {{"type": "function", "function": {{"name": ..., "arguments": ...}}}}')
            continue
        name, arguments = function.get("name"), function.get("arguments", "{}")
        if not isinstance(name, str) or not name:
            problems.append(f"{label} has no function name")
            continue
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError as e:
                problems.append(f"{label} ({name}): arguments are not valid JSON ({e.args[0].split(':')[0]})")
                continue
        if not isinstance(arguments, dict):
            problems.append(f"{label} ({name}): arguments must be a JSON object")
            continue
        if name not in schemas:
            declared = ", ".join(schemas) or "none"
            problems.append(f"{label} calls {name!r}, which the example's tools do not declare (declared: {declared})")
            continue
        problems += [f"{label} ({name}): {p}" for p in schema_problems(arguments, schemas[name])]
        call_id = call.get("id")
        calls.append({"id": call_id if isinstance(call_id, str) else f"call_{i}", "name": name, "arguments": arguments})
    return calls, problems


def assistant_text(content: str | None, calls: list[dict]) -> str:
    """An assistant message that calls functions, as training renders it: its text, then its calls."""
    return "\n".join(part for part in ((content or "").strip(), calls_text(calls)) if part)


def calls_text(calls: list[dict]) -> str:
    """Calls as the model writes them: one `<tool_call>{"name", "arguments"}</tool_call>` line each."""
    return "\n".join(
        CALL_OPEN + json.dumps({"name": c["name"], "arguments": c["arguments"]}, ensure_ascii=False) + CALL_CLOSE
        for c in calls
    )


def result_text(content: str) -> str:
    return f"{RESULT_OPEN}{content}{RESULT_CLOSE}"


def parse_calls(text: str) -> tuple[str, list[dict] | None]:
    """A model's answer as (its text outside the calls, its calls as [{"name", "arguments"}]); calls is
    None when a `<tool_call>` block is there but is not a call (not JSON, no name, arguments not an object)."""
    calls = []
    for body in _CALLS.findall(text):
        try:
            call = json.loads(body)
        except ValueError:
            return text.strip(), None
        if not (
            isinstance(call, dict) and isinstance(call.get("name"), str) and isinstance(call.get("arguments"), dict)
        ):
            return text.strip(), None
        calls.append({"name": call["name"], "arguments": call["arguments"]})
    if CALL_OPEN in _CALLS.sub("", text):  # an opened call that never closed
        return text.strip(), None
    return _CALLS.sub("", text).strip(), calls


def calls_grammar(functions: list[dict], *, parallel: bool = True) -> str:
    """A Lark grammar (llguidance's, with %json) for what follows the opening `<tool_call>`: one call
    (or several, with `parallel`) of the declared functions, each with arguments that fit the
    function's schema, laid out as training lays them out. A call that does not parse, names an
    undeclared function or breaks its schema cannot be generated."""
    options = [
        {
            "type": "object",
            "properties": {"name": {"const": f["name"]}, "arguments": _closed(f["parameters"])},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for f in functions
    ]
    schema = json.dumps({"x-guidance": JSON_LAYOUT, "anyOf": options}, ensure_ascii=False)
    more = f' ("{CALL_CLOSE}\\n{CALL_OPEN}" call)*' if parallel else ""
    return f'start: call{more} "{CALL_CLOSE}"\ncall: %json {schema}'


def _closed(parameters: dict) -> dict:
    """Parameters that allow no argument they do not name (unless they say otherwise): a call with
    an argument no function reads is a wrong call."""
    if parameters.get("type", "object") == "object" and "additionalProperties" not in parameters:
        return {"type": "object", **parameters, "additionalProperties": False}
    return parameters


# --- a JSON Schema subset: what function parameters use -------------------------------------

_TYPES: dict[str, Any] = {
    "object": dict,
    "array": list,
    "string": str,
    "integer": int,
    "number": (int, float),
    "boolean": bool,
    "null": type(None),
}


def schema_problems(value: Any, schema: dict, where: str = "arguments") -> list[str]:
    """What in `value` breaks `schema` (type, enum, const, required, properties, additionalProperties,
    items): the parts of JSON Schema that function parameters use. Other keywords are not checked."""
    if not isinstance(schema, dict):
        return []
    expected = schema.get("type")
    if expected is not None:
        names = expected if isinstance(expected, list) else [expected]
        if not any(_is_type(value, n) for n in names):
            return [f"{where} must be {' or '.join(map(str, names))}, found {_json_type(value)}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{where} must be one of {', '.join(json.dumps(v) for v in schema['enum'])}, found {json.dumps(value)}"]
    if "const" in schema and value != schema["const"]:
        return [f"{where} must be {json.dumps(schema['const'])}"]
    problems = []
    if isinstance(value, dict):
        properties = schema.get("properties") or {}
        problems += [f"{where} is missing {k!r}" for k in schema.get("required", []) if k not in value]
        for key, item in value.items():
            if key in properties:
                problems += schema_problems(item, properties[key], f"{where}.{key}")
            elif schema.get("additionalProperties") is False:
                problems.append(f"{where} has {key!r}, which the schema does not allow")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            problems += schema_problems(item, schema["items"], f"{where}[{i}]")
    return problems


def _is_type(value: Any, name: str) -> bool:
    if name in ("integer", "number") and isinstance(value, bool):
        return False
    if name == "integer" and isinstance(value, float):
        return value.is_integer()
    return isinstance(value, _TYPES.get(name, object))


def _json_type(value: Any) -> str:
    return next(n for n in ("boolean", "integer", "number", "string", "array", "object", "null") if _is_type(value, n))
