"""Verification: does the ONNX folder behave like the model as trained?

The reference is the model as trained (for a run: the base as training loaded it, NF4 for QLoRA,
plus the adapter, unmerged), else the PyTorch model that was exported. On the user's own prompts
(the run's held-out data, else its training data; built-in prompts only for a model without data)
`edgeft.fidelity` measures token agreement, perplexity, token-exact answers and the largest logit
difference; an fp32 export that disagrees is a bug (an error), a quantized one outside the fidelity
gate is a drift the user must accept.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from edgeft import fidelity
from edgeft.errors import ExportError

log = logging.getLogger(__name__)

FP32_MAX_LOGIT_DIFF = 1e-2  # fused kernels reorder float sums; beyond this an fp32 export is wrong
GREEDY_SAMPLES = 8  # prompts that are also decoded greedily by both models (token agreement)


class OnnxScorer:
    """An onnxruntime-genai model as a fidelity scorer."""

    def __init__(self, folder: Path, adapter: Path | None = None):
        import onnxruntime_genai as og

        from edgeft.cpu import usable_cpus
        from edgeft.runtime.engine import og_config, scoring_graph

        self.model = og.Model(og_config(folder, usable_cpus(), graph=scoring_graph(folder)))
        self.adapter = None
        if adapter is not None:  # a runtime adapter, active in every generator
            adapters = og.Adapters(self.model)
            adapters.load(str(adapter), "verified")
            self.adapter = (adapters, "verified")

    def logits(self, prompt: list[int], answer: list[int]):
        return fidelity.teacher_forced_logits(self.model, prompt, answer, adapter=self.adapter)

    def greedy(self, prompt: list[int], max_new: int, stops: set[int]) -> list[int]:
        return fidelity.og_greedy(self.model, prompt, max_new, stops, adapter=self.adapter)


def verify(
    model_dir: Path, onnx_dir: Path, cfg, *, check_files=(), reference=None, adapter: Path | None = None
) -> dict:
    """Compare the export (with `adapter` active, if given) with `reference` (a loaded PyTorch model;
    default: the one in `model_dir`) on prompts from `check_files` (the run's held-out data, then its
    training data; see chatdata.reference_pairs).

    An fp32 export that disagrees raises ExportError; the fidelity gate's verdict is in result["gate"].
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgeft.chatdata import reference_pairs

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if reference is None:
        reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    stops = set(json.loads((onnx_dir / "genai_config.json").read_text())["model"]["eos_token_id"])
    pairs = reference_pairs(tokenizer, check_files, cfg.verify_samples)
    result = fidelity.compare(
        fidelity.TorchScorer(reference, tokenizer.pad_token_id),
        OnnxScorer(onnx_dir, adapter),
        pairs,
        stops,
        greedy_samples=GREEDY_SAMPLES,
        progress="verifying",
    )
    result["seconds"] = round(time.perf_counter() - start, 1)
    _check_fp32(result, cfg)
    result["gate"] = fidelity.gate_record(result, fidelity.EXPORT_GATE, allow_drift=cfg.allow_drift)
    return result


def _check_fp32(result: dict, cfg) -> None:
    if cfg.precision == "fp32" and (
        result["max_abs_logit_diff"] > FP32_MAX_LOGIT_DIFF or result["token_agreement"] < 0.99
    ):
        raise ExportError(
            f"the fp32 export does not match PyTorch: max |logit difference| {result['max_abs_logit_diff']} "
            f"(tolerance {FP32_MAX_LOGIT_DIFF}), token agreement {result['token_agreement']:.0%}. This is a bug in the "
            "export path; try --backend optimum and report it."
        )


def advice(cfg, model_config: dict) -> str:
    """What to try when an export drifts: the levers not already in effect (`cfg` has the rounding
    that ran; auto options are resolved for the model)."""
    from edgeft.export.options import block_size, int8_matmuls

    # What moved the needle on SmolLM2-135M (README, "Export"): an int8 embedding table, GPTQ
    # rounding, int8 for the sensitive MatMuls, blocks of 32 where the rest is int4. Block size 16,
    # an fp32 head and fp32 activations did not.
    if cfg.precision != "int4":
        return "Try --fp32 to see whether quantization is the cause."
    levers = []
    if cfg.embeddings == "same":
        levers.append("--embeddings int8-shared (an int8 matrix for the embedding lookup and the head)")
    if cfg.quant_method != "gptq":
        levers.append("--quant-method gptq --calibration FILE (your training data)")
    if int8_matmuls(cfg, model_config) != "attention":
        levers.append("--int8-matmuls attention (int8 for the attention and down projections)")
    if block_size(cfg) != 32:
        levers.append("--block-size 32")
    if levers:
        return f"Options to try: {', '.join(levers)}, or --int8."
    return "--int8 stays closest to PyTorch (a larger folder); check what the loss costs with `edgeft eval`."
