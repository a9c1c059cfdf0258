"""What an export's options mean: the config (each field with its CLI help), and how the int4
options resolve for a given model. Shared by both backends (genai builder, Optimum + ORT).
"""

from __future__ import annotations

from dataclasses import dataclass

from edgeft.config import check_choices, opt
from edgeft.errors import ConfigError


@dataclass
class ExportConfig:
    """How to export. Defaults are the fastest accurate choice measured on a 2-core CPU."""

    precision: str = opt(
        "int4", "Weight precision: int4 (recommended for CPU), int8, or fp32.", choices=("int4", "int8", "fp32")
    )
    backend: str = opt(
        "genai",
        "genai = onnxruntime-genai model builder (fused ops, fastest); optimum = Optimum graph + ORT quantizer.",
        choices=("genai", "optimum"),
    )
    block_size: int = opt(
        0,
        "Weights per quantization scale: smaller = more accurate, larger file. 0 = auto: 32.",
    )
    accuracy_level: int = opt(
        4, "MatMulNBits compute: 4 = int8 activations (fastest on CPU), 3 = bf16, 2 = fp16, 1 = fp32."
    )
    symmetric: bool = opt(True, "Symmetric quantization (no zero points).")
    quant_method: str = opt(
        "auto",
        "How int4 weights are rounded. gptq = rounds each weight against the others on calibration data (most accurate; needs the run's training data or --calibration, and the genai backend); k_quant = searches each block's scale; rtn or default = plain rounding (fastest export). auto = gptq when calibration data is at hand, else k_quant.",
        choices=("auto", "gptq", "k_quant", "rtn", "default"),
    )
    calibration: str = opt("", "Chat data (JSONL) that GPTQ calibrates on (default: the run's training data).")
    embeddings: str = opt(
        "auto",
        "int4 only, for models whose embedding table is the head's matrix (tied): int8-shared = the lookup and the head share one int8 matrix (llama.cpp's Q8_0 token embedding); int8 = the lookup gets its own int8 table, the head stays int4 (+15 MB for SmolLM2-135M); same = both share the head's int4 matrix (smallest, least accurate). auto = int8-shared.",
        choices=("auto", "int8-shared", "int8", "same"),
    )
    int8_matmuls: str = opt(
        "auto",
        "int4 only: MatMuls kept in int8. qkv = the query, key and value projections in every layer; attention = those, the output projection and the MLP down projection in every layer; mixed = attention and down projections in a third of the layers (llama.cpp's Q4_K_M choice); none = all int4. auto = attention below 1B parameters (tiny models lose the most), mixed above.",
        choices=("auto", "attention", "qkv", "mixed", "none"),
    )
    lm_head: str = opt(
        "auto",
        "Precision of the output head. auto = int8, except for models that tie it to the embedding: int4 (measured harmless on SmolLM2-135M), and fp32 in an --int8 export (the builder's int8 head for a tied model fails to load in 0.15).",
        choices=("auto", "same", "int8", "fp32"),
    )
    verify: bool = opt(
        True,
        "Compare the export with the model as trained (token agreement, perplexity, exact answers; logits for fp32) and apply the fidelity gate.",
    )
    verify_samples: int = opt(
        24, "Held-out prompts used by verification (the first 8 are also decoded greedily by both models)."
    )
    allow_drift: bool = opt(
        False,
        "Keep an export that falls outside the fidelity gate against the model as trained (recorded in the manifest) instead of failing.",
    )
    as_adapter: bool = opt(
        False,
        "Export the run's adapter as a small .onnx_adapter (RUN/onnx-adapter) for a base export shared by every run on the same base model (built once, kept in EDGEFT_HOME/bases), instead of a merged model. Serve several with `edgeft serve BASE --adapter NAME=PATH`.",
    )
    output: str = opt("", "Output folder (default: RUN/onnx-PRECISION, or ./NAME-onnx-PRECISION for a bare model).")

    def recorded(self) -> dict:
        """The options as an export's record keeps them: what decides how the folder was made."""
        return {k: v for k, v in vars(self).items() if k != "output"}

    def __post_init__(self) -> None:
        check_choices(self)
        if self.block_size not in (0, 16, 32, 64, 128, 256):
            raise ConfigError(f"block_size = {self.block_size} is invalid: choose 16, 32, 64, 128 or 256 (0 = auto).")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ConfigError(f"accuracy_level = {self.accuracy_level} is invalid: choose 0 (default), 1, 2, 3 or 4.")
        if self.verify_samples < 1:
            raise ConfigError(f"verify_samples = {self.verify_samples} is invalid: it must be at least 1.")


