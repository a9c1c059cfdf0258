import json
import os
import signal

import pytest

from edgeft import artifacts
from edgeft.artifacts import Run
from edgeft.chatdata import IGNORE, Tokenized
from edgeft.config import load_config
from edgeft.errors import ConfigError, DataError, DeviceError, DiskSpaceError, ModelError, RunError
from edgeft.pipeline import tune as tuning
from edgeft.pipeline.config import TuneConfig
from edgeft.pipeline.tune.model import load_model, loss_head, summed_loss
from edgeft.pipeline.tune.packing import shared_prefix
from tests.helpers import recipes_like, run_cli, small_config

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


# --- packing -------------------------------------------------------------------------------


def test_pack_keeps_examples_whole_and_within_capacity():
    lengths = [50, 60, 30, 90, 10, 100]
    rows = tuning.pack(lengths, list(range(6)), 100)
    assert sorted(i for row in rows for i in row) == list(range(6))
    assert all(sum(lengths[i] for i in row) <= 100 for row in rows)


def test_plan_is_deterministic_and_covers_the_data():
    cfg = TuneConfig(data="x", batch_tokens=100, max_seq_len=50, epochs=2, grad_accum=2)
    lengths = [30, 40, 20, 50, 10, 25, 45, 35]
    plan = tuning.Plan(lengths, cfg)
    assert plan.steps(0) == tuning.Plan(lengths, cfg).steps(0)
    assert plan.steps(0) != plan.steps(1)  # reshuffled each epoch
    assert sorted(i for step in plan.steps(1) for row in step for i in row) == list(range(8))
    assert all(len(step) <= 2 for step in plan.steps(0))
    assert plan.total == sum(plan.steps_per_epoch)


def test_collate_shifts_targets_inside_each_example():
    a = Tokenized([1, 2, 3], [IGNORE, 2, 3], 3)
    b = Tokenized([4, 5], [IGNORE, 5], 2)
    batch = tuning.collate([a, b], "cpu")
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["segments"] == [3, 2]
    # position 0 predicts 2, 1 predicts 3; the last token of `a` must not predict the first of `b`
    assert batch["keep"].tolist() == [0, 1, 3] and batch["targets"].tolist() == [2, 3, 5]


def test_packed_attention_never_crosses_examples(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    tuning.register_packed_attention()
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=tuning.PACKED_ATTENTION).eval()
    a, b = torch.randint(5, 500, (1, 7)), torch.randint(5, 500, (1, 5))
    with torch.no_grad():
        alone_a, alone_b = model(a, segments=[7]).logits, model(b, segments=[5]).logits
        packed = model(
            torch.cat([a, b], 1), position_ids=torch.tensor([[*range(7), *range(5)]]), segments=[7, 5]
        ).logits
    assert torch.allclose(packed[:, :7], alone_a, atol=1e-5)
    assert torch.allclose(packed[:, 7:], alone_b, atol=1e-5)


