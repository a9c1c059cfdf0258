"""Preference tuning (DPO): OpenAI's preference format and prompt/chosen/rejected, checked with line
numbers; a tiny model's DPO loss falls and its preference margin grows; --from an SFT run."""

from __future__ import annotations

import json
import random

import pytest

from edgeft.artifacts import Run
from edgeft.chatdata import load_dataset
from edgeft.errors import ConfigError
from edgeft.pipeline import tune as tuning
from tests.helpers import recipes_like, run_cli, small_config

WORDS = ["tomato", "onion", "garlic", "salt", "pepper", "basil", "cheese", "egg", "flour", "sugar"]


def preference_data(path, n: int = 24, seed: int = 0, *, form: str = "openai"):
    """Recipes whose preferred answer is the ingredients as a JSON list, the other a sentence about them."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            items = rng.sample(WORDS, 3)
            user = "Ingredients: " + ", ".join(f"2 cups {w}" for w in items)
            good, bad = json.dumps(items), "Sure! You will need " + " and ".join(items) + "."
            if form == "openai":
                row = {
                    "input": {"messages": [{"role": "user", "content": user}]},
                    "preferred_output": [{"role": "assistant", "content": good}],
                    "non_preferred_output": [{"role": "assistant", "content": bad}],
                }
            else:
                row = {"prompt": user, "chosen": good, "rejected": bad}
            f.write(json.dumps(row) + "\n")
    return path


# --- the data -----------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["openai", "pairs"])
def test_both_preference_forms_read_as_pairs(tmp_path, form):
    data = load_dataset(preference_data(tmp_path / "p.jsonl", n=3, form=form))
    assert data.format == "preference" and not data.problems and len(data.examples) == 3
    example = data.examples[0]
    assert [m["role"] for m in example.messages] == ["user", "assistant"] == [m["role"] for m in example.rejected]
    assert example.messages[0] == example.rejected[0] and example.messages[1] != example.rejected[1]


def test_openai_preference_data_with_tools_trains_the_call_as_text(tmp_path):
    tools = [
        {
            "type": "function",
            "function": {"name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}},
        }
    ]
    call = {
        "role": "assistant",
        "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}],
    }
    row = {
        "input": {"messages": [{"role": "user", "content": "add one"}], "tools": tools},
        "preferred_output": [call],
        "non_preferred_output": [{"role": "assistant", "content": "I cannot."}],
    }
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(row) + "\n")
    data = load_dataset(path)
    assert not data.problems, data.problems
    assert (
        "<tool_call>" in data.examples[0].messages[-1]["content"]
        and "# Tools" in data.examples[0].messages[0]["content"]
    )


@pytest.mark.parametrize(
    "row, message",
    [
        ({"input": {"messages": []}, "preferred_output": [], "non_preferred_output": []}, "non-empty 'messages'"),
        (
            {
                "input": {"messages": [{"role": "user", "content": "hi"}]},
                "preferred_output": [{"role": "assistant", "content": "a"}],
                "non_preferred_output": [],
            },
            "'non_preferred_output' must hold exactly one assistant message",
        ),
        (
            {
                "input": {"messages": [{"role": "user", "content": "hi"}]},
                "preferred_output": [{"role": "user", "content": "a"}],
                "non_preferred_output": [{"role": "assistant", "content": "b"}],
            },
            "'preferred_output' must be an assistant message",
        ),
        (
            {
                "input": {"messages": [{"role": "user", "content": "hi"}]},
                "preferred_output": [{"role": "assistant", "content": " "}],
                "non_preferred_output": [{"role": "assistant", "content": "b"}],
            },
            "'preferred_output': message 2 content is empty",
        ),
        ({"prompt": "hi", "chosen": "same", "rejected": "same "}, "are the same answer"),
        ({"prompt": [], "chosen": "a", "rejected": "b"}, "'prompt' must be a string or a non-empty list"),
    ],
)
def test_bad_preference_rows_are_refused_with_their_line(tmp_path, row, message):
    path = tmp_path / "bad.jsonl"
    good = {"prompt": "hello", "chosen": "yes", "rejected": "no"}
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    problems = load_dataset(path, "preference").problems
    assert problems and all(p.where == "line 2" for p in problems), problems
    assert any(message in p.message for p in problems), problems


def test_data_check_reports_pairs(tmp_path, tiny_llama):
    out = run_cli("data", "check", preference_data(tmp_path / "p.jsonl", n=6), "--model", tiny_llama).output
    assert "6 valid example(s), format preference (detected)" in out and "No problems found." in out


# --- training -----------------------------------------------------------------------------------


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "logs/metrics.jsonl").read_text().splitlines()]


def test_dpo_lowers_the_loss_and_grows_the_preference_margin(tmp_path, tiny_llama, caplog):
    """OpenAI's preference JSONL trains as is: the DPO loss (alone: sft_weight 0) starts at log 2
    (the model is its own reference) and falls, the reward margin grows, and the held-out pairs come
    to prefer the preferred answer; the summary and the evaluation lines say so."""
    from edgeft.pipeline.tune.start import summary

    caplog.set_level("INFO")
    data = preference_data(tmp_path / "train.jsonl", n=24)
    held = preference_data(tmp_path / "eval.jsonl", n=8, seed=1)
    cfg = small_config(
        tiny_llama, data, tmp_path / "dpo", eval_file=str(held), epochs=4, learning_rate=5e-3, beta=0.5, sft_weight=0
    )
    run_dir = tuning.tune(cfg)
    rows = _metrics(run_dir)
    train = [r for r in rows if r["type"] == "train"]
    evals = [r for r in rows if r["type"] == "eval"]
    assert train[0]["loss"] == pytest.approx(0.6931, abs=0.01)  # log 2: no preference yet
    assert sum(r["loss"] for r in train[-3:]) / 3 < 0.5 * train[0]["loss"], [r["loss"] for r in train]
    assert train[-1]["reward_margin"] > train[0]["reward_margin"] + 0.5
    assert evals[-1]["eval_reward_accuracy"] >= 0.75 and evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    record = Run.open(run_dir).stage("tune")
    assert record["metrics"]["eval_reward_accuracy"] >= 0.75
    assert (run_dir / "data" / "reference_logps.json").is_file()
    assert "preferences on held-out pairs: the preferred answer gained more in" in "\n".join(summary(run_dir))
    evaluations = [r.getMessage() for r in caplog.records if r.getMessage().startswith("eval at step")]
    assert evaluations and all("of pairs (reward margin" in m and "perplexity" not in m for m in evaluations)


def test_the_sft_term_adds_the_preferred_answers_mean_token_nll():
    """sft_weight: each pair's loss is DPO's plus that times the preferred answer's mean token NLL
    (TRL's "sft" loss beside "sigmoid"); the reward margin is DPO's alone."""
    import torch
    import torch.nn.functional as F

    from edgeft.pipeline.tune.preference import dpo_losses

    logps = torch.tensor([[-6.0, -9.0], [-12.0, -4.0]])
    counts = torch.tensor([[3, 4], [6, 2]])
    reference = torch.tensor([[-7.0, -8.0], [-10.0, -5.0]])
    alone, margins = dpo_losses(logps, counts, reference, beta=0.5)
    assert margins.tolist() == [0.5 * (1.0 - -1.0), 0.5 * (-2.0 - 1.0)]
    assert torch.allclose(alone, -F.logsigmoid(margins))
    both, same = dpo_losses(logps, counts, reference, beta=0.5, sft_weight=2.0)
    assert torch.equal(same, margins) and torch.allclose(both, alone + 2.0 * torch.tensor([6.0 / 3, 12.0 / 6]))


def test_dpo_starts_from_a_supervised_run(tmp_path, tiny_llama):
    """--from RUN: the DPO run starts from the SFT run's adapter (its reference is that model: the first
    step's loss is log 2 again), and a run whose adapter would not fit is refused in one line."""
    sft = tuning.tune(small_config(tiny_llama, recipes_like(tmp_path / "sft.jsonl"), tmp_path / "sft", epochs=2))
    data = preference_data(tmp_path / "train.jsonl", n=12)
    run_dir = tuning.tune(small_config(tiny_llama, data, tmp_path / "dpo", start_from=str(sft), sft_weight=0))
    first = next(r for r in _metrics(run_dir) if r["type"] == "train")
    assert first["loss"] == pytest.approx(0.6931, abs=0.01)
    assert Run.open(run_dir).stage("tune")["config"]["start_from"] == str(sft.resolve())
    scratch = tuning.tune(small_config(tiny_llama, data, tmp_path / "scratch", max_steps=1))

    def chosen_logp(run):  # the reference's log-probability of the preferred (JSON) answers
        pairs = json.loads((run / "data" / "reference_logps.json").read_text())["train"]
        return sum(chosen for chosen, _ in pairs) / len(pairs)

    assert chosen_logp(run_dir) > chosen_logp(scratch) + 1.0  # the SFT run learned JSON lists
    with pytest.raises(ConfigError, match="lora_r"):
        tuning.tune(small_config(tiny_llama, data, tmp_path / "other", start_from=str(sft), lora_r=4))


def test_a_dpo_run_merges_like_any_run(tmp_path, tiny_llama):
    """The merge's check compares the merged model with the model as trained on the pairs' prompts and
    preferred answers."""
    data = preference_data(tmp_path / "train.jsonl", n=12)
    run_dir = tuning.tune(small_config(tiny_llama, data, tmp_path / "dpo", epochs=2, learning_rate=5e-3))
    result = run_cli("merge", run_dir)
    assert result.exit_code == 0, result.output
    check = Run.open(run_dir).stage("merge")["fidelity"]
    assert check["gate"]["passed"] and check["reference"] == "eval answers"


def test_method_dpo_is_dpo_on_qlora_and_needs_pairs(tmp_path, tiny_llama):
    """`--method dpo` (OpenAI's name): preference tuning on QLoRA; on chat data, one line saying why not."""
    data = preference_data(tmp_path / "p.jsonl", n=6)
    common = ["--model", tiny_llama, "--batch-tokens", "128", "--max-seq-len", "64", "--max-steps", "1"]
    run_cli("tune", "--data", data, "--method", "dpo", "--output", "runs/d", *common)
    assert Run.open(tmp_path / "runs/d").stage("tune")["config"]["method"] == "qlora"
    refused = run_cli(
        "tune", "--data", recipes_like(tmp_path / "c.jsonl"), "--method", "dpo", "--output", "runs/c", *common, ok=False
    )
    assert refused.exit_code != 0 and "--method dpo trains on preference data" in refused.output


def test_eval_on_pairs_reports_how_often_the_preferred_answer_scores_higher(tmp_path, tiny_llama):
    """`edgeft eval` on preference data: each row gets the share of pairs whose preferred answer the
    model gives the higher log-likelihood, and each pair its margin. The base row's margins are the
    ones worked out here with plain transformers; after DPO the margins grew, as trained and in the
    export alike (the tiny model already prefers the short JSON answers to the sentences)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgeft.chatdata import stop_ids
    from edgeft.evaluate import load_samples

    data = preference_data(tmp_path / "train.jsonl", n=24)
    cfg = small_config(tiny_llama, data, tmp_path / "dpo", epochs=4, learning_rate=5e-3, beta=0.5, val_split=0)
    run_dir = tuning.tune(cfg)
    run_cli("export", run_dir, "--int8", "--allow-drift")
    report_file = tmp_path / "eval.json"
    models = (tiny_llama, run_dir, run_dir / "onnx-int8")
    shown = run_cli("eval", *models, "--data", data, "--no-merged", "--output", report_file).output
    assert "| model | preferred answer scored higher % |" in shown
    rows = {r["kind"]: r for r in json.loads(report_file.read_text())["rows"]}
    predictions = [json.loads(line) for line in report_file.with_suffix(".predictions.jsonl").read_text().splitlines()]

    def margins(kind: str) -> list[float]:
        return [p["preference_margin"] for p in predictions if p["model"] == rows[kind]["label"]]

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    end = stop_ids(tokenizer)[:1]

    def logp(messages, answer) -> float:
        prompt = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
        wanted = tokenizer.encode(answer, add_special_tokens=False) + end
        with torch.no_grad():
            logits = model(torch.tensor([prompt + wanted])).logits[0, len(prompt) - 1 : -1]
        return float(torch.log_softmax(logits, -1)[torch.arange(len(wanted)), torch.tensor(wanted)].sum())

    expected = [logp(s.messages, s.reference) - logp(s.messages, s.rejected) for s in load_samples(data)]
    assert margins("base") == pytest.approx(expected, abs=1e-2)
    share = 100 * sum(m > 0 for m in expected) / len(expected)
    assert rows["base"]["preference_accuracy"] == round(share, 1)
    mean = {kind: sum(margins(kind)) / len(expected) for kind in ("base", "as-trained", "fine-tuned")}
    assert mean["as-trained"] > mean["base"] + 1.0, mean
    assert mean["fine-tuned"] > mean["base"] + 1.0, mean
    assert rows["as-trained"]["preference_accuracy"] >= rows["base"]["preference_accuracy"]
