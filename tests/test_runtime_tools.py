"""Function calling at run time, through the user's door: the openai client's full tool loop against a
live server, streamed tool_calls deltas, tool_choice, parallel_tool_calls, and ChatModel directly.
Every call that comes out must parse and fit its function's schema (a grammar makes it so, even on a
random tiny model)."""

from __future__ import annotations

import json
import re

import openai
import pytest

from edgeft.runtime import ChatModel
from edgeft.runtime.server import create_app
from edgeft.toolcalls import schema_problems
from tests.helpers import LiveServer

LIGHT = {
    "type": "function",
    "function": {
        "name": "set_light",
        "description": "Switch a room light.",
        "parameters": {
            "type": "object",
            "properties": {"room": {"type": "string", "enum": ["kitchen", "hall"]}, "on": {"type": "boolean"}},
            "required": ["room", "on"],
        },
    },
}
SENSOR = {
    "type": "function",
    "function": {
        "name": "read_sensor",
        "parameters": {"type": "object", "properties": {"kind": {"enum": ["temperature", "humidity"]}}},
    },
}
TOOLS = [LIGHT, SENSOR]
ASK = [{"role": "user", "content": "Turn the kitchen light off."}]


def valid(call, tools=TOOLS) -> bool:
    """A call names a declared function and its arguments fit that function's schema (extra arguments too)."""
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    arguments = json.loads(call.function.arguments if hasattr(call, "function") else call["function"]["arguments"])
    name = call.function.name if hasattr(call, "function") else call["function"]["name"]
    schema = {**schemas[name], "additionalProperties": False}
    return name in schemas and not schema_problems(arguments, schema)


@pytest.fixture(scope="module")
def model(tiny_llama_export) -> ChatModel:
    return ChatModel.load(tiny_llama_export)


@pytest.fixture(scope="module")
def client(model):
    live = LiveServer(create_app(model, parallel=1, max_queue=8))
    yield live.client()
    live.stop()


def test_the_openai_tool_loop(client, model):
    """call -> the app runs it -> its result goes back -> an answer in text."""
    first = client.chat.completions.create(
        model=model.name, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=60, temperature=0
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    assert all(valid(c) and c.id.startswith("call_") and c.type == "function" for c in choice.message.tool_calls)
    # the app appends the assistant message as the client returns it, then one result per call
    messages = [*ASK, choice.message]  # the message object as the client returns it, as its docs show
    messages += [{"role": "tool", "tool_call_id": c.id, "content": '{"ok": true}'} for c in choice.message.tool_calls]
    second = client.chat.completions.create(
        model=model.name, messages=messages, tools=TOOLS, tool_choice="none", max_tokens=8, temperature=0
    )
    assert second.choices[0].message.tool_calls is None and isinstance(second.choices[0].message.content, str)
    assert second.choices[0].finish_reason in ("stop", "length")
    # what the server saw is the conversation as training renders it: the same answer from ChatModel
    as_dicts = [m if isinstance(m, dict) else m.model_dump(exclude_none=True) for m in messages]
    direct = model.chat(as_dicts, tools=TOOLS, tool_choice="none", max_tokens=8, temperature=0)
    assert second.choices[0].message.content == direct.text
    assert second.usage.prompt_tokens == direct.usage["prompt_tokens"]


def test_streamed_tool_calls(client, model):
    chunks = list(
        client.chat.completions.create(
            model=model.name,
            messages=ASK,
            tools=TOOLS,
            tool_choice="required",
            max_tokens=60,
            temperature=0,
            stream=True,
        )
    )
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["tool_calls"] and deltas and all(valid(d) for d in deltas)
    plain = model.chat(ASK, tools=TOOLS, tool_choice="required", max_tokens=60, temperature=0)
    assert [(d.function.name, d.function.arguments) for d in deltas] == [
        (c["function"]["name"], c["function"]["arguments"]) for c in plain.tool_calls
    ]


def test_a_named_function_and_one_call_at_a_time(client, model):
    named = {"type": "function", "function": {"name": "read_sensor"}}
    for seed in range(4):  # sampled: any token the grammar allows may come, and still every call is valid
        r = client.chat.completions.create(
            model=model.name, messages=ASK, tools=TOOLS, tool_choice=named, parallel_tool_calls=False,
            max_tokens=60, temperature=1.0, seed=seed,
        )  # fmt: skip
        calls = r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "tool_calls" and len(calls) == 1
        assert calls[0].function.name == "read_sensor" and valid(calls[0])


def test_sampled_calls_always_parse_and_fit_their_schema(model):
    for seed in range(8):  # one call each: a random model sampling parallel calls may go on to the length limit
        result = model.chat(
            ASK,
            tools=TOOLS,
            tool_choice="required",
            parallel_tool_calls=False,
            max_tokens=80,
            temperature=1.5,
            seed=seed,
        )
        assert result.finish_reason == "tool_calls", result.text
        assert all(valid(c) for c in result.tool_calls)
        assert result.usage["completion_tokens"] >= 1


def test_auto_answers_in_text_or_calls_never_a_broken_call(model):
    for seed in range(4):
        result = model.chat(ASK, tools=TOOLS, max_tokens=40, temperature=1.0, seed=seed)
        assert "<tool_call>" not in result.text
        assert (result.finish_reason == "tool_calls") == bool(result.tool_calls)
        assert all(valid(c) for c in result.tool_calls or ())


@pytest.mark.parametrize(
    ("request_fields", "message"),
    [
        ({"tools": {"set_light": {}}}, "tools must be an array"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[1] needs a 'name'"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "fly"}}}, "names 'fly'"),
        ({"tool_choice": "required"}, "tool_choice 'required' needs tools"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice must be"),
        ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls must be true or false"),
    ],
)
def test_bad_tool_requests_are_400(client, model, request_fields, message):
    with pytest.raises(openai.BadRequestError, match=re.escape(message)):
        client.chat.completions.create(model=model.name, messages=ASK, max_tokens=4, **request_fields)


def test_the_older_functions_form(client, model):
    r = client.chat.completions.create(
        model=model.name, messages=ASK, functions=[LIGHT["function"]], function_call={"name": "set_light"},
        max_tokens=60, temperature=0,
    )  # fmt: skip
    calls = r.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "set_light" and valid(calls[0])


def test_langchain_chat_openai_with_bind_tools(client, model):
    """A third-party client people point at local servers: LangChain's ChatOpenAI, tools bound."""
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=str(client.base_url), api_key="unused", model=model.name, temperature=0, max_tokens=60)
    tool_llm = llm.bind_tools(TOOLS, tool_choice="required")
    call = tool_llm.invoke([HumanMessage("Turn the kitchen light off.")])
    assert call.tool_calls and all(c["name"] in ("set_light", "read_sensor") for c in call.tool_calls)
    schemas = {t["function"]["name"]: {**t["function"]["parameters"], "additionalProperties": False} for t in TOOLS}
    assert all(not schema_problems(c["args"], schemas[c["name"]]) for c in call.tool_calls)
    results = [ToolMessage('{"ok": true}', tool_call_id=c["id"]) for c in call.tool_calls]
    answer = llm.bind_tools(TOOLS, tool_choice="none").invoke(
        [HumanMessage("Turn the kitchen light off."), call, *results]
    )
    assert isinstance(answer.content, str) and not answer.tool_calls