def test_shared_prefix_is_only_leading_untrained_tokens_every_example_has():
    prompt = list(range(10, 22))  # 12 tokens every example begins with, untrained
    a = Tokenized(prompt + [1, 2, 3], [IGNORE] * 14 + [3], 15)
    b = Tokenized(prompt + [1, 5, 6], [IGNORE] * 14 + [6], 15)
    c = Tokenized(prompt + [7, 8, 9, 4], [IGNORE] * 14 + [9, 4], 16)
    assert shared_prefix([a, b, c]) == 12 and shared_prefix([a, b]) == 13
    assert shared_prefix([a]) == 0  # nothing to share
    # the 13th token is common to both, but in `early` it predicts a trained token: it stays its own
    early = Tokenized(prompt + [1, 2], [IGNORE] * 13 + [2], 14)
    assert shared_prefix([a, early]) == 12
    trained = Tokenized(prompt + [1, 2], [IGNORE] * 5 + prompt[5:] + [1, 2], 14)  # its 6th token is trained
    assert shared_prefix([a, trained]) == 0  # 4 shared tokens: under SHARED_MIN
    batch = tuning.collate([a, b], "cpu")
    assert batch["shared"] == 13 and batch["segments"] == [2, 2] and batch["tokens"] == 30
    assert batch["input_ids"].tolist() == [prompt + [1, 2, 3, 5, 6]]
    assert batch["position_ids"].tolist() == [[*range(13), 13, 14, 13, 14]]
    assert batch["targets"].tolist() == [3, 6]  # 2 -> 3 in a, 5 -> 6 in b
    assert tuning.collate([a, b], "cpu", share=False)["targets"].tolist() == [3, 6]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_eval_loss_leaves_a_qlora_model_trainable(tiny_llama, precision):
    """An eval pass (eval mode, no gradients) between steps: the next training step computes the same
    loss and gradients as before it. bitsandbytes repacks NF4 weights in place for its bf16 inference
    kernel on AVX512-BF16 CPUs; training on them then gave loss 19 instead of 0.35 (a real run)."""
    import torch

    from edgeft.pipeline.tune import distributed
    from edgeft.pipeline.tune.loop import eval_loss

    cfg = TuneConfig(data="x", method="qlora")
    world = distributed.start("cpu", precision, cfg)
    model = load_model(tiny_llama, cfg, "cpu", precision)
    for name, p in model.named_parameters():  # LoRA B starts at zero: give every weight a gradient
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    head = loss_head(model)
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(5, 500, (n,), generator=g).tolist() for n in (12, 9)]
    examples = [Tokenized(i, [IGNORE] + i[1:], len(i)) for i in ids]

    def step():
        model.zero_grad()
        with world.accelerator.autocast():
            loss = summed_loss(model, head, tuning.collate(examples, "cpu"))
        loss.backward()
        return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    model.train()
    before, grads = step()
    eval_loss(model, head, world, examples, 128)
    after, grads_after = step()
    assert after == pytest.approx(before, rel=1e-5)
    assert all(torch.allclose(grads[n], grads_after[n], rtol=1e-4, atol=1e-6) for n in grads)


