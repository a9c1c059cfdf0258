"""edgeft merge: fold the adapter into an unquantized copy of the base model.

Never merge into 4-bit weights: adding a LoRA delta to dequantized NF4 and quantizing again shifts
the outputs. The base is loaded in fp32 on CPU (bf16 on a GPU), which is what the adapter's delta
is added to, and the result is what `edgeft export` converts.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from edgeft import artifacts, models
from edgeft.artifacts import Run
from edgeft.errors import ExportError, RunError

log = logging.getLogger(__name__)


def open_tuned_run(path: str | Path) -> Run:
    """A run whose adapter exists; otherwise say which command makes it."""
    run = Run.open(path)
    record = run.stage("tune") or {}
    if not (run.adapter_dir / "adapter_config.json").is_file():
        status = record.get("status", "not started")
        hint = f"edgeft tune --resume {run.path}" if status in ("interrupted", "running") else "edgeft tune"
        raise RunError(f"run {run.path} has no adapter yet (training is {status}). Finish it with: {hint}")
    return run


def merge(path: str | Path, *, force: bool = False) -> Path:
    """Merge the run's adapter into its base model; returns the merged folder."""
    run = open_tuned_run(path)
    target = run.merged_dir
    if target.exists() and not force:
        raise RunError(f"{target} already exists. Pass --force to merge again.")
    base = Path(run.manifest()["base_model"]["path"])
    if not base.exists():  # e.g. the cache was cleared: fetch the built-in again
        base = models.resolve_model(run.manifest()["base_model"]["spec"]).path
    artifacts.check_free_space(run.path, artifacts.dir_size(base) * 2, "merging")
    start = time.perf_counter()
    merged, tokenizer = merged_model(base, run.adapter_dir)
    with artifacts.staged_dir(target, force=True, what="merged model") as tmp:
        save_merged(merged, tokenizer, tmp)
    seconds = time.perf_counter() - start
    run.record_stage("merge", status="done", path=target.name, size_bytes=artifacts.dir_size(target),
                     seconds=round(seconds, 1), finished_at=artifacts.now())  # fmt: skip
    log.info(f"Merged {run.adapter_dir} into {base.name} in {seconds:.0f} s -> {target}")
    return target


def merged_model(base: Path, adapter: Path):
    """Base (full precision) + adapter, merged. Mismatches and corrupt files become clear errors."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    model = _load(lambda: AutoModelForCausalLM.from_pretrained(base, dtype=dtype), base)
    check_adapter_fits(model, adapter)
    try:
        model = PeftModel.from_pretrained(model, adapter)
    except Exception as e:
        raise ExportError(f"could not apply the adapter in {adapter} to {base}: {_reason(e)}") from None
    model = model.merge_and_unload()
    tokenizer = AutoTokenizer.from_pretrained(adapter if (adapter / "tokenizer_config.json").exists() else base)
    return model.to(torch.float32), tokenizer


def check_adapter_fits(model, adapter: Path) -> None:
    """An adapter trained on another base fails here with both shapes named, not deep inside peft."""
    from safetensors import safe_open

    weights = adapter / "adapter_model.safetensors"
    if not weights.is_file():
        raise ExportError(f"{weights} is missing; the adapter folder is incomplete. Re-run edgeft tune.")
    try:
        with safe_open(weights, "pt") as f:
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    except Exception as e:
        raise ExportError(f"{weights} is corrupted ({_reason(e)}). Re-run edgeft tune.") from None
    modules = dict(model.named_modules())
    for key, shape in shapes.items():
        # base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight -> model.layers.0.self_attn.q_proj
        name = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
        target = modules.get(name)
        if target is None or not hasattr(target, "in_features"):
            raise ExportError(f"the adapter in {adapter} was trained on a different base model: it has no layer {name}.")
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
        raise ExportError(f"could not load the model in {path}: {_reason(e)}. If a file is corrupted, fetch or train it again.") from None


def _reason(e: Exception) -> str:
    return str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
