"""Fidelity: does a model still compute what the model as trained computed? One comparison and one
gate for every step after training (merge, export), so a drift can never pass silently.

Both models are "scorers" with two methods (PyTorch and ONNX Runtime each have one):
    logits(prompt_ids, answer_ids) -> (len(answer), vocab) float32 array, teacher-forced
    greedy(prompt_ids, max_new, stops) -> generated ids
On held-out prompts the comparison measures
- perplexity of both on the reference answers (eval answers, else the reference model's own output),
- exact match: greedy decoding reproduces a reference answer exactly if and only if the
  teacher-forced argmax equals the reference token at every position, so it comes from the same
  logits, for free (token-exact, stricter than `edgeft eval`'s JSON-aware match),
- argmax agreement: the share of answer positions where both models pick the same next token,
- token agreement (when asked): the share of leading greedy tokens that match, free-running,
- the largest |logit| difference (the fp32 correctness check).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

from edgeft.errors import EdgeftError

GENERATED = 32  # greedy tokens compared for token agreement
SHARED_PREFIX_MIN = 16  # a batch's prompts that share at least this many leading tokens run them once
MIN_EXACT_MATCH_SAMPLES = 20  # below this, one answer is 5+ points: exact match is reported, not gated
# An export's scoring graph (model-score.onnx) computes the logits of a chunk's last this many
# positions: a reference to score is fed in pieces no longer, a prompt's last position is all it needs
SCORE_POSITIONS = 32
GREEDY_REFERENCE = "the reference model's greedy output"  # what the built-in prompts are scored against


class DriftError(EdgeftError):
    """A merged or exported model does not behave like the model as trained (and was not accepted)."""

    exit_code = 3


@dataclass(frozen=True)
class Gate:
    """How far a step may move the model away from the model as trained."""

    min_agreement: float  # token agreement where greedy runs were compared, else argmax agreement
    max_ppl_ratio: float  # candidate perplexity / reference perplexity
    max_exact_match_drop: float  # percentage points, when at least MIN_EXACT_MATCH_SAMPLES references


# merge: the same function in full precision, only the order of float sums may differ.
MERGE_GATE = Gate(min_agreement=0.99, max_ppl_ratio=1.01, max_exact_match_drop=5.0)
# export: quantization rounds every weight. Measured on the recipe sample (SmolLM2-135M, int4, GPTQ):
# 84% token agreement, +3.5% perplexity. The QLoRA merge that had lost the training measured 23%
# and +20.5%: the gate sits between the two.
EXPORT_GATE = Gate(min_agreement=0.60, max_ppl_ratio=1.10, max_exact_match_drop=10.0)


class TorchScorer:
    """A transformers (or peft) model as a scorer: fp32, no gradients."""

    def __init__(self, model, pad_token_id: int | None):
        self.model, self.pad = model.eval(), pad_token_id

    def logits(self, prompt: list[int], answer: list[int]):
        import torch

        with torch.no_grad():
            # the head only where an answer token is predicted (the last prompt position on)
            out = self.model(torch.tensor([prompt + answer]), logits_to_keep=len(answer) + 1).logits[0, :-1]
        return out.float().numpy()

    def greedy(self, prompt: list[int], max_new: int, stops: set[int]) -> list[int]:
        return torch_greedy(self.model, [prompt], max_new, stops, self.pad)[0]

    def greedy_batch(self, prompts: list[list[int]], max_new: int, stops: set[int]) -> list[list[int]]:
        # one decode loop for all: 8 prompts in ~1/3 of the time of 8 loops on a CPU
        return torch_greedy(self.model, prompts, max_new, stops, self.pad)


def torch_greedy(model, prompts: list[list[int]], max_new: int, stops, pad_token_id: int | None) -> list[list[int]]:
    """PyTorch's greedy continuations of a batch of prompts (padded as torch_greedy_scored lays them out), each cut after
    its first stop id."""
    return torch_greedy_scored(model, prompts, max_new, stops, pad_token_id)[0]


def torch_greedy_scored(
    model, prompts: list[list[int]], max_new: int, stops, pad_token_id: int | None, references=None
) -> tuple[list[list[int]], list[tuple[float, int]], float]:
    """torch_greedy, and with `references` (token lists, one per prompt) each reference's summed
    NLL after its prompt and its token count, and the seconds that scoring took. The prompts run
    once, not twice: an answer that is its reference (what a fine-tuned model mostly writes) is
    scored from the logits its own greedy steps chose by; the other references in one pass over the
    prompts' KV cache (generate()'s own, cropped back to the prompts).

    What every prompt begins with (a system prompt, few-shot examples) runs once for the batch:
    rows are laid out as that shared part, then padding, then each prompt's own part.
    """
    import torch

    pad = pad_token_id if pad_token_id is not None else 0
    shared = _shared_prefix(prompts)
    own = [p[shared:] for p in prompts]
    width = shared + max(map(len, own))
    batch = torch.tensor([prompts[0][:shared] + [pad] * (width - shared - len(o)) + o for o in own])
    mask = torch.tensor([[1] * shared + [0] * (width - shared - len(o)) + [1] * len(o) for o in own])
    scores, scoring = [], 0.0
    with torch.no_grad():
        cache = None
        if shared:
            cache = model(input_ids=batch[:1, :shared], use_cache=True, logits_to_keep=1).past_key_values
            cache.batch_repeat_interleave(len(prompts))
        if (references is not None or shared) and width - 1 > shared:
            # all but the last prompt token: generate() then runs only that one, on this cache (whose
            # logits no one reads: the head for one position, not every prompt token's)
            cache = model(
                input_ids=batch[:, shared:-1],
                attention_mask=mask[:, :-1],
                position_ids=_positions(mask)[:, shared:-1],
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            ).past_key_values
        out = model.generate(
            input_ids=batch,
            attention_mask=mask,
            past_key_values=cache,
            max_new_tokens=max_new,
            do_sample=False,
            eos_token_id=sorted(stops),
            pad_token_id=pad,
            output_logits=references is not None,
            return_dict_in_generate=True,
        )
        answers = out.sequences[:, width:].tolist()
        if references is not None:
            start = time.perf_counter()
            scores = [_scored_by_steps(out.logits, i, a, r) for i, (a, r) in enumerate(zip(answers, references))]
            if todo := [i for i, score in enumerate(scores) if score is None]:
                if cache is not None:  # generate() extended the prompts' cache in place: back to the prompts
                    cache.crop(width - 1)
                    cache.batch_select_indices(torch.tensor(todo))
                rest = [references[i] for i in todo]
                for i, score in zip(todo, _score_references(model, cache, batch[todo, -1], mask[todo], rest, pad)):
                    scores[i] = score
            scoring = time.perf_counter() - start
    rows = []
    for row in answers:
        stop_at = next((i for i, t in enumerate(row) if t in stops), None)
        rows.append(row if stop_at is None else row[: stop_at + 1])
    return rows, scores, scoring


def _scored_by_steps(step_logits, row: int, answer: list[int], reference: list[int]) -> tuple[float, int] | None:
    """(summed NLL, tokens) of `reference` from the logits of the greedy steps that wrote `answer`,
    when the answer begins with the whole reference (each step's logits then predict the reference's
    token after the same tokens); None otherwise."""
    import torch

    if answer[: len(reference)] != reference:
        return None
    logits = torch.stack([step[row] for step in step_logits[: len(reference)]]).float()
    return float(torch.nn.functional.cross_entropy(logits, torch.tensor(reference), reduction="sum")), len(reference)


def _shared_prefix(prompts: list[list[int]]) -> int:
    """How many leading tokens a batch's prompts share, if worth running once (0 otherwise); each
    prompt keeps at least its last token, generate()'s first input."""
    shared = common_start(prompts)
    return shared if shared >= SHARED_PREFIX_MIN else 0