@pytest.mark.parametrize("method,checkpointing", [("lora", "off"), ("qlora", "on")])
def test_a_shared_prefix_gives_the_same_loss_and_gradients(tiny_model, method, checkpointing):
    """The training step with the examples' common beginning run once equals the step with each
    example whole: same summed loss, same gradient on every LoRA weight (4-bit base and gradient
    checkpointing too: the recompute must see the shared tokens as well)."""
    import torch

    cfg = TuneConfig(data="x", method=method, lora_dropout=0.0, gradient_checkpointing=checkpointing)
    model = load_model(tiny_model, cfg, "cpu", "fp32")
    for name, p in model.named_parameters():  # LoRA B starts at zero: give every weight a gradient
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    head = loss_head(model)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(5, 500, (20,), generator=g).tolist()
    examples = []
    for n in (9, 4, 15):
        own = torch.randint(5, 500, (n,), generator=g).tolist()
        examples.append(Tokenized(prompt + own, [IGNORE] * 22 + own[2:], 20 + n))

    def step(share):
        model.zero_grad()
        batch = tuning.collate(examples, "cpu", share=share)
        loss = summed_loss(model, head, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return batch, loss.detach(), grads

    whole, loss, grads = step(False)
    shared, shared_loss, shared_grads = step(True)
    assert whole["shared"] == 0 and shared["shared"] == 20
    assert shared["input_ids"].shape[1] == whole["input_ids"].shape[1] - 40  # two copies of the prompt saved
    assert torch.allclose(shared_loss, loss, rtol=1e-5)
    assert grads.keys() == shared_grads.keys() and len(grads) > 0
    for name in grads:
        assert torch.allclose(shared_grads[name], grads[name], rtol=1e-4, atol=1e-6), name


# --- config --------------------------------------------------------------------------------


def test_config_validation_names_the_field():
    with pytest.raises(ConfigError, match="lora_r = 0 is invalid"):
        TuneConfig(lora_r=0)
    with pytest.raises(ConfigError, match="method = 'adapter' is invalid: choose one of qlora, lora, dora"):
        TuneConfig(method="adapter")
    with pytest.raises(ConfigError, match="one full-length example must fit"):
        TuneConfig(batch_tokens=128, max_seq_len=256)


def test_toml_config_and_flag_precedence(tmp_path):
    cfg = load_config(TuneConfig, REPO / "samples/recipes/tune.toml", {"epochs": 2.0})
    assert cfg.method == "qlora" and cfg.max_seq_len == 512 and cfg.epochs == 2.0
    bad = tmp_path / "bad.toml"
    bad.write_text("[tune]\nlearning_rat = 1e-4\n")
    with pytest.raises(ConfigError, match="learning_rat \\(did you mean learning_rate\\?\\)"):
        load_config(TuneConfig, bad, {})
    bad.write_text('lora_r = "sixteen"\n')
    with pytest.raises(ConfigError, match="wrong type: expected int"):
        load_config(TuneConfig, bad, {})
    bad.write_text("lora_r = [\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(TuneConfig, bad, {})


# --- training end to end on tiny models ----------------------------------------------------


def test_tune_cli_lora_llama(tmp_path, tiny_llama):
    data = recipes_like(tmp_path / "train.jsonl")
    evaluation = recipes_like(tmp_path / "eval.jsonl", n=6, seed=1)
    out = run_cli(
        "tune",
        "--model",
        tiny_llama,
        "--data",
        data,
        "--eval-file",
        evaluation,
        "--method",
        "lora",
        "--epochs",
        "2",
        "--batch-tokens",
        "128",
        "--max-seq-len",
        "64",
        "--output",
        "runs/t",
    ).output
    assert "Next: edgeft export" in out and "eval loss" in out
    run = Run.open(tmp_path / "runs/t")
    record = run.stage("tune")
    assert record["status"] == "done" and record["metrics"]["steps"] > 0 and record["metrics"]["eval_loss"] is not None
    assert record["data"]["sha256"] and record["config"]["method"] == "lora"
    assert run.manifest()["base_model"]["path"] == str(tiny_llama.resolve())
    rows = [json.loads(line) for line in (run.logs_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["type"] for r in rows].count("eval") == 2  # once per epoch
    assert all(r["tokens_per_second"] > 0 for r in rows if r["type"] == "train")
    assert (run.logs_dir / "loss.png").stat().st_size > 1000
    assert not run.checkpoints_dir.exists()  # a finished run keeps only its adapter


def test_eval_every_minus_one_keeps_the_held_out_file_but_computes_no_eval_loss(tmp_path, tiny_llama):
    """The quickstart's setting: its evaluate stage scores the held-out file, so the fine-tune does not."""
    data = recipes_like(tmp_path / "train.jsonl")
    evaluation = recipes_like(tmp_path / "eval.jsonl", n=6, seed=1)
    common = ["tune", "--model", tiny_llama, "--data", data, "--eval-file", evaluation, "--method", "lora"]
    common += ["--batch-tokens", "128", "--max-seq-len", "64"]
    out = run_cli(*common, "--eval-every", "-1", "--output", "runs/t").output
    assert "eval loss" not in out
    run = Run.open(tmp_path / "runs/t")
    rows = [json.loads(line) for line in (run.logs_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(r["type"] == "train" for r in rows)
    assert run.stage("tune")["metrics"]["eval_loss"] is None
    assert (run.adapter_dir / "adapter_model.safetensors").is_file()  # the final adapter, with no eval to pick one
    assert run.tune_record().eval_file == evaluation.resolve()  # merge and export still check on it
    refused = run_cli(*common, "--eval-every", "-2", "--output", "runs/u", ok=False)
    assert refused.exit_code != 0 and "eval_every" in refused.output and "-1 (never)" in refused.output


def test_adapter_loads_with_plain_peft_and_only_lora_weights_changed(tmp_path, tiny_phi3):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = recipes_like(tmp_path / "train.jsonl")
    tuning.tune(small_config(tiny_phi3, data, tmp_path / "run"))
    adapter = tmp_path / "run" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    targeted = {name.rsplit(".", 1)[-1] for name in config["target_modules"]}  # peft may store full module paths
    assert {"qkv_proj", "gate_up_proj", "o_proj", "down_proj"} <= targeted  # Phi-3's fused layers
    base = AutoModelForCausalLM.from_pretrained(tiny_phi3)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = PeftModel.from_pretrained(base, adapter)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # lora_B starts at zero: training moved it
    merged = model.merge_and_unload()
    changed = [k for k, v in merged.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all(any(m in k for m in ("qkv_proj", "gate_up_proj", "o_proj", "down_proj")) for k in changed)


def test_training_lowers_the_loss_and_moves_the_adapter(tmp_path, tiny_llama):
    """A few epochs on a small learnable dataset: the loss on that data, measured as training
    measures it, falls from the base model's (what the adapter starts as: lora_B is zero) by far more
    than noise; the recorded step losses fall; and every adapter weight moved. A no-op step fails all three."""
    import torch
    from safetensors.torch import load_file

    from edgeft.pipeline.tune import checkpoints, distributed
    from edgeft.pipeline.tune.loop import eval_loss
    from edgeft.pipeline.tune.start import prepare_data

    data = recipes_like(tmp_path / "train.jsonl", n=24)
    cfg = small_config(tiny_llama, data, tmp_path / "run", epochs=4, learning_rate=5e-3)
    run_dir = tuning.tune(cfg)

    examples = prepare_data(cfg).train
    world = distributed.start("cpu", "fp32", cfg)
    torch.manual_seed(cfg.seed)  # the adapter as training initialised it
    model = load_model(tiny_llama, cfg, "cpu", "fp32")
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    assert initial and all(not p.any() for n, p in initial.items() if "lora_B" in n)
    head = loss_head(model)
    before, _ = eval_loss(model, head, world, examples, cfg.batch_tokens)
    checkpoints.load_adapter_weights(run_dir, model)
    after, _ = eval_loss(model, head, world, examples, cfg.batch_tokens)
    assert after < 0.9 * before, (before, after)  # measured 6.47 -> 5.53 nats a token

    trained = {n: p.detach() for n, p in model.named_parameters() if "lora_" in n}
    assert trained.keys() == initial.keys()
    assert all(not torch.equal(trained[n], initial[n]) for n in initial), [
        n for n in initial if torch.equal(trained[n], initial[n])
    ]
    saved = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert all(v.abs().max() > 0 for k, v in saved.items() if "lora_B" in k)

    rows = [json.loads(line) for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["type"] == "train"]
    assert len(losses) >= 8 and sum(losses[-3:]) < 0.9 * sum(losses[:3]), losses  # measured 6.44 -> 5.52


@pytest.mark.parametrize("method", ["qlora", "dora"])
def test_qlora_and_dora_train(tmp_path, tiny_llama, method):
    data = recipes_like(tmp_path / "train.jsonl", n=12)
    run_dir = tuning.tune(small_config(tiny_llama, data, tmp_path / method, method=method, precision="auto"))
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] is (method == "dora")
    assert Run.open(run_dir).stage("tune")["status"] == "done"


def test_existing_run_needs_force(tmp_path, tiny_llama):
    data = recipes_like(tmp_path / "train.jsonl", n=6)
    cfg = small_config(tiny_llama, data, tmp_path / "r")
    tuning.tune(cfg)
    with pytest.raises(RunError, match="--force"):
        tuning.tune(small_config(tiny_llama, data, tmp_path / "r"))
    tuning.tune(small_config(tiny_llama, data, tmp_path / "r"), force=True)


def test_interrupted_run_resumes_to_the_same_result(tmp_path, tiny_llama):
    """Ctrl-C at step 3, resume, and end exactly where an uninterrupted run ends."""
    from safetensors.torch import load_file

    data = recipes_like(tmp_path / "train.jsonl", n=24)
    kw = dict(epochs=2, lora_dropout=0.1, save_every=2)  # dropout: the RNG state must be restored too
    tuning.tune(small_config(tiny_llama, data, tmp_path / "straight", **kw))

    def interrupt(entry):
        if entry["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(tuning.TrainingInterrupted, match="Resume with: edgeft tune --resume"):
        tuning.tune(small_config(tiny_llama, data, tmp_path / "resumed", **kw), on_step=interrupt)
    run = Run.open(tmp_path / "resumed")
    assert run.stage("tune")["status"] == "interrupted"
    assert json.loads((run.checkpoints_dir / "latest.json").read_text())["step"] == 3
    result = run_cli("tune", "--resume", tmp_path / "resumed")
    assert "Fine-tuned" in result.output

    straight = load_file(tmp_path / "straight/adapter/adapter_model.safetensors")
    resumed = load_file(tmp_path / "resumed/adapter/adapter_model.safetensors")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert (straight[key] - resumed[key]).abs().max() < 1e-6, key
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed/logs/metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # no step logged twice
    with pytest.raises(RunError, match="already finished"):
        tuning.resume(tmp_path / "resumed")


def test_full_disk_at_a_checkpoint_keeps_the_last_good_one(tmp_path, tiny_llama, monkeypatch):
    data = recipes_like(tmp_path / "train.jsonl", n=24)
    real_check = artifacts.check_free_space
    calls = []

    def fail_second_checkpoint(path, need, what):
        calls.append(what)
        if what == "writing a checkpoint" and calls.count(what) == 2:
            raise DiskSpaceError("writing a checkpoint needs about 50 MB of free disk ...")
        return real_check(path, need, what)

    monkeypatch.setattr(artifacts, "check_free_space", fail_second_checkpoint)
    with pytest.raises(DiskSpaceError):
        tuning.tune(small_config(tiny_llama, data, tmp_path / "r", epochs=2, save_every=2))
    checkpoints = tmp_path / "r" / "checkpoints"
    assert json.loads((checkpoints / "latest.json").read_text())["checkpoint"] == "step-000002"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest.json", "step-000002"]


# --- bad input -----------------------------------------------------------------------------


def test_bad_data_is_refused_before_loading_a_model(tmp_path, monkeypatch):
    monkeypatch.setattr(tuning.loop, "load_model", lambda *a, **k: pytest.fail("the model must not load"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "q"}]}\nnot json\n')
    result = run_cli("tune", "--model", "no-such-model", "--data", bad, ok=False)
    assert result.exit_code == 1
    assert "training did not start" in result.output and "line 2: invalid JSON" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "runs").exists()
    (tmp_path / "empty.jsonl").write_text("")
    assert "is empty" in run_cli("tune", "--data", tmp_path / "empty.jsonl", ok=False).output


def test_not_a_causal_lm(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(
        BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    ).save_pretrained(tmp_path / "bert")
    data = recipes_like(tmp_path / "d.jsonl", n=3)
    with pytest.raises(ModelError, match="not a causal"):
        tuning.tune(small_config(tmp_path / "bert", data, tmp_path / "r"))


def test_every_example_too_long(tmp_path, tiny_llama):
    data = tmp_path / "long.jsonl"
    data.write_text(
        json.dumps({"messages": [{"role": "user", "content": "word " * 100}, {"role": "assistant", "content": "ok"}]})
        + "\n"
    )
    with pytest.raises(DataError, match="raise --max-seq-len"):
        tuning.tune(small_config(tiny_llama, data, tmp_path / "r", max_seq_len=32, batch_tokens=64))


def test_qlora_where_4bit_does_not_work(tmp_path, tiny_llama, monkeypatch):
    import bitsandbytes

    def broken(*args, **kwargs):
        raise RuntimeError("no 4-bit kernels for this device")

    monkeypatch.setattr(bitsandbytes.nn, "Linear4bit", broken)
    data = recipes_like(tmp_path / "d.jsonl", n=3)
    with pytest.raises(DeviceError, match="Use --method lora"):
        tuning.tune(small_config(tiny_llama, data, tmp_path / "r", method="qlora"))
    assert not (tmp_path / "r").exists()


def test_cuda_asked_for_without_a_gpu(tmp_path, tiny_llama, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    data = recipes_like(tmp_path / "d.jsonl", n=3)
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        tuning.tune(small_config(tiny_llama, data, tmp_path / "r", device="cuda"))


def test_the_adapter_picked_by_name_is_the_adapter_peft_saves(tmp_path, tiny_phi3):
    """Under FSDP the adapter is picked from the gathered state dict by name (peft finds no weights
    behind FSDP's wrappers): the files must be the ones peft itself writes."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from edgeft.pipeline.tune.checkpoints import write_adapter

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_phi3), LoraConfig(target_modules="all-linear", task_type="CAUSAL_LM")
    )
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_()  # peft starts B at zero: make every tensor distinct
    write_adapter(model, tmp_path / "peft", None)
    write_adapter(model, tmp_path / "by-name", model.state_dict(), by_name=True)
    ours, theirs = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("by-name", "peft"))
    assert ours.keys() == theirs.keys() and len(ours) > 0
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    configs = [json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("by-name", "peft")]
    for config in configs:  # peft keeps target_modules as a set: its order in the JSON is not stable
        config["target_modules"] = sorted(config["target_modules"])
    assert configs[0] == configs[1]


def test_threads_follow_the_cpus_this_process_may_use(monkeypatch):
    """A container (or taskset) that gives the process one core of two: training, evaluation and the
    runtime use one thread, not os.cpu_count()'s two (oversubscribed, every step slows down)."""
    import torch

    from edgeft.cpu import usable_cpus
    from edgeft.pipeline.tune.model import pick_device

    before = torch.get_num_threads()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        assert usable_cpus() == 1
        assert pick_device(TuneConfig(data="x", device="cpu")) == "cpu" and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    "content", ["{not json", "[1, 2]", '{"smollm2-135m|qlora|cpu": {"tokens_per_second": "fast"}}']
)
def test_a_damaged_throughput_file_only_loses_the_estimate(content, tiny_llama):
    from edgeft import models
    from edgeft.pipeline.tune.progress import estimate_seconds, record_throughput

    path = models.edgeft_home() / "throughput.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    seconds, basis = estimate_seconds("smollm2-135m", tiny_llama, "qlora", "cpu", 10_000)
    assert seconds > 0 and basis.startswith("rough guess")
    record_throughput("smollm2-135m", "qlora", "cpu", 500.0)  # the next run writes it anew
    assert estimate_seconds("smollm2-135m", tiny_llama, "qlora", "cpu", 10_000) == (20.0, "measured 500 tokens/s here")


def test_the_piped_progress_line_says_what_is_left_at_this_pace(monkeypatch, caplog):
    """Piped (a log, CI): every line says the time left, the steps to come at the pace of the steps
    this process ran; a resumed run counts only its own steps."""
    import logging

    from edgeft.pipeline.tune import progress

    clock = {"now": 1000.0}
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock["now"])
    monkeypatch.setattr(logging.getLogger("edgeft"), "propagate", True)  # the CLI turns it off; caplog needs it
    bar = progress.Progress(total=100, initial=20)  # resumed at step 20
    entry = {"loss": 1.0, "epoch": 0.3, "tokens_per_second": 300.0, "lr": 1e-4}
    with caplog.at_level(logging.INFO, logger="edgeft"):
        clock["now"] += 120  # 10 steps in 2 minutes: 70 more take 14
        bar.update(0, {**entry, "step": 30})
    bar.close()
    assert "elapsed 2.0 min  left 14.0 min" in caplog.text


def test_the_summary_says_when_a_run_ended_still_learning(tiny_llama_run):
    """The last evaluation is the best and more than 10% below the one before: the run stopped while
    the model was still learning, and the summary says what to try."""
    from edgeft.pipeline.tune.start import summary

    run = Run.open(tiny_llama_run)
    metrics = run.logs_dir / "metrics.jsonl"
    train_rows = [line for line in metrics.read_text().splitlines() if '"eval"' not in line]
    steps = run.stage("tune")["metrics"]["steps"]

    def summary_with(*losses: float) -> str:
        at = [steps * (i + 1) // len(losses) for i in range(len(losses))]  # evaluations through the run
        evals = [
            json.dumps({"type": "eval", "step": s, "epoch": i, "eval_loss": x})
            for i, (s, x) in enumerate(zip(at, losses))
        ]
        metrics.write_text("\n".join(train_rows + evals) + "\n")
        best = min(range(len(losses)), key=losses.__getitem__)
        tune_metrics = run.stage("tune")["metrics"]
        run.record_stage(
            "tune",
            metrics={**tune_metrics, "eval_loss": losses[-1], "best_eval_loss": losses[best], "best_step": at[best]},
        )
        return "\n".join(summary(tiny_llama_run))

    assert "still learning: the eval loss fell 0.2000 -> 0.1000 between the last two evaluations" in summary_with(
        0.3, 0.2, 0.1
    )
    assert "still learning" not in summary_with(0.3, 0.2, 0.19)  # flattening out: 5% in the last stretch
    assert "still learning" not in summary_with(0.3, 0.1, 0.2)  # the best came earlier, and was kept
    assert "still learning" not in summary_with(0.3)  # one evaluation says nothing of a trend


# --- how long a run trains: --epochs 0 (auto) and --patience ------------------------------------


@pytest.fixture
def scripted_eval_loss(monkeypatch):
    """The loop's evaluations return these losses in turn: the stopping rule alone is under test."""
    losses: list[float] = []
    calls = iter(range(1000))
    monkeypatch.setattr("edgeft.pipeline.tune.loop.eval_loss", lambda *a: (losses[next(calls)], {}))
    return losses


def _evals(run_dir) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "logs/metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["type"] == "eval"]


def _stopping_run(tiny_llama, tmp_path, name: str, **kw):
    data = recipes_like(tmp_path / "train.jsonl", n=12)
    evaluation = recipes_like(tmp_path / "eval.jsonl", n=4, seed=1)
    return small_config(tiny_llama, data, tmp_path / name, eval_file=str(evaluation), **kw)


def test_the_run_stops_when_the_eval_loss_stops_falling_and_keeps_the_best(tmp_path, tiny_llama, scripted_eval_loss):
    from edgeft.pipeline.tune.start import summary

    scripted_eval_loss += [1.0, 0.8, 0.9, 0.7, 0.6]  # epoch 3 does not beat epoch 2's
    run_dir = tuning.tune(_stopping_run(tiny_llama, tmp_path, "stopped", epochs=5, patience=1))
    evals = _evals(run_dir)
    assert [e["eval_loss"] for e in evals] == [1.0, 0.8, 0.9]  # epochs 4 and 5 never ran
    metrics = Run.open(run_dir).stage("tune")["metrics"]
    steps_per_epoch = evals[0]["step"]
    assert metrics["steps"] == 3 * steps_per_epoch and metrics["stopped_early"] is True
    assert metrics["best_step"] == 2 * steps_per_epoch and metrics["best_eval_loss"] == 0.8
    text = "\n".join(summary(run_dir))
    assert "stopped early: the eval loss did not fall for 1 evaluation(s) in a row" in text
    assert "of the 5 epochs was skipped" in text and "still learning" not in text


def test_patience_counts_evaluations_in_a_row_and_0_never_stops(tmp_path, tiny_llama, scripted_eval_loss):
    scripted_eval_loss += [1.0, 0.8, 0.9, 0.7, 0.75]  # one worse evaluation, then a new best
    run_dir = tuning.tune(_stopping_run(tiny_llama, tmp_path, "two", epochs=5, patience=2))
    metrics = Run.open(run_dir).stage("tune")["metrics"]
    assert len(_evals(run_dir)) == 5 and metrics["stopped_early"] is False
    assert metrics["best_eval_loss"] == 0.7

    scripted_eval_loss += [1.0, 1.1, 1.2, 1.3]  # never better than the first, never stopped
    run_dir = tuning.tune(_stopping_run(tiny_llama, tmp_path, "never", epochs=4, patience=0))
    assert len(_evals(run_dir)) == 4 and Run.open(run_dir).stage("tune")["metrics"]["stopped_early"] is False


def test_a_resumed_run_stops_where_the_uninterrupted_one_stops(tmp_path, tiny_llama, scripted_eval_loss):
    """The evaluations without a new best are part of the checkpoint: Ctrl-C between the first worse
    evaluation and the second, and the resumed run still stops after the second."""
    scripted_eval_loss += [1.0, 0.8, 0.9, 0.95]
    straight = tuning.tune(_stopping_run(tiny_llama, tmp_path, "straight", epochs=5, patience=2, save_every=1))
    per_epoch = _evals(straight)[0]["step"]
    assert len(_evals(straight)) == 4

    def interrupt(entry):
        if entry["step"] == 3 * per_epoch + 1:  # after epoch 3's evaluation, the first without a new best
            os.kill(os.getpid(), signal.SIGINT)

    scripted_eval_loss += [1.0, 0.8, 0.9, 0.95]
    cfg = _stopping_run(tiny_llama, tmp_path, "resumed", epochs=5, patience=2, save_every=1)
    with pytest.raises(tuning.TrainingInterrupted):
        tuning.tune(cfg, on_step=interrupt)
    tuning.resume(tmp_path / "resumed")
    metrics = Run.open(tmp_path / "resumed").stage("tune")["metrics"]
    assert metrics["steps"] == 4 * per_epoch and metrics["stopped_early"] is True
    assert metrics["best_step"] == 2 * per_epoch


def test_auto_epochs_are_5_with_validation_data_and_3_without(tmp_path, tiny_llama, scripted_eval_loss):
    scripted_eval_loss += [1.0, 0.9, 0.8, 0.7, 0.6]
    run_dir = tuning.tune(_stopping_run(tiny_llama, tmp_path, "validated", epochs=0))
    assert Run.open(run_dir).stage("tune")["config"]["epochs"] == 5.0 and len(_evals(run_dir)) == 5

    data = recipes_like(tmp_path / "small.jsonl", n=12)  # too few to hold any out
    run_dir = tuning.tune(small_config(tiny_llama, data, tmp_path / "unvalidated", epochs=0))
    assert Run.open(run_dir).stage("tune")["config"]["epochs"] == 3.0 and not _evals(run_dir)
    assert TuneConfig().epochs == 0  # auto is the default
