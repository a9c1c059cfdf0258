"""OpenAI's chat fine-tuning format in full: tools, tool_calls, tool results, weight, parallel_tool_calls.

An OpenAI function-calling JSONL must train as is; every malformed case is refused with its line;
what the model learns to write is what the runtime parses back.
"""

import json

import pytest

from edgeft import toolcalls
from edgeft.chatdata import IGNORE, ChatRenderer, end_of_turn_for, load_dataset
from edgeft.evaluate import exact_match
from tests.helpers import run_cli

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def call(name, arguments, call_id="call_1"):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


# One example of each kind OpenAI's documentation shows: a call, its result and the final answer; two
# parallel calls; a context-only assistant turn (weight 0); the older `functions` / `function_call` form.
TOOL_LOOP = {
    "tools": [WEATHER, TIME],
    "parallel_tool_calls": True,
    "messages": [
        {"role": "system", "content": "You are a weather bot."},
        {"role": "user", "content": "Weather in Oslo and Rome?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [call("get_weather", {"city": "Oslo"}), call("get_weather", {"city": "Rome"}, "call_2")],
        },
        {"role": "tool", "tool_call_id": "call_2", "content": '{"c": 21}'},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"c": 3}'},
        {"role": "assistant", "content": "Oslo 3 C, Rome 21 C."},
    ],
}
WEIGHTED = {
    "tools": [WEATHER],
    "messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello, how can I help?", "weight": 0},
        {"role": "user", "content": "Weather in Paris in fahrenheit"},
        {"role": "assistant", "tool_calls": [call("get_weather", {"city": "Paris", "unit": "f"})]},
    ],
}
LEGACY = {
    "functions": [WEATHER["function"]],
    "messages": [
        {"role": "user", "content": "Weather in Lima?"},
        {
            "role": "assistant",
            "content": None,
            "function_call": {"name": "get_weather", "arguments": '{"city": "Lima"}'},
        },
        {"role": "function", "name": "get_weather", "content": '{"c": 18}'},
        {"role": "assistant", "content": "18 C in Lima."},
    ],
}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_a_function_calling_file_loads_as_is(tmp_path):
    ds = load_dataset(write_jsonl(tmp_path / "tools.jsonl", [TOOL_LOOP, WEIGHTED, LEGACY]))
    assert ds.problems == [] and ds.format == "chat" and len(ds.examples) == 3
    loop = ds.examples[0].messages
    assert [m["role"] for m in loop] == ["system", "user", "assistant", "user", "assistant"]
    # the tools close the system message, one JSON line per function
    assert loop[0]["content"].startswith("You are a weather bot.\n\n# Tools\n")
    declared = [json.loads(line) for line in loop[0]["content"].splitlines() if line.startswith('{"name"')]
    assert [d["name"] for d in declared] == ["get_weather", "get_time"] and declared[0]["parameters"]["required"]
    # both calls in one assistant turn, both results in one user turn
    assert loop[2]["content"] == toolcalls.calls_text(
        [{"name": "get_weather", "arguments": {"city": "Oslo"}}, {"name": "get_weather", "arguments": {"city": "Rome"}}]
    )
    assert loop[3] == {
        "role": "user",
        "content": '<tool_response>{"c": 21}</tool_response>\n<tool_response>{"c": 3}</tool_response>',
        "weight": 0,
    }
    # no system message: the tools make one; weight 0 is kept
    weighted = ds.examples[1].messages
    assert weighted[0]["role"] == "system" and weighted[0]["content"].startswith("# Tools")
    assert [m["weight"] for m in weighted if m["role"] == "assistant"] == [0, 1]
    assert ds.examples[1].tools[0]["name"] == "get_weather"
    legacy = ds.examples[2].messages  # functions / function_call / function role: the same rendering
    assert legacy[2]["content"] == '<tool_call>{"name": "get_weather", "arguments": {"city": "Lima"}}</tool_call>'
    assert legacy[3]["content"] == '<tool_response>{"c": 18}</tool_response>'


