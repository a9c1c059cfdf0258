"""edgeft merge: fold the adapter into the base weights exactly as training saw them.

QLoRA trains the adapter against the NF4-rounded base, not the original weights; on a small model
that rounding is large and the adapter learns to work with it, so adding it to the original
weights gives a different model (measured: 23/40 exact answers instead of 40/40). The merge
therefore rebuilds the base the way training loaded it (same storage dtype, same NF4 codes),
dequantizes it, keeps it in fp32 (never quantizing it again) and adds the adapter's delta there.
Then it checks the merged model against the model as trained (NF4 base + adapter, through
bitsandbytes and peft) and refuses a drift, unless the user accepts it.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

from edgeft import artifacts, fidelity, models
from edgeft.artifacts import Run
from edgeft.errors import ConfigError, DeviceError, ExportError, RunError

log = logging.getLogger(__name__)

BASE_WEIGHTS = ("as-trained", "original")
MERGE_CHECK_SAMPLES = 24


@dataclass
class Trained:
    """What the adapter was trained against: the base model and how training loaded it."""

    base: Path
    adapter: Path
    method: str  # qlora | lora | dora
    precision: str  # the training's compute precision: fp32 | bf16 | fp16

    @classmethod
    def of(cls, run: Run) -> Trained:
        record = run.stage("tune") or {}
        base = Path(run.manifest()["base_model"]["path"])
        if not base.exists():  # e.g. the cache was cleared: fetch the built-in again
            base = models.resolve_model(run.manifest()["base_model"]["spec"]).path
        method = record.get("config", {}).get("method", "lora")
        return cls(base, run.adapter_dir, method, record.get("precision") or "fp32")


def open_tuned_run(path: str | Path) -> Run:
    """A run whose adapter exists; otherwise say which command makes it."""
    run = Run.open(path)
    record = run.stage("tune") or {}
    if not (run.adapter_dir / "adapter_config.json").is_file():
        status = record.get("status", "not started")
        hint = f"edgeft tune --resume {run.path}" if status in ("interrupted", "running") else "edgeft tune"
        raise RunError(f"run {run.path} has no adapter yet (training is {status}). Finish it with: {hint}")
    return run


def merge(
    path: str | Path, *, force: bool = False, base_weights: str = "as-trained", allow_drift: bool = False
) -> Path:
    """Merge the run's adapter into its base model as trained; returns the merged folder.

    Raises DriftError (after writing the folder and recording why) when the merged model does not
    behave like the model as trained and `allow_drift` is not set.
    """
    if base_weights not in BASE_WEIGHTS:
        raise ConfigError(f"base_weights = {base_weights!r} is invalid: choose one of {', '.join(BASE_WEIGHTS)}.")
    run = open_tuned_run(path)
    target = run.merged_dir
    if target.exists() and not force:
        raise RunError(f"{target} already exists. Pass --force to merge again.")
    trained = Trained.of(run)
    artifacts.check_free_space(run.path, artifacts.dir_size(trained.base) * 2, "merging")
    start = time.perf_counter()
    merged, tokenizer = merged_model(trained, base_weights=base_weights)
    with artifacts.staged_dir(target, force=True, what="merged model") as tmp:
        save_merged(merged, tokenizer, tmp)
    log.info(f"Merged {run.adapter_dir} into {trained.base.name} ({base_weights} base weights) -> {target}")
    check = check_merged(run, trained, merged, tokenizer, allow_drift=allow_drift)
    seconds = time.perf_counter() - start
    run.record_stage(
        "merge",
        status="done" if check["gate"]["passed"] or allow_drift else "drift",
        path=target.name,
        base_weights=base_weights,
        size_bytes=artifacts.dir_size(target),
        seconds=round(seconds, 1),
        fidelity=check,
        finished_at=artifacts.now(),
    )
    if not check["gate"]["passed"] and not allow_drift:
        for line in fidelity.table(check):
            log.info(line)
        advice = (
            "Merge with the default --base-weights as-trained."
            if base_weights != "as-trained"
            else ("This is unexpected for an as-trained merge: please report it with the run's edgeft.json.")
        )
        raise fidelity.DriftError(
            fidelity.drift_message("The merged model", str(target), check["gate"]["problems"], advice)
        )
    return target


def check_merged(run: Run, trained: Trained, merged, tokenizer, *, allow_drift: bool) -> dict:
    """The merged model against the model as trained, on the run's held-out data (teacher-forced)."""
    from edgeft.pipeline.data import end_of_turn_for, reference_pairs

    eval_file = (run.stage("tune") or {}).get("config", {}).get("eval_file") or None
    pairs = reference_pairs(tokenizer, eval_file, MERGE_CHECK_SAMPLES)
    stops = {tokenizer.convert_tokens_to_ids(end_of_turn_for(tokenizer)), tokenizer.eos_token_id} - {None}
    start = time.perf_counter()
    reference = fidelity.TorchScorer(as_trained_model(trained), tokenizer.pad_token_id)
    candidate = fidelity.TorchScorer(merged, tokenizer.pad_token_id)
    result = fidelity.compare(reference, candidate, pairs, stops, progress="checking the merge")
    result["gate"] = fidelity.gate_record(result, fidelity.MERGE_GATE, allow_drift=allow_drift)
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


# --- the base as trained ------------------------------------------------------------------


