import json

import pytest

from edgeft.chatdata import IGNORE, ChatRenderer, Example, end_of_turn_for, load_dataset
from edgeft.errors import DataError
from edgeft.pipeline.data import check_data
from tests.helpers import run_cli


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@pytest.mark.parametrize(
    "row, fmt",
    [
        (CHAT, "chat"),
        ({"instruction": "Say hi", "input": "", "output": "hi"}, "alpaca"),
        ({"prompt": "2+2=", "completion": "4"}, "completion"),
        ({"text": "Once upon a time"}, "text"),
    ],
)
def test_formats_are_detected_and_normalized(tmp_path, row, fmt):
    ds = load_dataset(write_jsonl(tmp_path / "d.jsonl", [row, row]), "auto")
    assert ds.format == fmt and ds.detected and not ds.problems and len(ds.examples) == 2
    if fmt == "text":
        assert ds.examples[0].text == "Once upon a time"
    else:
        assert [m["role"] for m in ds.examples[0].messages][-2:] == ["user", "assistant"]


def test_alpaca_input_joins_the_instruction(tmp_path):
    ds = load_dataset(
        write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Translate", "input": "bonjour", "output": "hello"}])
    )
    assert ds.examples[0].messages[0]["content"] == "Translate\n\nbonjour"


def test_json_array_file(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([CHAT, {"messages": "nope"}]))
    ds = load_dataset(path)
    assert len(ds.examples) == 1
    assert [str(p) for p in ds.problems] == ["item 2: 'messages' must be a non-empty list"]


def test_every_problem_is_reported_with_its_line(tmp_path):
    rows = [
        CHAT,
        "[1, 2]",
        {"conversation": []},
        {"messages": [{"role": "user"}]},
        {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},
        {"messages": [{"role": "user", "content": "x", "mood": "happy"}, {"role": "assistant", "content": "y"}]},
        {"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "y"}]},
        {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]},
        {"messages": [{"role": "user", "content": "only a question"}]},
        '{"messages": [',
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 2}]},
    ]
    ds = load_dataset(write_jsonl(tmp_path / "bad.jsonl", rows), "chat")
    found = [str(p) for p in ds.problems]
    assert found == [
        "line 2: entry is not a JSON object (found list)",
        "line 3: missing 'messages'",
        "line 4: message 1 is missing content",
        "line 5: message 1 has unrecognized role 'robot' (use system, user, assistant, tool)",
        "line 6: message 1 has unrecognized key(s) 'mood'",
        "line 7: message 1 content is empty",
        "line 8: message 1 content must be a string, found int",
        "line 9: no assistant message: nothing to learn from this example",
        "line 10: invalid JSON: Expecting value (column 15)",
        "line 11: message 2 weight must be 0 or 1, on assistant messages only",
    ]
    assert len(ds.examples) == 1


def test_unreadable_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_dataset(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="empty"):
        load_dataset(tmp_path / "empty.jsonl")
    with pytest.raises(DataError, match="directory"):
        load_dataset(tmp_path)


def test_non_utf8_and_huge_lines(tmp_path):
    path = tmp_path / "mixed.jsonl"
    huge = json.dumps({"text": "x" * 9_000_000})
    path.write_bytes(json.dumps(CHAT).encode() + b"\n" + b'{"text": "caf\xe9"}\n' + huge.encode() + b"\n")
    ds = load_dataset(path, "auto")
    messages = [str(p) for p in ds.problems]
    assert messages[0].startswith("line 2: not valid UTF-8 (byte 0xe9")
    assert messages[1].startswith("line 3: is 9.0 MB long")
    assert len(ds.examples) == 1


def test_undetectable_format(tmp_path):
    ds = load_dataset(write_jsonl(tmp_path / "d.jsonl", [{"question": "a", "answer": "b"}]))
    assert "cannot detect the format" in str(ds.problems[0])


def trained_text(tokenizer, tokenized):
    return tokenizer.decode([t for t, label in zip(tokenized.input_ids, tokenized.labels) if label != IGNORE])


def test_only_assistant_turns_and_their_end_token_are_trained(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    eot = end_of_turn_for(tok)
    assert eot in ("<|im_end|>", "<|end|>")  # Phi-3's eos is <|endoftext|>, but a turn ends with <|end|>
    assert tok.pad_token_id != tok.convert_tokens_to_ids(eot)  # pad must never be the trained stop token
    renderer = ChatRenderer(tok, eot)
    example = Example(
        "line 1",
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "The quick brown fox?"},
            {"role": "assistant", "content": "Jumps over the lazy dog.", "weight": 1},
            {"role": "user", "content": "And then?"},
            {"role": "assistant", "content": "It said thank you.", "weight": 0},
            {"role": "user", "content": "yes"},
            {"role": "assistant", "content": "yes", "weight": 1},
        ],
    )
    tokenized = renderer.tokenize(example)
    assert trained_text(tok, tokenized) == f"Jumps over the lazy dog.{eot}yes{eot}"
    everything = ChatRenderer(tok, eot, train_on_prompt=True).tokenize(example)
    assert all(label != IGNORE for label in everything.labels)


def test_truncation_and_text_format(tmp_path, tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    long_answer = {"messages": [{"role": "user", "content": "word " * 60}, {"role": "assistant", "content": "ok"}]}
    report = check_data(write_jsonl(tmp_path / "long.jsonl", [long_answer, CHAT]), tok, max_seq_len=32)
    assert report.ok and report.stats.truncated == 1 and len(report.usable) == 1
    report = check_data(write_jsonl(tmp_path / "all-long.jsonl", [long_answer]), tok, max_seq_len=32)
    assert "no example has a trained token within the first 32 tokens" in str(report.problems[-1])
    text = check_data(write_jsonl(tmp_path / "t.jsonl", [{"text": "The quick brown fox"}]), tok)
    assert text.tokenized[0].trained == len(text.tokenized[0].input_ids)


def test_data_check_cli(tmp_path, tiny_llama):
    good = write_jsonl(tmp_path / "good.jsonl", [CHAT] * 5)
    out = run_cli("data", "check", good, "--model", tiny_llama).output
    assert "5 valid example(s), format chat (detected)" in out and "tokens per example" in out
    assert "No problems found." in out and "about" in out
    bad = write_jsonl(tmp_path / "bad.jsonl", [CHAT, {"messages": [{"role": "user", "content": "q"}]}, "{oops"])
    result = run_cli("data", "check", bad, "--model", tiny_llama, ok=False)
    assert result.exit_code == 1
    assert "line 2: no assistant message" in result.output and "line 3: invalid JSON" in result.output


def test_a_control_token_written_in_the_data_is_refused(tiny_model, tmp_path):
    """Training would read it as the token (a turn that ends, one that opens), not as text."""
    from transformers import AutoTokenizer

    from edgeft.pipeline.data import check_data

    tok = AutoTokenizer.from_pretrained(tiny_model)
    eot = end_of_turn_for(tok)
    rows = [CHAT, {"messages": [{"role": "user", "content": f"hi{eot}"}, {"role": "assistant", "content": "ok"}]}]
    report = check_data(write_jsonl(tmp_path / "d.jsonl", rows), tok)
    expected = (
        f"line 2: message 1 contains {eot!r}, a control token of the model's chat format: it would be read as the "
        "token, not as text. Remove it or write it another way."
    )
    assert not report.ok and [str(p) for p in report.problems] == [expected]
