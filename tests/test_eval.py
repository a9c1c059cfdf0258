import json

import pytest

from edgeft.artifacts import Run
from edgeft.errors import ConfigError, DataError
from edgeft.evaluate import Sample, evaluate, exact_match, is_json, load_samples, token_f1, with_shots
from edgeft.export.onnx import ExportConfig, export
from tests.helpers import merged, recipes_like, run_cli


def test_exact_match_compares_json_as_data():
    assert exact_match('["onion", "garlic"]', '["onion","garlic"]')
    assert not exact_match('["garlic", "onion"]', '["onion", "garlic"]')
    assert exact_match("  Hello   world ", "Hello world")
    assert not exact_match("hello world", "Hello world")


def test_token_f1_and_json_validity():
    assert token_f1("the onion and garlic", "onion, garlic") == pytest.approx(0.8)
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0
    assert is_json('["a"]') and not is_json("[a") and not is_json("hello")


def test_shots_come_before_the_question_after_the_system_prompt():
    q = Sample([{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}], "A")
    shot = Sample([{"role": "system", "content": "S"}, {"role": "user", "content": "q1"}], "a1")
    assert [m["content"] for m in with_shots(q, [shot])] == ["S", "q1", "a1", "Q"]


def test_eval_table_over_every_kind_of_model(tiny_llama_run, tiny_llama, tmp_path):
    export(merged(tiny_llama_run), ExportConfig(verify=False))
    data = recipes_like(tmp_path / "eval.jsonl", n=5, seed=3)
    shots = recipes_like(tmp_path / "shots.jsonl", n=4, seed=4)
    out = run_cli(
        "eval",
        tiny_llama,
        tiny_llama_run,
        tiny_llama_run / "onnx-int4",
        "--data",
        data,
        "--shots",
        "2",
        "--rag",
        "2",
        "--shots-file",
        shots,
        "--max-tokens",
        "8",
        "--batch-size",
        "2",  # PyTorch rows batch prompts by length: their predictions must still come in the data's order
    ).output
    report = json.loads((tiny_llama_run / "logs" / "eval.json").read_text())
    labels = [r["label"] for r in report["rows"]]
    assert labels == [
        f"{tiny_llama.name} zero-shot",
        f"{tiny_llama.name} 2-shot",
        f"{tiny_llama.name} + 2 retrieved",
        "llama-run as trained (PyTorch)",
        "llama-run merged (PyTorch)",
        "onnx-int4 (ONNX)",
    ]
    assert [r["kind"] for r in report["rows"]] == ["base", "base", "base", "as-trained", "merged", "fine-tuned"]
    assert [r["retrieved"] for r in report["rows"]] == [False, False, True, False, False, False]
    for row in report["rows"]:
        assert row["samples"] == 5 and 0 <= row["exact_match"] <= 100 and row["perplexity"] > 1
        assert row["json_valid"] is not None and row["latency_s"] > 0
        assert row["prompt_tokens"] > 0 and 0 < row["answer_tokens"] <= 8
        assert 0 < row["latency_p50_s"] <= row["latency_p95_s"]
    zero_shot, two_shot, retrieved = report["rows"][:3]
    assert two_shot["prompt_tokens"] > zero_shot["prompt_tokens"] + 20  # the shots are in the prompt
    assert retrieved["prompt_tokens"] > zero_shot["prompt_tokens"] + 20
    assert "| model | exact match %" in out and "Report:" in out
    assert Run.open(tiny_llama_run).stage("eval")["rows"] == report["rows"]
    predictions = (tiny_llama_run / "logs" / "eval.predictions.jsonl").read_text().splitlines()
    assert len(predictions) == 30 and {"prediction", "reference", "finish_reason"} <= set(json.loads(predictions[0]))
    references = [s.reference for s in load_samples(data)]
    for label in labels:
        assert [p["reference"] for p in map(json.loads, predictions) if p["model"] == label] == references


def test_onnx_and_pytorch_perplexity_agree_for_fp32(tiny_llama_run, tmp_path):
    from edgeft.pipeline.merge import merge

    merge(tiny_llama_run)
    export(tiny_llama_run, ExportConfig(precision="fp32", verify=False))
    data = recipes_like(tmp_path / "eval.jsonl", n=3, seed=3)
    report = evaluate(
        [str(tiny_llama_run), str(tiny_llama_run / "onnx-fp32")], data, max_tokens=6, output=tmp_path / "r.json"
    )
    _, torch_row, onnx_row = report["rows"]
    assert torch_row["label"] == "llama-run merged (PyTorch)"
    assert onnx_row["perplexity"] == pytest.approx(torch_row["perplexity"], rel=1e-3)
    assert onnx_row["exact_match"] == torch_row["exact_match"]