def test_every_malformed_call_is_refused_with_its_line(tmp_path):
    def example(assistant, *after, tools=(WEATHER,), **top):
        return {"tools": list(tools), **top, "messages": [{"role": "user", "content": "x"}, assistant, *after]}

    rows = [
        TOOL_LOOP,
        example({"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": "{city: Oslo"}}]}),
        example({"role": "assistant", "tool_calls": [call("book_flight", {"to": "Oslo"})]}),
        example({"role": "assistant", "tool_calls": [call("get_weather", {"unit": "k"})]}),
        example({"role": "assistant", "content": "no call"}, {"role": "tool", "tool_call_id": "call_1", "content": "1"}),
        example({"role": "assistant", "tool_calls": [call("get_weather", {"city": "A"})]}, {"role": "tool", "tool_call_id": "call_9", "content": "1"}),
        example({"role": "assistant", "tool_calls": [call("get_weather", {"city": "A"}), call("get_weather", {"city": "B"}, "c2")]}, parallel_tool_calls=False),
        example({"role": "assistant", "tool_calls": [call("get_weather", {"city": "A"})]}, tools=({"type": "function", "function": {"name": "bad name!"}},)),
        example({"role": "assistant", "tool_calls": [call("get_weather", {"city": "A", "days": 3})]}),
        example({"role": "assistant", "tool_calls": []}),
        example({"role": "assistant"}),
    ]  # fmt: skip
    found = [str(p) for p in load_dataset(write_jsonl(tmp_path / "bad.jsonl", rows)).problems]
    assert found == [
        "line 2: message 2: tool call 1 (get_weather): arguments are not valid JSON (Expecting property name enclosed in double quotes)",
        "line 3: message 2: tool call 1 calls 'book_flight', which the example's tools do not declare (declared: get_weather)",
        "line 4: message 2: tool call 1 (get_weather): arguments is missing 'city'",
        "line 4: message 2: tool call 1 (get_weather): arguments.unit must be one of \"c\", \"f\", found \"k\"",
        "line 5: message 3 (tool result) has no assistant tool call before it to answer",
        "line 6: message 3 (tool result) has 'call_9', which matches no call of the assistant message before it ('call_1')",
        "line 7: message 2 makes 2 calls, but parallel_tool_calls is false",
        "line 8: tools[1] needs a 'name' of letters, digits, '_' or '-' (at most 64), found 'bad name!'",
        "line 8: message 2: tool call 1 calls 'get_weather', which the example's tools do not declare (declared: none)",
        "line 9: message 2: tool call 1 (get_weather): arguments has 'days', which the schema does not allow",
        "line 10: message 2: 'tool_calls' must be a non-empty list",
        "line 11: message 2 is missing content",
    ]  # fmt: skip