def load_base(trained: Trained, *, keep_4bit: bool = False):
    """The base model with the weights training saw, in fp32 on the CPU.

    QLoRA: NF4 codes rebuilt exactly as training loaded them, then dequantized (or kept as
    bitsandbytes 4-bit layers with `keep_4bit`, the real thing). LoRA/DoRA: the base rounded to the
    storage dtype training used (bf16 on CPUs and GPUs that have it).
    """
    import torch
    from edgeft.pipeline.tune import base_load_kwargs, check_qlora
    from transformers import AutoModelForCausalLM

    if trained.method == "qlora":
        try:
            check_qlora("cpu")
        except DeviceError:
            raise DeviceError(
                f"the model as trained in {trained.adapter.parent} is an NF4 base + adapter, and bitsandbytes 4-bit, which "
                "rebuilds it, does not work on this machine. Merge, export and evaluate this run where it does "
                "(`edgeft doctor` checks it)."
            ) from None
    kwargs = base_load_kwargs(trained.method, trained.precision, "cpu")
    model = _load(lambda: AutoModelForCausalLM.from_pretrained(trained.base, **kwargs), trained.base)
    if trained.method != "qlora":
        return model.to(torch.float32)
    import bitsandbytes as bnb

    for param in model.parameters():
        if param.dtype in (torch.bfloat16, torch.float16):  # what peft's prepare_model_for_kbit_training does
            param.data = param.data.float()
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            # NF4 codes x block scales in fp32: the weights training dequantized, in full precision
            # (not rounded to the storage dtype, never quantized again).
            module.weight.quant_state.dtype = torch.float32
            # fp32 compute, and not bitsandbytes' packed bf16 inference kernel, which also rounds the
            # block scales to bf16 (AVX512-BF16 CPUs): the function as trained, not an approximation.
            module.compute_dtype, module.compute_type_is_set = torch.float32, True
            module.support_avx512bf16_for_cpu = False
    if keep_4bit:
        return model
    # transformers warns that it dequantizes into model.dtype: fp32 now, which is the point.
    logging.getLogger("transformers.integrations.bitsandbytes").setLevel(logging.ERROR)
    return model.dequantize()


def as_trained_model(trained: Trained):
    """The model as trained: the base as training saw it (bitsandbytes NF4 for QLoRA) + the adapter, unmerged."""
    base = load_base(trained, keep_4bit=True)
    return _with_adapter(base, trained).eval()


def merged_model(trained: Trained, *, base_weights: str = "as-trained"):
    """The adapter folded into the base (as trained, or the original fp32 weights). Mismatches and corrupt files become clear errors."""
    import torch
    from transformers import AutoTokenizer

    if base_weights == "original":
        base = load_base(replace(trained, method="lora", precision="fp32"))
    else:
        base = load_base(trained)
    model = _with_adapter(base, trained).merge_and_unload()
    adapter = trained.adapter
    tokenizer = AutoTokenizer.from_pretrained(adapter if (adapter / "tokenizer_config.json").exists() else trained.base)
    return model.to(torch.float32).eval(), tokenizer


def _with_adapter(base, trained: Trained):
    from peft import PeftModel

    check_adapter_fits(base, trained.adapter)
    try:
        return PeftModel.from_pretrained(base, trained.adapter)
    except Exception as e:
        raise ExportError(f"could not apply the adapter in {trained.adapter} to {trained.base}: {_reason(e)}") from None


def check_adapter_fits(model, adapter: Path) -> None:
    """An adapter trained on another base fails here with both shapes named, not deep inside peft."""
    from safetensors import safe_open

    weights = adapter / "adapter_model.safetensors"
    if not weights.is_file():
        raise ExportError(f"{weights} is missing; the adapter folder is incomplete. Re-run edgeft tune.")
    try:
        with safe_open(weights, "pt") as f:
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable
    except Exception as e:
        raise ExportError(f"{weights} is corrupted ({_reason(e)}). Re-run edgeft tune.") from None
    modules = dict(model.named_modules())
    for key, shape in shapes.items():
        # base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight -> model.layers.0.self_attn.q_proj
        name = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
        target = modules.get(name)
        if target is None or not hasattr(target, "in_features"):
            raise ExportError(
                f"the adapter in {adapter} was trained on a different base model: it has no layer {name}."
            )
        expected = target.in_features if ".lora_A." in key else target.out_features
        got = shape[1] if ".lora_A." in key else shape[0]
        if ".lora_magnitude" not in key and got != expected:
            raise ExportError(
                f"the adapter in {adapter} was trained on a different base model: {name} has {expected} features "
                f"there but {got} in the adapter."
            )


def save_merged(model, tokenizer, out: Path) -> None:
    """safetensors + tokenizer + chat template + a generation config that stops on every end of turn."""
    from edgeft.pipeline.data import end_of_turn_for

    eot_id = tokenizer.convert_tokens_to_ids(end_of_turn_for(tokenizer))
    stops = sorted({i for i in (eot_id, tokenizer.eos_token_id) if i is not None})
    model.generation_config.eos_token_id = stops
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = stops
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    if tokenizer.chat_template and not config.get("chat_template"):
        config["chat_template"] = tokenizer.chat_template  # runtimes that read only tokenizer_config.json
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False))


def _load(fn, path: Path):
    try:
        return fn()
    except Exception as e:
        raise ExportError(
            f"could not load the model in {path}: {_reason(e)}. If a file is corrupted, fetch or train it again."
        ) from None


def _reason(e: Exception) -> str:
    return str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
