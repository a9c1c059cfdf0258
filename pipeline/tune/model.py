"""The model being trained: device and precision, the base (4-bit for QLoRA) with LoRA/DoRA on it,
attention inside each packed example, and a loss that never holds the whole vocabulary's logits."""

from __future__ import annotations

import inspect
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from edgeft.cpu import has_native_bf16, usable_cpus
from edgeft.errors import DeviceError, ModelError
from edgeft.pipeline.config import TuneConfig
from edgeft.trained import NF4_DOUBLE_QUANT, base_load_kwargs, without_packed_inference

log = logging.getLogger(__name__)

PACKED_ATTENTION = "edgeft_packed"


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise ModelError(f"could not load the tokenizer of {path}: {e}") from None


def check_causal_lm(path: Path):
    """Refuse encoders, classifiers and the like before spending time loading their weights; returns the config."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:
        raise ModelError(f"could not read the model config in {path}: {e}") from None
    # Encoders such as BERT have a causal-LM class too; the saved architecture says what the weights are.
    architectures = config.architectures or []
    generative = not architectures or any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or not generative:
        raise ModelError(
            f"{path} is a '{config.model_type}' model, which is not a causal (text-generating) language model. "
            "edgeft fine-tunes decoder models such as Llama, Phi-3, Qwen or SmolLM."
        )
    return config


# --- device and precision ---------------------------------------------------------------------


def pick_device(cfg: TuneConfig) -> str:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise DeviceError(
            "--device cuda was asked for, but torch sees no CUDA GPU here. Use --device cpu (see `edgeft doctor`)."
        )
    device = pick_device_name(cfg.device)
    if device == "cpu":
        # Processes launched together share the cores: accelerate/torchrun say how many each gets.
        threads = cfg.threads or int(os.environ.get("OMP_NUM_THREADS", "0")) or usable_cpus()
        torch.set_num_threads(threads)
    return device


def pick_device_name(choice: str) -> str:
    """The device `--device auto` would use, without loading anything heavy beyond torch."""
    return "cuda" if choice in ("auto", "cuda") and torch.cuda.is_available() else "cpu"


def resolve_precision(precision: str, device: str) -> str:
    """bf16 only where the hardware computes it natively (GPU compute capability 8.0+, AVX512-BF16/AMX
    CPUs); fp16 with loss scaling on older GPUs; fp32 on other CPUs."""
    if precision != "auto":
        if precision == "bf16" and device == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
            raise DeviceError(
                "--precision bf16 needs a GPU that computes bf16 natively (compute capability 8.0+, Ampere or newer). "
                "Use --precision fp16."
            )
        if precision == "fp16" and device == "cpu":
            raise DeviceError("--precision fp16 is for GPUs; on a CPU use bf16 or fp32.")
        return precision
    if device == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    return "bf16" if has_native_bf16() else "fp32"


# --- the model -------------------------------------------------------------------------------


def load_model(
    path: Path,
    cfg: TuneConfig,
    device: str,
    precision: str,
    *,
    sharded: bool = False,
    double_quant: bool = NF4_DOUBLE_QUANT,
):
    """The base model (4-bit NF4 for QLoRA) with LoRA/DoRA adapters on every linear layer.

    Adapter weights stay fp32 (peft's default) but under FSDP/ZeRO-3; the frozen base is stored in
    the compute precision.
    `sharded` (FSDP, ZeRO-3): the 4-bit codes are packed in the compute dtype, so they shard
    alongside the rest (the codes, and so the weights, are the same), and the frozen norms and
    embeddings are not upcast to fp32 (one dtype per sharded unit).
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM
    from transformers.integrations import is_deepspeed_zero3_enabled

    register_packed_attention()
    kwargs = {
        **base_load_kwargs(cfg.method, precision, device, double_quant=double_quant),
        "attn_implementation": PACKED_ATTENTION,
    }
    zero3 = sharded and is_deepspeed_zero3_enabled()
    if sharded and cfg.method == "qlora":
        kwargs["quantization_config"].bnb_4bit_quant_storage = kwargs["dtype"]
        if zero3:  # ZeRO-3 places the weights itself and refuses a device map
            kwargs.pop("device_map", None)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as e:
        raise ModelError(f"could not load the model in {path}: {e}") from None
    checkpointing = use_gradient_checkpointing(cfg, device, model.config)
    # Non-reentrant checkpointing (it works with frozen inputs, DDP and FSDP alike), except under
    # ZeRO-3, whose parameters are released between forward and the recompute (measured: it fails).
    reentrant = {"use_reentrant": zero3}
    if cfg.method == "qlora" and not sharded:
        # fp32 norms and embeddings around the 4-bit layers: peft's recipe for stable QLoRA on one device
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=checkpointing, gradient_checkpointing_kwargs=reentrant
        )
    elif checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=reentrant)
        model.enable_input_require_grads()
    model.config.use_cache = False
    if cfg.method == "qlora" and device == "cpu":
        without_packed_inference(model)  # the eval loss between steps must leave the weights trainable
    targets = (
        cfg.target_modules if cfg.target_modules == "all-linear" else [m.strip() for m in cfg.target_modules.split(",")]
    )
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        use_dora=cfg.method == "dora",
        task_type="CAUSAL_LM",
    )
    try:
        # Sharded: the adapter in the base's dtype, since FSDP flattens one dtype per unit (fp32
        # adapters beside bf16 weights fail); single device and DDP: fp32 adapters (peft's default).
        model = get_peft_model(model, lora, autocast_adapter_dtype=not sharded)
    except ValueError as e:
        raise ModelError(f"could not attach LoRA to {path}: {e}. Check --target-modules.") from None
    base = model.get_base_model()
    base.lm_head = ChunkedLoss(base.lm_head, chunked=use_chunked_loss(device, cfg, base.config))
    return model


