"""Verification: does the ONNX folder behave like the PyTorch model it came from?

On held-out prompts (the run's eval data, else built-in prompts) it measures
- greedy token agreement over the first 32 generated tokens (how many leading tokens match),
- perplexity of both models on the reference answers (the eval answers, else PyTorch's own output),
- the largest |logit| difference at those positions (the fp32 correctness check).
The same token ids go into both models, so only the graph and its weights are compared.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

from edgeft.errors import ExportError

log = logging.getLogger(__name__)

GENERATED = 32
FP32_MAX_LOGIT_DIFF = 1e-2  # fused kernels reorder float sums; beyond this an fp32 export is wrong
PPL_WARN_RATIO = 1.10

BUILTIN_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
    "List three fruits that are red.",
    "How do I boil an egg?",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 7?",
    "Give me a tip for writing clean code.",
    "Name the largest planet in the solar system.",
    "Summarize the water cycle in one sentence.",
]


def samples(tokenizer, eval_file: Path | None, n: int) -> list[tuple[list[int], list[int] | None]]:
    """(prompt ids, reference answer ids or None) pairs, rendered with the model's chat template."""
    from edgeft.pipeline.data import end_of_turn_for, load_dataset

    pairs = []
    eot = tokenizer.convert_tokens_to_ids(end_of_turn_for(tokenizer))
    if eval_file and Path(eval_file).exists():
        for example in load_dataset(eval_file).examples[:n]:
            if example.text is not None or example.messages[-1]["role"] != "assistant":
                continue
            prompt = tokenizer.apply_chat_template(_plain(example.messages[:-1]), add_generation_prompt=True, tokenize=True)
            answer = tokenizer.encode(example.messages[-1]["content"], add_special_tokens=False) + [eot]
            pairs.append((list(prompt), answer))
    for text in BUILTIN_PROMPTS:
        if len(pairs) >= n:
            break
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
        pairs.append((list(prompt), None))
    return pairs


def _plain(messages: list[dict]) -> list[dict]:
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def verify(model_dir: Path, onnx_dir: Path, cfg, *, eval_file: Path | None = None) -> dict:
    """Compare PyTorch and ONNX; fail an fp32 export that disagrees, warn on an int4 perplexity loss."""
    import numpy as np
    import onnxruntime_genai as og
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgeft.runtime.engine import negative_log_likelihood, teacher_forced_logits

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    onnx_model = og.Model(str(onnx_dir))
    stops = set(json.loads((onnx_dir / "genai_config.json").read_text())["model"]["eos_token_id"])
    pairs = samples(tokenizer, eval_file, cfg.verify_samples)
    agree, identical, torch_nll, onnx_nll, count, max_diff = [], 0, 0.0, 0.0, 0, 0.0
    for prompt, reference in tqdm(pairs, desc="verifying", unit="prompt", disable=None):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = torch_model.generate(ids, max_new_tokens=GENERATED, do_sample=False, eos_token_id=sorted(stops),
                                       pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        torch_tokens = out[0, len(prompt) :].tolist()
        onnx_tokens = _greedy(og, onnx_model, prompt, GENERATED, stops)
        n = min(len(torch_tokens), len(onnx_tokens))
        leading = next((i for i in range(n) if torch_tokens[i] != onnx_tokens[i]), n)
        agree.append(leading / max(len(torch_tokens), len(onnx_tokens), 1))
        identical += torch_tokens == onnx_tokens
        answer = reference or torch_tokens
        with torch.no_grad():
            logits = torch_model(torch.tensor([prompt + answer])).logits[0, len(prompt) - 1 : -1].float().numpy()
        onnx_logits = teacher_forced_logits(onnx_model, prompt, answer)
        max_diff = max(max_diff, float(np.abs(logits - onnx_logits).max()))
        torch_nll += negative_log_likelihood(logits, answer)
        onnx_nll += negative_log_likelihood(onnx_logits, answer)
        count += len(answer)
    result = {
        "samples": len(pairs),
        "reference": "eval answers" if eval_file and any(r for _, r in pairs) else "PyTorch greedy output",
        "token_agreement": round(sum(agree) / len(agree), 4),
        "identical_generations": identical,
        "pytorch_ppl": round(math.exp(torch_nll / count), 4),
        "onnx_ppl": round(math.exp(onnx_nll / count), 4),
        "max_abs_logit_diff": round(max_diff, 5),
        "seconds": round(time.perf_counter() - start, 1),
    }
    result["ppl_change_pct"] = round(100 * (result["onnx_ppl"] / result["pytorch_ppl"] - 1), 2)
    _judge(result, cfg)
    return result


def _greedy(og, model, prompt: list[int], max_new: int, stops: set[int]) -> list[int]:
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + max_new)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    tokens = []
    while not generator.is_done() and len(tokens) < max_new:
        generator.generate_next_token()
        token = int(generator.get_next_tokens()[0])
        tokens.append(token)
        if token in stops:
            break
    return tokens


def _judge(result: dict, cfg) -> None:
    if cfg.precision == "fp32" and (result["max_abs_logit_diff"] > FP32_MAX_LOGIT_DIFF or result["token_agreement"] < 0.99):
        raise ExportError(
            f"the fp32 export does not match PyTorch: max |logit difference| {result['max_abs_logit_diff']} "
            f"(tolerance {FP32_MAX_LOGIT_DIFF}), token agreement {result['token_agreement']:.0%}. This is a bug in the "
            "export path; try --backend optimum and report it."
        )
    if result["onnx_ppl"] > result["pytorch_ppl"] * PPL_WARN_RATIO:
        log.warning(
            f"WARNING: the {cfg.precision} export's perplexity is {result['ppl_change_pct']:+.1f}% worse than PyTorch "
            f"({result['onnx_ppl']} vs {result['pytorch_ppl']}). {_advice(cfg)}"
        )


def _advice(cfg) -> str:
    # What moved the needle on SmolLM2-135M (README, "Export"): an int8 embedding table, GPTQ
    # rounding, int8 for the sensitive MatMuls. Block size 16, an fp32 head and fp32 activations did not.
    if cfg.precision != "int4":
        return "Try --fp32 to see whether quantization is the cause."
    levers = []
    if cfg.embeddings == "same":
        levers.append("--embeddings int8 (a separate int8 table for the embedding lookup)")
    if cfg.quant_method != "gptq":
        levers.append("--quant-method gptq --calibration FILE (your training data)")
    if cfg.int8_matmuls in ("none", "mixed"):
        levers.append("--int8-matmuls attention (int8 for the attention and down projections)")
    if levers:
        return f"Options to try: {', '.join(levers)}, or --int8."
    return "--int8 stays closest to PyTorch (a larger folder); check what the loss costs with `edgeft eval`."


def table(result: dict) -> list[str]:
    """The verification numbers as a small table for the terminal and the report."""
    return [
        f"  samples                {result['samples']} (reference: {result['reference']})",
        f"  token agreement        {result['token_agreement']:.1%} of the first {GENERATED} greedy tokens "
        f"({result['identical_generations']}/{result['samples']} generations identical)",
        f"  perplexity             PyTorch {result['pytorch_ppl']:.3f}  ONNX {result['onnx_ppl']:.3f}  ({result['ppl_change_pct']:+.2f}%)",
        f"  max |logit diff|       {result['max_abs_logit_diff']}",
    ]
