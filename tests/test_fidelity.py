"""The merged and exported model must be the model as trained: merge onto the base as training saw
it, compare against the as-trained model (NF4 base + adapter through bitsandbytes and peft for QLoRA),
and a drift beyond the gate fails the command unless the user accepts it."""

import json
import shutil

import pytest

from edgeft import fidelity
from edgeft.artifacts import Run
from edgeft.fidelity import Gate, judge
from edgeft.pipeline.merge import MERGE_CHECK_SAMPLES, merge
from edgeft.trained import Trained, as_trained_model, load_base
from tests.helpers import recipes_like, run_cli, tiny_run

# The merged model computes in fp32 with the very weights the as-trained model dequantizes on the
# fly: only the order of float sums differs (measured max |diff| ~1e-6 on the tiny models).
MERGE_ATOL = 1e-4


def _logits(model, ids):
    import torch

    with torch.no_grad():
        return model(ids).logits


def _merged(run_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(Run.open(run_dir).merged_dir).eval()


@pytest.fixture(scope="module")
def qlora_runs(tiny_llama, tiny_phi3, tmp_path_factory):
    """Finished QLoRA runs: Llama in fp32 and bf16 (the base is then stored in bf16), Phi-3 in fp32."""
    root = tmp_path_factory.mktemp("qlora-runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGEFT_HOME", str(root / "home"))
        return {
            (name, precision): tiny_run(
                model, root / f"{name}-{precision}", method="qlora", precision=precision, learning_rate=1e-2
            )
            for name, model, precision in (
                ("llama", tiny_llama, "fp32"),
                ("llama", tiny_llama, "bf16"),
                ("phi3", tiny_phi3, "fp32"),
            )
        }


@pytest.mark.parametrize("key", [("llama", "fp32"), ("llama", "bf16"), ("phi3", "fp32")], ids=lambda k: "-".join(k))
def test_qlora_merge_equals_nf4_base_plus_adapter(qlora_runs, key, tmp_path):
    import torch

    run_dir = shutil.copytree(qlora_runs[key], tmp_path / "run")
    trained = Trained.of(Run.open(run_dir))
    assert (trained.method, trained.precision) == ("qlora", key[1])
    reference = as_trained_model(trained)  # bitsandbytes Linear4bit + peft LoRA, unmerged
    assert any(type(m).__name__ == "Linear4bit" for m in reference.modules())
    merge(run_dir)
    ids = torch.randint(5, 500, (2, 24))
    expected = _logits(reference, ids)
    assert (_logits(_merged(run_dir), ids) - expected).abs().max() < MERGE_ATOL
    record = Run.open(run_dir).stage("merge")
    assert record["base_weights"] == "as-trained" and record["fidelity"]["gate"]["passed"]
    # every prompt checked comes with the user's answer (the 6 eval examples, then training ones): no built-in prompt
    assert record["fidelity"]["argmax_agreement"] == 1.0
    assert record["fidelity"]["exact_match_samples"] == record["fidelity"]["samples"] == MERGE_CHECK_SAMPLES
    # The old way, adapter + unquantized base, is measurably another model: this test can tell them apart.
    merge(run_dir, force=True, base_weights="original", allow_drift=True)
    assert (_logits(_merged(run_dir), ids) - expected).abs().max() > 20 * MERGE_ATOL


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_lora_and_dora_merge_equal_base_plus_adapter(tiny_llama, tmp_path, method):
    import torch

    run_dir = tiny_run(tiny_llama, tmp_path, method=method, learning_rate=1e-2)
    trained = Trained.of(Run.open(run_dir))
    merge(run_dir)
    ids = torch.randint(5, 500, (2, 24))
    assert (_logits(_merged(run_dir), ids) - _logits(as_trained_model(trained), ids)).abs().max() < MERGE_ATOL
    base = load_base(trained)
    assert all(p.dtype == torch.float32 for p in base.parameters())


def test_the_base_as_trained_keeps_bf16_rounding(qlora_runs):
    """A bf16 run trained against bf16-rounded norms and NF4 codes computed from bf16 weights."""
    import torch
    from transformers import AutoModelForCausalLM

    trained = Trained.of(Run.open(qlora_runs[("llama", "bf16")]))
    base = dict(load_base(trained).named_parameters())
    original = dict(AutoModelForCausalLM.from_pretrained(trained.base, dtype=torch.float32).named_parameters())
    embedding = "model.embed_tokens.weight"  # not quantized: only rounded to the bf16 it was stored in
    assert not torch.equal(original[embedding], original[embedding].to(torch.bfloat16).float())
    assert torch.equal(base[embedding], original[embedding].to(torch.bfloat16).float())
    projection = "model.layers.0.self_attn.q_proj.weight"  # NF4: 16 values per block of 64, times its scale
    assert base[projection].dtype == torch.float32 and len(base[projection][0, :64].unique()) <= 16


def test_merge_onto_the_original_weights_is_refused_unless_accepted(qlora_runs, tmp_path):
    # Phi-3: its NF4 rounding moves 11% of next-token choices (Llama's, with fp32 block scales, ~1%)
    run_dir = shutil.copytree(qlora_runs[("phi3", "fp32")], tmp_path / "run")
    result = run_cli("merge", run_dir, "--base-weights", "original", ok=False)
    assert result.exit_code == 3
    assert "does not behave like the model you trained" in result.output and "--allow-drift" in result.output
    record = Run.open(run_dir).stage("merge")
    assert (
        record["status"] == "drift"
        and not record["fidelity"]["gate"]["passed"]
        and record["fidelity"]["gate"]["problems"]
    )
    out = run_cli("merge", run_dir, "--base-weights", "original", "--allow-drift", "--force").output
    assert "fidelity gate          FAILED, accepted with --allow-drift" in out
    assert Run.open(run_dir).stage("merge")["status"] == "done"
    out = run_cli("merge", run_dir, "--force").output  # the default: as trained
    assert "fidelity gate          passed" in out and "argmax agreement       100.0%" in out


def test_export_is_verified_against_the_model_as_trained(qlora_runs, tmp_path, monkeypatch):
    from edgeft.export.onnx import ExportConfig, export

    run_dir = shutil.copytree(qlora_runs[("llama", "fp32")], tmp_path / "run")
    seen = {}
    real = as_trained_model

    def spy(trained):
        seen["model"] = real(trained)
        return seen["model"]

    monkeypatch.setattr("edgeft.trained.as_trained_model", spy)
    merge(run_dir)
    export(run_dir, ExportConfig(precision="fp32", verify_samples=4))
    assert any(type(m).__name__ == "Linear4bit" for m in seen["model"].modules())  # the reference is NF4 + adapter
    check = Run.open(run_dir).stage("export")["verification"]
    assert check["max_abs_logit_diff"] < 1e-3 and check["token_agreement"] == 1.0 and check["gate"]["passed"]


def test_an_export_outside_the_gate_fails_but_is_kept_and_recorded(tiny_llama_run, monkeypatch):
    monkeypatch.setattr(fidelity, "EXPORT_GATE", Gate(min_agreement=1.01, max_ppl_ratio=1.10, max_exact_match_drop=10))
    result = run_cli("export", tiny_llama_run, "--int4", "--verify-samples", "3", ok=False)
    assert result.exit_code == 3
    assert "The int4 export in" in result.output and "does not behave like the model you trained" in result.output
    assert "(gate: at least 101%)" in result.output and "--allow-drift" in result.output
    record = Run.open(tiny_llama_run).stage("export")
    assert record["status"] == "drift" and record["verification"]["gate"]["accepted"] is False
    assert (tiny_llama_run / "onnx-int4" / "genai_config.json").is_file()
    made = (tiny_llama_run / "onnx-int4" / "model.onnx").stat().st_mtime_ns
    # the same command again with --allow-drift, as the message says: the kept export is accepted, not made again
    out = run_cli("export", tiny_llama_run, "--int4", "--verify-samples", "3", "--allow-drift").output
    assert "FAILED, accepted with --allow-drift" in out and "it is not made again" in out
    assert (tiny_llama_run / "onnx-int4" / "model.onnx").stat().st_mtime_ns == made
    record = Run.open(tiny_llama_run).stage("export")
    assert record["status"] == "done" and record["verification"]["gate"]["accepted"] is True
    kept = json.loads((tiny_llama_run / "onnx-int4" / "edgeft-export.json").read_text())
    assert kept["status"] == "done" and kept["options"]["allow_drift"] is True
    # other options make it again (and, the export being there, need --force)
    out = run_cli("export", tiny_llama_run, "--int4", "--verify-samples", "2", "--allow-drift", "--force").output
    assert "it is not made again" not in out and "FAILED, accepted with --allow-drift" in out
    assert (tiny_llama_run / "onnx-int4" / "model.onnx").stat().st_mtime_ns != made


# --- the gate -----------------------------------------------------------------------------------


def result(**kw):
    base = {
        "token_agreement": 0.9,
        "argmax_agreement": 0.99,
        "candidate_ppl": 2.0,
        "reference_ppl": 2.0,
        "ppl_change_pct": 0.0,
        "exact_match_samples": 40,
        "reference_exact_match": 90.0,
        "candidate_exact_match": 85.0,
    }
    return {**base, **kw}


def test_the_gate_names_each_problem():
    gate = fidelity.EXPORT_GATE
    assert judge(result(), gate) == []
    # The QLoRA merge that lost the training: 23% token agreement, +20.5% perplexity, 57.5 vs 100 exact.
    lost = judge(
        result(
            token_agreement=0.23,
            candidate_ppl=2.41,
            ppl_change_pct=20.5,
            reference_exact_match=100.0,
            candidate_exact_match=57.5,
        ),
        gate,
    )
    assert len(lost) == 3 and "23.0%" in lost[0] and "+20.5%" in lost[1] and "58% of the reference answers" in lost[2]
    # Exact match is gated only with enough references: one answer would be 5+ points.
    assert judge(result(exact_match_samples=8, candidate_exact_match=50.0), gate) == []
    # Without greedy runs the argmax agreement is what counts (the merge check).
    merge_gate = fidelity.MERGE_GATE
    assert judge(result(token_agreement=None, argmax_agreement=1.0, candidate_exact_match=90.0), merge_gate) == []
    assert (
        "next-token choices"
        in judge(result(token_agreement=None, argmax_agreement=0.9, candidate_exact_match=90.0), merge_gate)[0]
    )


def test_on_the_built_in_prompts_the_gate_reads_next_token_choices():
    """A model with no data (a base model's export) is checked on the built-in prompts, where greedy
    answers diverge at the first rounding: the measured faithful SmolLM2 int4 export (16.8% greedy,
    84.8% next-token, +9.2% perplexity) passes, and a broken one still fails on what is gated."""
    builtin = dict(reference=fidelity.GREEDY_REFERENCE, exact_match_samples=0)
    faithful = result(**builtin, token_agreement=0.168, argmax_agreement=0.848, candidate_ppl=2.184, ppl_change_pct=9.2)
    assert judge(faithful, fidelity.EXPORT_GATE) == []
    broken = judge(result(**builtin, token_agreement=0.9, argmax_agreement=0.4), fidelity.EXPORT_GATE)
    assert len(broken) == 1 and "40.0% of next-token choices" in broken[0]
    assert judge(
        result(**builtin, candidate_ppl=2.5, ppl_change_pct=25.0), fidelity.EXPORT_GATE
    )  # perplexity still gated
    # with the user's answers (exact_match_samples > 0) greedy agreement is gated as before
    assert "greedy tokens" in judge(result(token_agreement=0.168), fidelity.EXPORT_GATE)[0]


def test_exact_match_comes_from_teacher_forced_logits():
    """Greedy decoding reproduces an answer iff the argmax is the reference token at every position."""
    import numpy as np

    class Fixed:
        def __init__(self, picks):
            self.picks = picks

        def logits(self, prompt, answer):
            out = np.zeros((len(answer), 10), dtype=np.float32)
            out[np.arange(len(answer)), self.picks[: len(answer)]] = 5.0
            return out

        def greedy(self, prompt, max_new, stops):
            return list(self.picks[:max_new])

    pairs = [([1, 2], [3, 4, 5])]
    same = fidelity.compare(Fixed([3, 4, 5]), Fixed([3, 4, 5]), pairs, {5}, greedy_samples=1)
    assert same["reference_exact_match"] == same["candidate_exact_match"] == 100.0 and same["token_agreement"] == 1.0
    off = fidelity.compare(Fixed([3, 4, 5]), Fixed([3, 7, 5]), pairs, {5}, greedy_samples=1)
    assert off["candidate_exact_match"] == 0.0 and off["argmax_agreement"] == pytest.approx(2 / 3, abs=1e-4)
    assert off["token_agreement"] == pytest.approx(1 / 3, abs=1e-4)
    assert off["candidate_ppl"] > off["reference_ppl"]


def test_eval_of_a_run_shows_as_trained_and_merged_rows(qlora_runs, tmp_path):
    from edgeft.evaluate import evaluate

    run_dir = shutil.copytree(qlora_runs[("llama", "fp32")], tmp_path / "run")
    data = recipes_like(tmp_path / "eval.jsonl", n=3, seed=3)
    only_adapter = evaluate([str(run_dir)], data, max_tokens=4, output=tmp_path / "a.json")
    assert [(r["label"], r["kind"]) for r in only_adapter["rows"]] == [("run as trained (PyTorch)", "as-trained")]
    merge(run_dir)
    report = evaluate([str(run_dir)], data, max_tokens=8, output=tmp_path / "b.json")
    trained, merged = report["rows"]
    assert (trained["kind"], merged["kind"]) == ("as-trained", "merged")
    assert merged["perplexity"] == pytest.approx(trained["perplexity"], rel=1e-4)
    predictions = [json.loads(line) for line in (tmp_path / "b.predictions.jsonl").read_text().splitlines()]
    assert [p["prediction"] for p in predictions[:3]] == [p["prediction"] for p in predictions[3:]]


# --- the real model -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def narrow_run(real_home, tmp_path_factory):
    """SmolLM2 fine-tuned with QLoRA on a narrow task and no eval file (a split is held out), merged once
    onto the base as loaded before it was quantized (the old merge) and kept (its check), then merged
    as trained and exported to int4 with the defaults (no --allow-drift: a DriftError fails the tests)."""
    from edgeft.export.onnx import ExportConfig, export
    from edgeft.pipeline.config import TuneConfig
    from edgeft.pipeline.tune import tune

    root = tmp_path_factory.mktemp("narrow")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGEFT_HOME", str(real_home))
        train = recipes_like(root / "train.jsonl", n=120)
        config = dict(method="qlora", max_steps=30, batch_tokens=256, max_seq_len=128, learning_rate=1e-3)
        run_dir = tune(TuneConfig(model="smollm2-135m", data=str(train), output=str(root / "run"), **config))
        merge(run_dir, base_weights="original", allow_drift=True)
        old_merge = Run.open(run_dir).stage("merge")["fidelity"]
        merge(run_dir, force=True)  # its check runs on the split's prompts too: a drift there fails here
        export(run_dir, ExportConfig())
    return run_dir, old_merge


@pytest.mark.real
@pytest.mark.xdist_group("narrow_run")  # one worker builds the module's run (~2 min) for both tests
def test_real_qlora_merge_and_int4_answer_like_the_model_as_trained(narrow_run, smollm2, tmp_path):
    """SmolLM2 learns a small task with QLoRA; the merged and int4 models must give its answers."""
    from edgeft.evaluate import evaluate

    run_dir, original = narrow_run
    # The old merge (adapter + the unquantized base) is another model (measured: largest logit difference
    # 15.5, though this easy task's answers survive it); the as-trained merge is the same one (1.1e-4).
    check = Run.open(run_dir).stage("merge")["fidelity"]
    assert check["gate"]["passed"] and check["argmax_agreement"] == 1.0 and check["max_abs_logit_diff"] < 1e-3
    assert original["max_abs_logit_diff"] > 100 * max(check["max_abs_logit_diff"], 1e-5)
    held_out = recipes_like(tmp_path / "eval.jsonl", n=24, seed=1)
    report = evaluate([str(run_dir), str(run_dir / "onnx-int4")], held_out, output=tmp_path / "eval.json")
    trained, merged, int4 = report["rows"]
    assert trained["exact_match"] >= 75  # it learned the task
    predictions = [json.loads(line) for line in (tmp_path / "eval.predictions.jsonl").read_text().splitlines()]
    answers = {
        row["label"]: [p["prediction"] for p in predictions if p["model"] == row["label"]] for row in report["rows"]
    }
    assert answers[merged["label"]] == answers[trained["label"]]  # the merged model is the model as trained
    same = sum(a == b for a, b in zip(answers[int4["label"]], answers[trained["label"]]))
    assert (
        same >= 20 and int4["exact_match"] >= trained["exact_match"] - 10
    )  # int4: 24 answers, measured 24/24 the same


@pytest.mark.real
@pytest.mark.xdist_group("narrow_run")
def test_real_gate_judges_a_narrow_task_on_its_own_prompts(narrow_run, smollm2, tmp_path):
    """A narrow task and no eval file: its export is checked on the split held out of the training data
    and passes; an export with the adapter dropped (the base model's) fails on those same prompts."""
    from edgeft.export.onnx import ExportConfig, export
    from edgeft.export.verify import verify

    run = Run.open(narrow_run[0])
    assert run.tune_record().held_out == run.held_out_file
    verification = run.stage("export")["verification"]
    assert verification["gate"]["passed"] and verification["exact_match_samples"] == verification["samples"] == 24
    assert verification["reference_exact_match"] >= 75  # the prompts are the task's: the model as trained knows them
    base = export("smollm2-135m", ExportConfig(output=str(tmp_path / "base-int4"), verify=False))
    dropped = verify(run.merged_dir, base, ExportConfig(), check_files=run.tune_record().check_files())
    assert not dropped["gate"]["passed"] and dropped["candidate_exact_match"] < 20, dropped


@pytest.mark.parametrize("shared", [0, fidelity.SHARED_PREFIX_MIN + 4])
@pytest.mark.parametrize("model_fixture", ["tiny_llama", "tiny_phi3"])
def test_references_scored_on_the_answers_own_cache_match_a_separate_pass(model_fixture, shared, request, monkeypatch):
    """Padded prompts of different lengths: the in-pass NLL equals a full forward pass per prompt,
    and the answers are the ones generate() gives without the scoring. With a long enough shared
    beginning (a system prompt), that part runs once for the batch, and nothing changes either."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(model_fixture)).eval()
    system = [20 + i for i in range(shared)]
    prompts = [system + p for p in ([5, 9, 2, 7, 3], [4, 8], [6, 1, 3])]
    assert fidelity._shared_prefix(prompts) == shared
    rows = fidelity.torch_greedy(model, prompts, 6, {0}, None)
    assert rows == [fidelity.torch_greedy(model, [p], 6, {0}, None)[0] for p in prompts]  # as each alone
    # the greedy answer itself (scored from its own steps' logits), its start, a reference it never wrote
    passes = []  # references scored by a pass of their own (not the answer's steps)
    one_pass = fidelity._score_references
    monkeypatch.setattr(fidelity, "_score_references", lambda *a: passes.extend(a[4]) or one_pass(*a))
    for references in ([rows[0][:4], [14], [15, 16]], [[11, 12, 13], rows[1][:3], rows[2][:2]]):
        passes.clear()
        again, scores, _ = fidelity.torch_greedy_scored(model, prompts, 6, {0}, None, references)
        assert again == rows
        assert passes == [r for r, row in zip(references, rows) if row[: len(r)] != r] != references
        for prompt, reference, (nll, n) in zip(prompts, references, scores):
            logits = _logits(model, torch.tensor([prompt + reference]))[0, len(prompt) - 1 : -1]
            alone = torch.nn.functional.cross_entropy(logits.float(), torch.tensor(reference), reduction="sum")
            assert n == len(reference) and nll == pytest.approx(float(alone), rel=1e-6)  # a position off by one: ~2e-5