def test_the_model_is_trained_on_its_calls_and_answers_not_on_tool_results(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    ds = load_dataset(write_jsonl(tmp_path / "tools.jsonl", [TOOL_LOOP, WEIGHTED]))
    renderer = ChatRenderer(tok, end_of_turn_for(tok))
    for example, trained_parts, untrained_parts in (
        (ds.examples[0], ['"city": "Oslo"', '"city": "Rome"', "Oslo 3 C, Rome 21 C."], ['{"c": 21}', "get_time"]),
        (ds.examples[1], ['"unit": "f"'], ["Hello, how can I help?", "Weather in Paris"]),
    ):
        tokenized = renderer.tokenize(example)
        trained = tok.decode([t for t, label in zip(tokenized.input_ids, tokenized.labels) if label != IGNORE])
        everything = tok.decode(tokenized.input_ids)
        assert all(part in trained for part in trained_parts), trained
        assert all(part in everything and part not in trained for part in untrained_parts), trained


def test_calls_the_model_writes_parse_back():
    calls = [{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}, {"name": "get_time", "arguments": {}}]
    text = "Let me check.\n" + toolcalls.calls_text(calls)
    assert toolcalls.parse_calls(text) == ("Let me check.", calls)
    assert toolcalls.parse_calls("Just text.") == ("Just text.", [])
    for broken in (
        '<tool_call>{"name": "get_time"</tool_call>',
        '<tool_call>{"arguments": {}}</tool_call>',
        "<tool_call>{",
    ):
        assert toolcalls.parse_calls(broken)[1] is None
    # eval compares calls parsed: spacing and key order do not matter, a wrong argument does
    reference = toolcalls.calls_text(calls[:1])
    assert exact_match(
        '<tool_call>{"arguments": {"unit":"c","city":"Oslo"}, "name":"get_weather"}</tool_call>', reference
    )
    assert not exact_match(toolcalls.calls_text([{"name": "get_weather", "arguments": {"city": "Rome"}}]), reference)
    assert not exact_match("It is sunny in Oslo.", reference)


@pytest.mark.parametrize(
    ("value", "schema", "problems"),
    [
        (3, {"type": "integer"}, []),
        (3.0, {"type": "integer"}, []),
        (True, {"type": "integer"}, ["arguments must be integer, found boolean"]),
        ("3", {"type": ["integer", "null"]}, ["arguments must be integer or null, found string"]),
        ({"a": [1, "x"]}, {"type": "object", "properties": {"a": {"type": "array", "items": {"type": "integer"}}}}, ["arguments.a[1] must be integer, found string"]),
    ],
)  # fmt: skip
def test_schema_checks(value, schema, problems):
    assert toolcalls.schema_problems(value, schema) == problems


def test_data_check_shows_an_example_with_its_trained_text_marked(tiny_llama, tmp_path):
    plain = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    good = write_jsonl(tmp_path / "tools.jsonl", [plain, TOOL_LOOP])
    out = run_cli("data", "check", good, "--model", tiny_llama).output
    assert "line 2 as the model sees it" in out  # the first example that calls a tool
    left, right = "\u27e6", "\u27e7"
    assert f'{left}<tool_call>{{"name": "get_weather", "arguments": {{"city": "Oslo"}}}}' in out
    assert f"Oslo 3 C, Rome 21 C.<|im_end|>{right}" in out or f"Oslo 3 C, Rome 21 C.<|end|>{right}" in out
    assert f"{left}<tool_response>" not in out and "No problems found." in out
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"tools": [WEATHER], "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [call("nope", {})]}]}])  # fmt: skip
    result = run_cli("data", "check", bad, "--model", tiny_llama, ok=False)
    assert result.exit_code == 1 and "line 1: message 2: tool call 1 calls 'nope'" in result.output


def test_eval_counts_each_kind_of_call_mistake_apart():
    from edgeft.evaluate import call_outcomes, table

    light = toolcalls.calls_text([{"name": "set_light", "arguments": {"room": "hall", "on": True}}])
    other = toolcalls.calls_text([{"name": "set_light", "arguments": {"room": "hall", "on": False}}])
    cases = [  # (prediction, reference)
        (light, light),  # right
        (other, light),  # wrong call: other arguments
        ("The hall light is on.", light),  # missing call
        (light, "Hello!"),  # a call where text was expected
        ('<tool_call>{"name": "set_light", "arguments": </tool_call>', light),  # broken
        ("Hello!", "Hello!"),  # text for text: none of the above
    ]
    predictions = [{"prediction": p, "reference": r, "exact_match": exact_match(p, r)} for p, r in cases]
    counts = call_outcomes(predictions)
    assert counts == {
        "right": 1,
        "wrong_call": 1,
        "missing_call": 1,
        "unexpected_call": 1,
        "broken_call": 1,
        "calls_expected": 4,
    }
    assert call_outcomes([{"prediction": "a", "reference": "a", "exact_match": True}]) is None
    report = {"rows": [{"label": "m", "exact_match": 0, "token_f1": 0, "json_valid": None, "perplexity": None,
                        "stop_rate": 0, "latency_s": 0, "tokens_per_second": 0, "function_calls": counts}]}  # fmt: skip
    assert "| m | 1/4 | 1 | 1 | 1 | 1 |" in table(report)