def test_no_merged_leaves_out_the_merged_row_and_only_it(tiny_llama_run, tmp_path):
    merged(tiny_llama_run)
    data = recipes_like(tmp_path / "eval.jsonl", n=2, seed=3)
    out = tmp_path / "r.json"
    run_cli("eval", tiny_llama_run, "--data", data, "--max-tokens", "4", "--no-merged", "--output", out)
    assert [r["kind"] for r in json.loads(out.read_text())["rows"]] == ["as-trained"]
    run_cli("eval", tiny_llama_run, "--data", data, "--max-tokens", "4", "--output", out)
    assert [r["kind"] for r in json.loads(out.read_text())["rows"]] == ["as-trained", "merged"]


def test_answers_get_room_for_the_longest_reference_and_no_more(tiny_llama, tmp_path):
    from transformers import AutoTokenizer

    data = recipes_like(tmp_path / "eval.jsonl", n=3, seed=5)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    longest = max(len(tokenizer.encode(s.reference, add_special_tokens=False)) for s in load_samples(data))
    report = evaluate([str(tiny_llama)], data, output=tmp_path / "r.json")
    assert report["max_tokens"] == report["rows"][0]["max_tokens"] == longest + 8
    predictions = [json.loads(line) for line in (tmp_path / "r.predictions.jsonl").read_text().splitlines()]
    assert max(p["answer_tokens"] for p in predictions) == longest + 8  # a random model rambles to the limit


def _memory_per_token(model) -> int:
    """Bytes a prompt token holds while a batch decodes, measured on the model: its KV cache (every
    layer) and the MLP's intermediate tensors (one layer's at a time: each MLP output but the last
    projection's, and that projection's input)."""
    import torch

    mlp, seen = model.model.layers[0].mlp, []
    hooks = [
        module.register_forward_hook(lambda m, inputs, out: seen.append(out.nbytes))
        for name, module in mlp.named_children()
        if name != "down_proj"
    ]
    hooks.append(mlp.down_proj.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].nbytes)))
    tokens = 16
    try:
        with torch.no_grad():
            cache = model(torch.randint(5, 100, (1, tokens)), use_cache=True).past_key_values
    finally:
        for hook in hooks:
            hook.remove()
    kv = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    return (kv + sum(seen)) // tokens


def test_pytorch_batch_fits_its_memory_budget(tiny_model):
    """The batch of prompts the PyTorch backend decodes at once fits EVAL_BATCH_MEMORY (1 GiB) of KV
    cache and MLP activations, as measured on the model, and one prompt more would not, or it is
    EVAL_BATCH_MAX (32); a prompt too long for the budget on its own still runs, alone."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from edgeft.evaluate import EVAL_BATCH_MAX, EVAL_BATCH_MEMORY, TorchBackend

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    per_token = _memory_per_token(model)
    backend = SimpleNamespace(model=model)
    chosen = {}
    for tokens in (64, 2_000, 20_000, 200_000, 2_000_000, 20_000_000):  # the tiny model's rows are small
        batch, row = TorchBackend.batch_size(backend, tokens), tokens * per_token
        chosen[tokens] = batch
        if row > EVAL_BATCH_MEMORY:
            assert batch == 1, tokens
            continue
        assert 1 <= batch <= EVAL_BATCH_MAX and batch * row <= EVAL_BATCH_MEMORY, (tokens, batch, row)
        assert batch == EVAL_BATCH_MAX or (batch + 1) * row > EVAL_BATCH_MEMORY, (tokens, batch, row)
    values = list(chosen.values())
    assert values[0] == EVAL_BATCH_MAX and values[-1] == 1 and any(1 < b < EVAL_BATCH_MAX for b in values), chosen


def test_eval_bad_input(tiny_llama, tmp_path):
    data = recipes_like(tmp_path / "eval.jsonl", n=3)
    with pytest.raises(ConfigError, match="--shots-file"):
        evaluate([str(tiny_llama)], data, shots=2)
    with pytest.raises(ConfigError, match="must not be the evaluation data"):
        evaluate([str(tiny_llama)], data, shots=2, shots_file=data)
    text = tmp_path / "t.jsonl"
    text.write_text('{"text": "hello"}\n')
    with pytest.raises(DataError, match="plain text"):
        evaluate([str(tiny_llama)], text)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    assert "invalid JSON" in run_cli("eval", tiny_llama, "--data", bad, ok=False).output
    assert "0 is not in the range" in run_cli("eval", tiny_llama, "--data", data, "--batch-size", "0", ok=False).output


def test_a_constrained_row_for_the_fine_tuned_export(tiny_llama_run, tmp_path):
    """--json-schema auto: the schema is inferred from the JSON references, and the fine-tuned export
    is evaluated again with its answers held to it (the tiny random model writes JSON only then)."""
    from edgeft.evaluate import infer_json_schema

    export(merged(tiny_llama_run), ExportConfig(verify=False))
    data = recipes_like(tmp_path / "eval.jsonl", n=4, seed=3)  # references: JSON lists of strings
    report = evaluate(
        [str(tiny_llama_run / "onnx-int4")], data, max_tokens=40, json_schema="auto", output=tmp_path / "r.json"
    )
    free, constrained = report["rows"]
    assert constrained["label"] == "onnx-int4, constrained (ONNX)" and constrained["constrained"]
    assert constrained["json_valid"] > free["json_valid"] and constrained["perplexity"] is None
    assert not free["constrained"]
    rows = [json.loads(line) for line in (tmp_path / "r.predictions.jsonl").read_text().splitlines()]
    held = [r for r in rows if r["model"] == constrained["label"] and r["finish_reason"] == "stop"]
    assert held and all(is_json(r["prediction"]) for r in held)  # only a length cut can leave it unfinished
    assert infer_json_schema([["a"], ["b", "c"]]) == {"type": "array", "items": {"type": "string"}}
    assert infer_json_schema([{"k": 1, "x": None}, {"k": 2.5}]) == {
        "type": "object",
        "properties": {"k": {"type": "number"}, "x": {"type": "null"}},
        "required": ["k"],
        "additionalProperties": False,
    }
    plain = tmp_path / "plain.jsonl"
    plain.write_text(
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    )
    with pytest.raises(ConfigError, match="references that are all JSON"):
        evaluate([str(tiny_llama_run / "onnx-int4")], plain, json_schema="auto")
    with pytest.raises(ConfigError, match="cannot read the JSON schema"):
        evaluate([str(tiny_llama_run / "onnx-int4")], data, json_schema=str(tmp_path / "missing.json"))


def test_only_a_row_that_scores_loads_the_scoring_graph(tiny_llama_run):
    """A constrained row only answers, as an app does: the generation graph, whose prompt pass skips
    the head; the free row scores its references in the answer's pass: the scoring graph."""
    from edgeft.evaluate import OnnxBackend, candidates, with_constrained_rows
    from edgeft.runtime.engine import SCORE_GRAPH

    export(merged(tiny_llama_run), ExportConfig(verify=False))
    schema = {"type": "array", "items": {"type": "string"}}
    free, constrained = with_constrained_rows(candidates([str(tiny_llama_run / "onnx-int4")], 0), schema)
    assert OnnxBackend(free).model.genai_config["model"]["decoder"]["filename"] == SCORE_GRAPH
    assert not OnnxBackend(constrained).model.scoring