def common_start(sequences: Sequence[Sequence[int]]) -> int:
    """How many leading tokens every sequence shares, each keeping at least one token of its own
    (0 for fewer than two sequences)."""
    if len(sequences) < 2:
        return 0
    shared = functools.reduce(lambda n, s: common_prefix(sequences[0][:n], s), sequences[1:], len(sequences[0]))
    return max(0, min(shared, min(map(len, sequences)) - 1))


def _positions(mask):
    """Position ids of padded rows (padding before each prompt, or before its own part), counted as
    generate() counts them."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _score_references(model, cache, last, mask, references: list[list[int]], pad: int) -> list[tuple[float, int]]:
    """(summed NLL, tokens) of each row's reference after its prompt, on the prompts' `cache`
    (which holds all but the `last` prompt token of each row, and which this extends)."""
    import torch

    longest = max(map(len, references))
    tail = torch.tensor([[int(t)] + r + [pad] * (longest - len(r)) for t, r in zip(last, references)])
    tail_mask = torch.tensor([[1] * (1 + len(r)) + [0] * (longest - len(r)) for r in references])
    logits = model(
        input_ids=tail,
        attention_mask=torch.cat([mask[:, :-1], tail_mask], dim=1),
        position_ids=_positions(mask)[:, -1:] + torch.arange(1 + longest),
        past_key_values=cache,
        use_cache=True,
    ).logits
    out = []
    for row, tokens in zip(logits, references):
        loss = torch.nn.functional.cross_entropy(row[: len(tokens)].float(), torch.tensor(tokens), reduction="sum")
        out.append((float(loss), len(tokens)))
    return out


def og_greedy(og_model, prompt: list[int], max_new: int, stops, *, adapter=None) -> list[int]:
    """onnxruntime-genai's greedy continuation of one prompt, ending with the first stop id if it
    comes; `adapter` = (og.Adapters, name) to run with a runtime LoRA adapter active."""
    generator = _og_generator(og_model, len(prompt) + max_new, adapter)
    generator.append_tokens(prompt)
    tokens = []
    while not generator.is_done() and len(tokens) < max_new:
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
        if tokens[-1] in stops:
            break
    return tokens


class Scorer(Protocol):
    def logits(self, prompt: list[int], answer: list[int]): ...

    def greedy(self, prompt: list[int], max_new: int, stops: set[int]) -> list[int]: ...


def greedy_all(scorer, prompts: list[list[int]], stops: set[int]) -> list[list[int]]:
    """Each prompt's first GENERATED greedy tokens: in one batch where the scorer has
    `greedy_batch`, else one prompt at a time."""
    if not prompts:
        return []
    batch = getattr(scorer, "greedy_batch", None)
    return batch(prompts, GENERATED, stops) if batch else [scorer.greedy(p, GENERATED, stops) for p in prompts]


class Recorded:
    """A scorer's answers on `pairs`, computed ahead and replayed in `compare`'s order of calls.

    The reference model can then be freed, or turned into the candidate, before the candidate
    exists: one model in memory at a time (a 3.8B model is 15 GB in fp32).
    """

    def __init__(self, scorer, pairs, stops: set[int], *, progress: str | None = None):
        from edgeft.progress import progress as shown

        self.pairs, self.stops = pairs, stops
        # compare's greedy_samples=0 calls: a reference's own answer where there is no other
        unanswered = [prompt for prompt, answer in pairs if answer is None]
        self._greedy = {tuple(p): g for p, g in zip(unanswered, greedy_all(scorer, unanswered, stops))}
        self._logits = {}
        for prompt, answer in shown(pairs, desc=progress, unit="prompt") if progress else pairs:
            key = tuple(prompt)
            target = answer or self._greedy[key]
            self._logits[(key, tuple(target))] = scorer.logits(prompt, target)

    def greedy(self, prompt, max_new: int, stops: set[int]) -> list[int]:
        return self._greedy[tuple(prompt)]

    def logits(self, prompt, answer):
        return self._logits[(tuple(prompt), tuple(answer))]


def compare(
    reference: Scorer,
    candidate: Scorer,
    pairs: list[tuple[list[int], list[int] | None]],
    stops: set[int],
    *,
    greedy_samples: int = 0,
    progress: str | None = None,
) -> dict:
    """Measure `candidate` against `reference` on (prompt ids, reference answer ids or None) pairs.

    Greedy generation (token agreement) runs on the first `greedy_samples` pairs only: it costs a
    decode loop per token, where the teacher-forced measures cost one forward pass per answer.
    """
    import numpy as np

    from edgeft.progress import progress as shown

    agree, identical, greedy_runs = [], 0, 0
    ref_nll = cand_nll = 0.0
    positions = same_argmax = 0
    ref_exact = cand_exact = with_reference = 0
    max_diff = 0.0
    # the greedy runs first, each model's in one batch where it can
    wanted = [i for i, (_, answer) in enumerate(pairs) if i < greedy_samples or answer is None]
    ref_greedy = dict(zip(wanted, greedy_all(reference, [pairs[i][0] for i in wanted], stops)))
    cand_greedy = greedy_all(candidate, [prompt for prompt, _ in pairs[:greedy_samples]], stops)
    for i, (prompt, answer) in enumerate(shown(pairs, desc=progress, unit="prompt") if progress else pairs):
        generate = i < greedy_samples
        ref_tokens = ref_greedy.get(i)
        if generate:
            cand_tokens = cand_greedy[i]
            agree.append(common_prefix(ref_tokens, cand_tokens) / max(len(ref_tokens), len(cand_tokens), 1))
            identical += ref_tokens == cand_tokens
            greedy_runs += 1
        target = answer or ref_tokens
        ref_logits, cand_logits = reference.logits(prompt, target), candidate.logits(prompt, target)
        max_diff = max(max_diff, float(np.abs(ref_logits - cand_logits).max()))
        ref_nll += negative_log_likelihood(ref_logits, target)
        cand_nll += negative_log_likelihood(cand_logits, target)
        ref_top, cand_top = ref_logits.argmax(-1), cand_logits.argmax(-1)
        positions += len(target)
        same_argmax += int((ref_top == cand_top).sum())
        if answer is not None:
            with_reference += 1
            ref_exact += bool((ref_top == np.asarray(answer)).all())
            cand_exact += bool((cand_top == np.asarray(answer)).all())
    result = {
        "samples": len(pairs),
        "reference": "eval answers" if with_reference else GREEDY_REFERENCE,
        "token_agreement": round(sum(agree) / len(agree), 4) if agree else None,
        "identical_generations": identical if greedy_runs else None,
        "greedy_samples": greedy_runs,
        "argmax_agreement": round(same_argmax / max(positions, 1), 4),
        "reference_ppl": round(math.exp(ref_nll / max(positions, 1)), 4),
        "candidate_ppl": round(math.exp(cand_nll / max(positions, 1)), 4),
        "exact_match_samples": with_reference,
        "reference_exact_match": round(100 * ref_exact / with_reference, 1) if with_reference else None,
        "candidate_exact_match": round(100 * cand_exact / with_reference, 1) if with_reference else None,
        "max_abs_logit_diff": round(max_diff, 5),
    }
    result["ppl_change_pct"] = round(100 * (result["candidate_ppl"] / result["reference_ppl"] - 1), 2)
    return result


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens two sequences share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _og_generator(og_model, max_length: int, adapter):
    import onnxruntime_genai as og

    params = og.GeneratorParams(og_model)
    params.set_search_options(do_sample=False, max_length=max_length)
    generator = og.Generator(og_model, params)
    if adapter is not None:
        generator.set_active_adapter(*adapter)
    return generator


def teacher_forced_logits(og_model, prompt: list[int], answer: list[int], *, adapter=None):
    """The logits that predict each answer token, as a (len(answer), vocab) float32 array.

    The prompt (its last position predicts the first answer token), then the answer but its last
    token in chunks (every position's logits, see forced_logits), not one step per token.
    """
    import numpy as np

    generator = _og_generator(og_model, len(prompt) + len(answer) + 1, adapter)
    generator.append_tokens(prompt)
    first = np.asarray(generator.get_logits(), dtype=np.float32).reshape(1, -1)
    return np.concatenate([first, *forced_logits(generator, answer[:-1])])


def forced_logits(generator, tokens: list[int]) -> list:
    """Feed `tokens` to an onnxruntime-genai generator; the logits at each of their positions, as
    (piece length, vocab) float32 arrays: pieces of SCORE_POSITIONS tokens, all that a scoring graph
    computes per chunk (a graph with every position's logits gives the same)."""
    import numpy as np

    rows = []
    for start in range(0, len(tokens), SCORE_POSITIONS):
        piece = tokens[start : start + SCORE_POSITIONS]
        generator.append_tokens(piece)
        rows.append(np.asarray(generator.get_output("logits"), dtype=np.float32).reshape(len(piece), -1))
    return rows


def negative_log_likelihood(logits, targets: list[int]) -> float:
    """Summed -log p(target) under softmax(logits), row by row."""
    import numpy as np

    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return float(-log_probs[np.arange(len(targets)), targets].sum())


def judge(result: dict, gate: Gate) -> list[str]:
    """What falls outside the gate, in plain words (empty: the candidate passes)."""
    problems = []
    agreement, kind = result["token_agreement"], "greedy tokens"
    if agreement is None or builtin_prompts(result):
        agreement, kind = result["argmax_agreement"], "next-token choices"
    if agreement < gate.min_agreement:
        problems.append(
            f"it agrees with the model as trained on {agreement:.1%} of {kind} (gate: at least {gate.min_agreement:.0%})"
        )
    ratio = result["candidate_ppl"] / result["reference_ppl"]
    if ratio > gate.max_ppl_ratio:
        problems.append(
            f"its perplexity is {result['ppl_change_pct']:+.1f}% against the model as trained "
            f"(gate: at most {100 * (gate.max_ppl_ratio - 1):+.0f}%)"
        )
    if result["exact_match_samples"] >= MIN_EXACT_MATCH_SAMPLES:
        drop = result["reference_exact_match"] - result["candidate_exact_match"]
        if drop > gate.max_exact_match_drop:
            problems.append(
                f"it reproduces {result['candidate_exact_match']:.0f}% of the reference answers exactly, the model "
                f"as trained {result['reference_exact_match']:.0f}% (gate: at most {gate.max_exact_match_drop:.0f} "
                "points less)"
            )
    return problems


def builtin_prompts(result: dict) -> bool:
    """Were the prompts the built-in generic ones (a model with no data of its own, such as a base
    model's export)? Its free answers to them are long and chaotic: one rounding changes a token and
    the rest diverges (a faithful SmolLM2-135M int4 export: 16.8% greedy agreement, 84.8% of
    next-token choices, +9.2% perplexity). There the gate reads the next-token choices and the
    perplexity; the greedy agreement is reported."""
    return not result.get("exact_match_samples") and result.get("reference") == GREEDY_REFERENCE


def gate_record(result: dict, gate: Gate, *, allow_drift: bool) -> dict:
    """The gate's verdict as the manifest keeps it."""
    problems = judge(result, gate)
    return {
        "passed": not problems,
        "problems": problems,
        "accepted": bool(problems) and allow_drift,
        "thresholds": asdict(gate),
    }


def drift_message(what: str, where: str, problems: list[str], advice: str) -> str:
    """The plain-words refusal: what drifted, by how much, and the two ways forward."""
    listed = "".join(f"\n  - {p}" for p in problems)
    return (
        f"{what} in {where} does not behave like the model you trained:{listed}\n"
        f"{advice} To keep it anyway, run the same command again with --allow-drift (recorded in the manifest)."
    )


def table(result: dict) -> list[str]:
    """The comparison as a few aligned lines for the terminal and the report."""
    lines = [f"  samples                {result['samples']} (reference: {result['reference']})"]
    if result["token_agreement"] is not None:
        lines.append(
            f"  token agreement        {result['token_agreement']:.1%} of the first {GENERATED} greedy tokens "
            f"({result['identical_generations']}/{result['greedy_samples']} generations identical)"
            + (" (built-in prompts: reported, not gated)" if builtin_prompts(result) else "")
        )
    lines.append(
        f"  argmax agreement       {result['argmax_agreement']:.1%} of next-token choices on the reference answers"
    )
    lines.append(
        f"  perplexity             as trained {result['reference_ppl']:.3f}  this model {result['candidate_ppl']:.3f}  "
        f"({result['ppl_change_pct']:+.2f}%)"
    )
    if result["exact_match_samples"]:
        lines.append(
            f"  exact answers          as trained {result['reference_exact_match']:.1f}%  this model "
            f"{result['candidate_exact_match']:.1f}%  (of {result['exact_match_samples']}, token-exact)"
        )
    lines.append(f"  max |logit diff|       {result['max_abs_logit_diff']}")
    if gate := result.get("gate"):
        verdict = (
            "passed" if gate["passed"] else ("FAILED, accepted with --allow-drift" if gate["accepted"] else "FAILED")
        )
        lines.append(f"  fidelity gate          {verdict}")
    return lines
