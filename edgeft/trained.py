"""The model as trained: a run's base model loaded exactly as its fine-tune loaded it, plus the adapter.

One home for how training loads the frozen base (storage dtype, NF4 for QLoRA), so the training
loop, the merge, export verification and evaluation all see the very weights the adapter was
trained against. Heavy libraries are imported inside the functions.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from edgeft import models
from edgeft.artifacts import Run
from edgeft.errors import DeviceError, ExportError

# NF4 block scales kept in fp32, not quantized again to 8 bits ("double quantization"): bitsandbytes'
# CUDA and CPU kernels make the same 4-bit codes but round the 8-bit scales differently (measured on
# an H100: 0.05% of Phi-3-mini's weights off by up to 1e-3), so a base quantized on a GPU could not
# be rebuilt exactly on a CPU. fp32 scales are the same everywhere; they cost 0.37 bits a weight
# (~180 MB at 3.8B parameters). Runs recorded before this was a choice used double quantization.
NF4_DOUBLE_QUANT = False


@dataclass
class Trained:
    """What the adapter was trained against: the base model and how training loaded it."""

    base: Path
    adapter: Path
    method: str  # qlora | lora | dora
    precision: str  # the training's compute precision: fp32 | bf16 | fp16
    double_quant: bool = NF4_DOUBLE_QUANT  # QLoRA: were the NF4 block scales quantized again

    @classmethod
    def of(cls, run: Run) -> Trained:
        record, base = run.tune_record(), run.base_model()
        path = base.path if base.path.exists() else models.resolve_model(base.spec).path  # a cleared cache: fetch again
        # Runs from before precision was recorded at the start trained in fp32 unless they finished (then it is there).
        precision = (record and record.precision) or "fp32"
        return cls(
            path,
            run.adapter_dir,
            record.method if record else "lora",
            precision,
            record.nf4_double_quant if record else NF4_DOUBLE_QUANT,
        )


def torch_dtype(precision: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def base_load_kwargs(method: str, precision: str, device: str, *, double_quant: bool = NF4_DOUBLE_QUANT) -> dict:
    """How the frozen base is loaded for training: its storage dtype, and NF4 for QLoRA.

    The merge and the as-trained reference load it the same way, so they see the very weights
    (NF4 codes and scales, rounding to the storage dtype) that the adapter was trained against.
    """
    from transformers import BitsAndBytesConfig

    # fp16 weights would underflow; fp16 runs keep an fp32 base and let autocast handle the rest.
    dtype = torch_dtype("fp32" if precision == "fp16" else precision)
    kwargs = {"dtype": dtype}
    if method == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=dtype,
        )
        kwargs["device_map"] = {"": device if device == "cpu" else int(os.environ.get("LOCAL_RANK", "0"))}
    return kwargs


def check_qlora(device: str) -> None:
    """QLoRA needs bitsandbytes 4-bit kernels for this device; say so before loading anything."""
    import torch

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its notice about optional hub kernels is noise
    try:
        import bitsandbytes as bnb

        layer = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type="nf4").to(device)
        layer(torch.randn(1, 64, device=device))
    except Exception as e:
        raise DeviceError(
            f"--method qlora needs bitsandbytes 4-bit, which does not work on {device} here ({e}). Use --method lora."
        ) from None


def load_base(trained: Trained, *, keep_4bit: bool = False):
    """The base model with the weights training saw, in fp32 on the CPU.

    QLoRA: NF4 codes rebuilt exactly as training loaded them, then dequantized (or kept as
    bitsandbytes 4-bit layers with `keep_4bit`, the real thing). LoRA/DoRA: the base rounded to the
    storage dtype training used (bf16 on CPUs and GPUs that have it).
    """
    import torch
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
    kwargs = base_load_kwargs(trained.method, trained.precision, "cpu", double_quant=trained.double_quant)
    model = _load(lambda: AutoModelForCausalLM.from_pretrained(trained.base, **kwargs), trained.base)
    if trained.method != "qlora":
        return model.to(torch.float32)
    # The 4-bit load records a device map of "cpu"; peft reads that as offloading and re-dispatches
    # the model when the adapter is attached: onto a GPU if there is one, onto disk if RAM is short.
    model.__dict__.pop("hf_device_map", None)
    import bitsandbytes as bnb

    for param in model.parameters():
        if param.dtype in (torch.bfloat16, torch.float16):  # what peft's prepare_model_for_kbit_training does
            param.data = param.data.float()
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            # NF4 codes x block scales in fp32: the weights training dequantized, in full precision
            # (not rounded to the storage dtype, never quantized again).
            module.weight.quant_state.dtype = torch.float32
            # fp32 compute (and, below, not the packed bf16 inference kernel): the function as
            # trained, not an approximation.
            module.compute_dtype, module.compute_type_is_set = torch.float32, True
    without_packed_inference(model)
    return model if keep_4bit else dequantized(model)


def without_packed_inference(model) -> None:
    """Keep bitsandbytes from repacking a model's NF4 weights for its bf16 inference kernel.

    On CPUs with AVX512-BF16, a Linear4bit's first forward in eval mode without gradients rewrites
    its weight in place into that kernel's layout (and rounds the block scales to bf16). The model
    as trained must stay the function training computed; a model still training must stay
    trainable: a training step on repacked weights computes garbage (measured: QLoRA loss 0.35 ->
    19 right after the eval loss at an epoch's end)."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def dequantized(model):
    """A base loaded by `load_base(keep_4bit=True)` with its NF4 layers replaced, in place, by fp32
    Linears holding NF4 codes x block scales: the weights training saw, in full precision."""
    # transformers warns that it dequantizes into model.dtype: fp32 now, which is the point.
    logging.getLogger("transformers.integrations.bitsandbytes").setLevel(logging.ERROR)
    return model.dequantize()


def as_trained_model(trained: Trained):
    """The model as trained: the base as training saw it (bitsandbytes NF4 for QLoRA) + the adapter, unmerged."""
    base = load_base(trained, keep_4bit=True)
    return with_adapter(base, trained).eval()


def with_adapter(base, trained: Trained):
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


def _load(fn, path: Path):
    try:
        return fn()
    except Exception as e:
        raise ExportError(
            f"could not load the model in {path}: {_reason(e)}. If a file is corrupted, fetch or train it again."
        ) from None


def _reason(e: Exception) -> str:
    return str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__


def tokenizer_dir(trained: Trained) -> Path:
    """Where the run's tokenizer is: saved with the adapter, else the base model's."""
    return trained.adapter if (trained.adapter / "tokenizer_config.json").exists() else trained.base


def tokenizer_of(trained: Trained):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir(trained))


def save_merged(model, tokenizer, out: Path) -> None:
    """safetensors + tokenizer + chat template + a generation config that stops on every end of turn."""
    from edgeft.chatdata import stop_ids

    stops = stop_ids(tokenizer)
    model.generation_config.eos_token_id = stops
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = stops
    # Shards of 2 GB: safetensors copies a shard into memory while writing it.
    model.save_pretrained(out, safe_serialization=True, max_shard_size="2GB")
    tokenizer.save_pretrained(out)
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    if tokenizer.chat_template and not config.get("chat_template"):
        config["chat_template"] = tokenizer.chat_template  # runtimes that read only tokenizer_config.json
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False))