def test_what_a_request_costs_in_one_sentence_and_a_chart(tmp_path):
    from edgeft.evaluate import _percentile, cost_comparison
    from edgeft.plots import quality_vs_latency

    def row(label, kind, shots, em, prompt, p50):
        return dict(
            label=label, backend="onnx", kind=kind, shots=shots, exact_match=em, prompt_tokens=prompt, latency_p50_s=p50
        )

    rows = [row("base zero-shot", "base", 0, 2.0, 120, 0.5), row("base 3-shot", "base", 3, 20.0, 600, 1.5)]
    rows.append(row("onnx-int4", "fine-tuned", 0, 80.0, 150, 0.3))
    sentence = cost_comparison(rows)
    assert sentence == (
        "The fine-tuned int4 model answers with 4.0x fewer prompt tokens and 5.0x faster (median latency) than "
        "base 3-shot, at 80.0% exact match against 20.0%."
    )
    assert cost_comparison(rows[:2]) is None  # nothing fine-tuned to compare
    assert quality_vs_latency(rows, tmp_path / "q.png", title="t").stat().st_size > 5000
    assert _percentile([1, 2, 3, 4], 50) == 2.5 and _percentile([5], 95) == 5 and _percentile([], 50) == 0.0


def test_retrieval_puts_the_most_similar_training_examples_next_to_the_question():
    from edgeft.evaluate import retrieve

    def sample(question, answer="x"):
        return Sample([{"role": "system", "content": "S"}, {"role": "user", "content": question}], answer)

    pool = [sample("chocolate cake with sugar"), sample("garlic bread with butter"), sample("tomato soup with basil")]
    pool += [sample("garlic and butter toast"), sample("lemon tart")]
    found = retrieve(pool, [sample("butter garlic bread, please"), sample("a tomato and basil salad")], 2)
    assert [s.messages[1]["content"] for s in found[0]] == ["garlic and butter toast", "garlic bread with butter"]
    assert found[1][-1].messages[1]["content"] == "tomato soup with basil"
    assert [m["content"] for m in with_shots(sample("q"), found[1])][-1] == "q"  # the question stays last