def use_gradient_checkpointing(cfg: TuneConfig, device: str, config) -> bool:
    """auto: always on a GPU; on a CPU only when the activations would crowd the RAM.

    Activations take about 200 bytes per token, layer and hidden unit (measured on SmolLM2:
    ~3.5 GB for a 1024-token row); checkpointing keeps one layer's worth but costs ~30% more time.
    """
    if cfg.gradient_checkpointing != "auto":
        return cfg.gradient_checkpointing == "on"
    if device == "cuda":
        return True
    activations = 200 * cfg.batch_tokens * config.num_hidden_layers * config.hidden_size
    return activations > 0.25 * total_ram()


def total_ram() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


# --- forward and loss --------------------------------------------------------------------------

LOSS_CHUNK = 1024  # positions per slice of the output head: 1024 x a 32k vocabulary is 128 MB of fp32 logits


def use_chunked_loss(device: str, cfg: TuneConfig, config) -> bool:
    """On a GPU always (memory is what limits the batch there); on a CPU only when one row's fp32
    logits would pass 512 MB, since recomputing the head in backward costs a small model ~10%."""
    return device == "cuda" or cfg.batch_tokens * config.vocab_size * 4 > 512 * 2**20


class ChunkedLoss(torch.nn.Module):
    """Stands in for the output head while training: given the hidden states of the trained
    positions it returns their summed cross-entropy (shape [1, 1]), not the logits.

    Sliced and recomputed in backward, the [positions x vocabulary] fp32 logits never exist at
    once. It runs inside the model's own forward, so DDP, FSDP and ZeRO see an ordinary pass.
    """

    def __init__(self, head, chunked: bool):
        super().__init__()
        self.head, self.chunked, self.targets = head, chunked, None

    @property
    def weight(self):
        """The head's weight, where tied-weight bookkeeping (FSDP's re-tying) looks for it."""
        return self.head.weight

    def _slice_loss(self, hidden, targets):
        return F.cross_entropy(self.head(hidden).float(), targets, reduction="sum")

    def forward(self, hidden):
        if self.targets is None:  # not a training or eval pass: behave as the head
            return self.head(hidden)
        hidden, targets = hidden[0], self.targets
        if not self.chunked:
            return self._slice_loss(hidden, targets).reshape(1, 1)
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, len(targets), LOSS_CHUNK):
            end = start + LOSS_CHUNK
            total = total + checkpoint(self._slice_loss, hidden[start:end], targets[start:end], use_reentrant=False)
        return total.reshape(1, 1)