def lm_head_precision(cfg: ExportConfig, model_config: dict) -> str:
    """The builder's int8 head is broken for tied embeddings in 0.15 (the model fails to load), so
    tied models share one int4 matrix between embedding and head instead."""
    if cfg.lm_head != "auto":
        return cfg.lm_head
    if not model_config.get("tie_word_embeddings"):
        return "int8"
    # At int8 the 0.15 builder cannot write a tied head in int8 at all (shared or not, the graph
    # names a *_Q4 matrix it never writes): only an fp32 head loads.
    return "fp32" if cfg.precision == "int8" else "same"


def embeddings_mode(cfg: ExportConfig) -> str:
    if cfg.precision != "int4":
        return "own"
    return "int8-shared" if cfg.embeddings == "auto" else cfg.embeddings


# The int8 MatMuls of each `int8_matmuls` mode, named as the builder names them (fused or not).
QKV_MATMULS = ("attn/qkv_proj", "attn/q_proj", "attn/k_proj", "attn/v_proj")
ATTENTION_MATMULS = (*QKV_MATMULS, "attn/o_proj", "mlp/down_proj")
INT8_KINDS = {"attention": ATTENTION_MATMULS, "mixed": ATTENTION_MATMULS, "qkv": QKV_MATMULS, "none": ()}


def int8_matmuls(cfg: ExportConfig, model_config: dict) -> str:
    if cfg.precision != "int4":
        return "none"
    if cfg.int8_matmuls != "auto":
        return cfg.int8_matmuls
    # Below 1B, GPTQ with int8 q/k/v only lost 6 points against the model as trained on the multi-turn
    # sample (29.0% against 35.0%); int8 attention and down projections lost none (35.0%).
    return "mixed" if estimate_parameters(model_config) >= 1e9 else "attention"


def block_size(cfg: ExportConfig) -> int:
    """32 weights a scale unless asked: GPTQ at 64 held on the recipe sample (89.0% against 88.0%
    at 32) but lost 8 points on the function-calling sample (77% against 85%, as trained 87%)."""
    return cfg.block_size or 32


# int8 needs no small blocks: its 255 steps hold a whole row's range. Symmetric in blocks of up to
# 256 (no zero points), an int8 weight of a layer costs 8.06-8.25 bits instead of 8.75 in blocks of
# 32 with zero points (scales stored in fp16): 4 MB less for SmolLM2-135M's int8 attention and down
# projections, and 6-16% faster decoding. The head, which writes the logits, keeps int4's blocks:
# in blocks of 64 it took the base model's k_quant export from +8.6% to +9.9% perplexity against
# the fp32 model (the export gate stops at +10%), for 0.9 MB.
INT8_MAX_BLOCK = 256


def int8_block(k: int) -> int:
    """Weights per scale of an int8 MatMul with `k` inputs: the largest power of two up to
    INT8_MAX_BLOCK that divides k (a block past the row's end would be padding), at least 16."""
    block = INT8_MAX_BLOCK
    while block > 16 and k % block:
        block //= 2
    return block


def int8_layers(mode: str, num_layers: int) -> set[int]:
    """The layers whose INT8_KINDS stay int8 (for `mixed`, the builder's rule)."""
    if mode in ("attention", "qkv"):
        return set(range(num_layers))
    if mode == "mixed":
        return {
            i
            for i in range(num_layers)
            if i < num_layers / 8 or i >= 7 * num_layers / 8 or (i - round(num_layers / 8)) % 3 == 2
        }
    return set()


def estimate_parameters(config: dict) -> float:
    hidden, layers = config.get("hidden_size", 0), config.get("num_hidden_layers", 0)
    inner, vocab = config.get("intermediate_size", 4 * hidden), config.get("vocab_size", 0)
    return layers * (4 * hidden * hidden + 3 * hidden * inner) + vocab * hidden


def describe(cfg: ExportConfig, model_config: dict) -> str:
    text = f"{cfg.precision}, block {block_size(cfg)}, accuracy level {cfg.accuracy_level}"
    if cfg.precision == "int4":
        text += f", {cfg.quant_method}, int8 MatMuls: {int8_matmuls(cfg, model_config)}"
    return text