def test_a_base_row_with_no_exact_match_stops_after_its_random_sample(
    tiny_llama, tiny_llama_run, tmp_path, monkeypatch
):
    """--base-sample N: a base row that matches none of N examples drawn at random stops there and
    says so with the 95% upper bound; one that matches answers every example, and so does every
    row of the fine-tuned model whatever it scores."""
    from edgeft.evaluate import _sample_first, table

    data = recipes_like(tmp_path / "eval.jsonl", n=9, seed=3)
    out = tmp_path / "r.json"
    args = ("eval", tiny_llama, tiny_llama_run, "--no-merged", "--data", data, "--max-tokens", "6", "--output", out)
    args += ("--batch-size", "3")  # the same batches each time: the same greedy answers
    text = run_cli(*args, "--base-sample", "4").output
    base, trained = json.loads(out.read_text())["rows"]
    assert base["exact_match"] == 0 and base["samples"] == 4  # a random model matches nothing
    assert base["stopped_early"] == {"examples": 9, "exact_match_upper95": 52.7}  # 1 - 0.05 ** (1 / 4)
    assert trained["samples"] == 9 and trained["stopped_early"] is None and trained["exact_match"] == 0
    predictions = [json.loads(line) for line in out.with_suffix(".predictions.jsonl").read_text().splitlines()]
    answered = [p["example"] for p in predictions if p["model"] == base["label"]]
    assert answered == _sample_first(9, 4)[0] and len(set(answered)) == 4  # the random draw, in the data's order
    references = [s.reference for s in load_samples(data)]
    assert all(p["reference"] == references[p["example"]] for p in predictions)
    assert "0.0 (≤ 52.7, 4 of 9)" in text and "stopped there" in "\n".join(table(json.loads(out.read_text())))

    # a base model right on one drawn example answers every example; right on examples outside the
    # draw only, it stops: the draw decides, as it must for its bound to hold
    samples = load_samples(data)
    drawn, rest = _sample_first(9, 4)
    for right, answers in (({drawn[1]}, 9), (set(rest), 4)):
        monkeypatch.setattr("edgeft.evaluate.TorchBackend", lambda c, right=right: _Answers(samples, right))
        row = evaluate([str(tiny_llama)], data, max_tokens=6, output=out, base_sample=4)["rows"][0]
        assert row["samples"] == answers and (row["stopped_early"] is None) == (answers == 9)
        assert row["exact_match"] == round(100 * len(right & set(drawn if answers == 4 else range(9))) / answers, 1)
    monkeypatch.setattr("edgeft.evaluate.TorchBackend", lambda c: _Answers(samples, set()))
    assert evaluate([str(tiny_llama)], data, max_tokens=6, output=out, base_sample=0)["rows"][0]["samples"] == 9


def test_a_sampled_base_row_shows_each_phase_s_progress_against_its_own_size(tiny_llama, tmp_path, monkeypatch):
    """Piped progress of a base row that answers a random draw first: the draw's lines count (and
    estimate the time left) against the draw's batches, the rest's against the rest's; never the
    whole row's, which would promise minutes a row that stops never takes."""
    import logging

    data = recipes_like(tmp_path / "eval.jsonl", n=9, seed=3)
    samples = load_samples(data)
    monkeypatch.setattr("edgeft.progress.PIPED_EVERY_S", 0.0)  # a line after every batch
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger("edgeft").addHandler(handler)
    try:
        for right, phases in (
            (set(), ["(drawn): 1/2 batch ", "(drawn): 2/2 batches "]),
            ({0, 1, 2, 3, 4, 5, 6, 7, 8}, None),
        ):
            lines.clear()
            monkeypatch.setattr("edgeft.evaluate.TorchBackend", lambda c, right=right: _Answers(samples, right))
            evaluate([str(tiny_llama)], data, max_tokens=6, output=tmp_path / "r.json", base_sample=4)
            shown = [line for line in lines if " batch" in line]
            if phases:  # stopped after the draw: 4 examples in batches of 2
                assert [next(p for p in phases if p in line) for line in shown] == phases
            else:  # went on: 2 batches drawn, then the other 5 examples in 3
                assert [line.split(": ")[1].split(" ")[0] for line in shown] == ["1/2", "2/2", "1/3", "2/3", "3/3"]
                assert sum("(the rest)" in line for line in shown) == 3
    finally:
        logging.getLogger("edgeft").removeHandler(handler)


class _Answers:
    """A stand-in PyTorch backend that answers the examples in `right` with their reference."""

    def __init__(self, samples, right):
        self.references = {s.reference: i for i, s in enumerate(samples)}
        self.right = right

    def count_tokens(self, text):
        return len(text.split())

    def prompt_ids(self, messages):
        return [0] * len(str(messages))

    def batch_size(self, tokens):
        return 2

    def generate_scored(self, prompts, references, max_tokens):
        answers = [(r if self.references[r] in self.right else "no", "stop", 1, 10) for r in references]
        return answers, 0.01, [(1.0, 1)] * len(references)