def summed_loss(model, head, batch: dict):
    """Summed cross-entropy over the trained positions of a packed row (see ChunkedLoss)."""
    head.targets = batch["targets"]
    try:
        return kept_logits(model, batch).reshape(())
    finally:
        head.targets = None


def kept_logits(model, batch: dict):
    """The model's output over a packed row (packing.collate) at its trained positions only: their
    logits, or their summed loss while the head holds the targets."""
    return model(
        input_ids=batch["input_ids"],
        position_ids=batch["position_ids"],
        segments=batch["segments"],
        shared=batch["shared"],
        logits_to_keep=batch["keep"],
        use_cache=False,
    ).logits


def loss_head(model):
    """The ChunkedLoss module inside a (possibly wrapped) model."""
    for module in model.modules():
        if isinstance(module, ChunkedLoss):
            return module
    raise ModelError("the training model has no loss head (edgeft.pipeline.tune.model.load_model installs it)")


def packed_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, segments=None, shared=0, **kwargs
):
    """Causal attention inside each packed example and never across them.

    On CUDA one variable-length kernel call covers every example (flash-attention's varlen when
    installed, else torch's); elsewhere SDPA example by example: a dense block-diagonal mask costs
    T^2 per row (40% of a 2048-token step on CPU, measured), the loop only the sum of the squares.
    `shared` > 0 (CPU): the row starts with that many tokens every example begins with (see
    packing.collate); they attend among themselves, and each example to them and to its own tokens.
    """
    segments = segments or [query.shape[2] - shared]
    dropout = dropout if module.training else 0.0
    if query.is_cuda and len(segments) > 1 and not shared:
        # QLoRA's fp32 norms make q/k/v fp32 under autocast; SDPA would cast them down, so may we.
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else query.dtype
        if (varlen := _varlen_kernel(dtype, dropout)) is not None:
            q, k, v = (t.to(dtype) for t in (query, key, value))
            return varlen(q, k, v, segments, scaling, dropout), None

    def attend(q, k, v, mask=None):
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, scale=scaling, dropout_p=dropout, enable_gqa=True
        )

    outputs, start = [], shared
    prefix_k, prefix_v = key[:, :, :shared], value[:, :, :shared]
    if shared:
        outputs.append(attend(query[:, :, :shared], prefix_k, prefix_v))
    for n in segments:
        q, k, v = (t[:, :, start : start + n] for t in (query, key, value))
        if shared:  # row i of the example sees the shared tokens and its own first i + 1
            mask = torch.ones(n, shared + n, dtype=torch.bool, device=q.device).tril(diagonal=shared)
            outputs.append(attend(q, torch.cat([prefix_k, k], 2), torch.cat([prefix_v, v], 2), mask))
        else:
            outputs.append(attend(q, k, v))
        start += n
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def _varlen_kernel(dtype, dropout: float):
    """A CUDA variable-length causal attention over [1, heads, tokens, dim] inputs, or None.

    flash-attention's varlen kernel when it is installed; else torch's own (flash-based: fp16/bf16,
    no dropout); else None, and the caller loops over the examples.
    """
    try:
        from flash_attn import flash_attn_varlen_func

        def kernel(q, k, v, cu, n, scale):
            return flash_attn_varlen_func(q, k, v, cu, cu, n, n, dropout_p=dropout, softmax_scale=scale, causal=True)
    except ImportError:
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError:
            return None
        if dropout or dtype not in (torch.float16, torch.bfloat16):
            return None
        params = inspect.signature(varlen_attn).parameters
        causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}  # torch < 2.10

        def kernel(q, k, v, cu, n, scale):
            if q.shape[1] != k.shape[1]:  # grouped-query attention
                if "enable_gqa" in params:
                    return varlen_attn(q, k, v, cu, cu, n, n, scale=scale, enable_gqa=True, **causal)
                k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))  # torch < 2.13
            return varlen_attn(q, k, v, cu, cu, n, n, scale=scale, **causal)

    def run(query, key, value, segments, scale, _dropout):
        cu = torch.tensor([0, *segments], device=query.device, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [tokens, heads, dim]
        return kernel(q, k, v, cu, max(segments), scale).unsqueeze(0)

    return run


def register_packed_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_attention)
    AttentionMaskInterface.register(PACKED_ATTENTION, lambda *args, **kwargs: None)  # segments replace the mask
