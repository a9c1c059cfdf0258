"""edgeft eval: does the fine-tuned model beat the base model, and prompting it with examples?

One table, any mix of: a base model (built-in, HF folder), a run (the model as trained: its base as
training loaded it + the adapter; and its merged model when there is one), a merged model, an ONNX
export. Every candidate answers the same held-out prompts greedily; the answer is compared
with the reference (the last assistant message):
- exact match (JSON answers compare as parsed JSON, so spacing does not matter),
- token-level F1 (SQuAD-style words), JSON validity when the reference is JSON,
- perplexity of the reference answer, the share of answers that stop on their own, latency.
`shots=K` adds, for each base model, a row where K training examples come first in the chat:
the prompt-engineering baseline.
"""

from __future__ import annotations

import json
import logging
import math
import re
import string
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from edgeft import artifacts, models
from edgeft.artifacts import Run
from edgeft.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# PyTorch rows' default batch (bytes of fp32 KV cache and activations, at most this many prompts):
# the recipe model as trained answered 96 prompts in 46 s at 32 a batch against 55-63 s at 8
EVAL_BATCH_MEMORY = 2**30
EVAL_BATCH_MAX = 32
# A base row first answers this many examples drawn at random and stops there when none matches
# exactly: its exact match is then at most 5.8% at 95% confidence, which no comparison with a
# fine-tuned model turns on, and the base rows (long few-shot and retrieval prompts, answers that
# ramble to the token limit) were most of the quickstart's evaluation time.
BASE_SAMPLE = 50


@dataclass
class Candidate:
    label: str
    backend: str  # pytorch | onnx
    path: Path  # HF folder (pytorch) or export folder (onnx; or a runtime adapter's folder: its base + it)
    kind: str = (
        "base"  # base | as-trained (base as training loaded it + adapter) | merged | fine-tuned (an export or folder)
    )
    shots: int = 0
    run: Run | None = None
    response_format: dict | None = None  # ONNX rows: answers constrained to this (see --json-schema)
    retrieved: bool = False  # its `shots` examples are retrieved per prompt (BM25), not the first ones


@dataclass
class Sample:
    messages: list[dict]  # the prompt: every message but the last assistant one
    reference: str
    rejected: str | None = None  # preference data: the answer not preferred (the reference is the preferred one)


@dataclass
class Row:
    label: str
    backend: str
    kind: str
    shots: int
    exact_match: float
    token_f1: float
    json_valid: float | None
    perplexity: float | None
    stop_rate: float
    latency_s: float  # mean seconds per answer (PyTorch rows: a batch's time shared by its answers)
    tokens_per_second: float
    samples: int
    retrieved: bool = False  # base model with examples retrieved per prompt (--rag)
    # what a request costs: tokens in and out, and the spread of its latency
    prompt_tokens: float = 0.0
    answer_tokens: float = 0.0
    latency_p50_s: float = 0.0
    latency_p95_s: float = 0.0
    constrained: bool = False  # answers constrained to a JSON schema (--json-schema)
    max_tokens: int = 0  # new tokens allowed per answer
    # where references call functions: how the answers did, counted apart (see call_outcomes)
    function_calls: dict | None = None
    # preference data: % of pairs where the model gives the preferred answer the higher log-likelihood
    preference_accuracy: float | None = None
    # a base row that matched none of its first random examples and stopped there (see BASE_SAMPLE):
    # {"examples": how many the other rows answered, "exact_match_upper95": its 95% upper bound in %}
    stopped_early: dict | None = None
    predictions: list[dict] = field(default_factory=list, repr=False)


# --- what to evaluate ---------------------------------------------------------------------


def candidates(specs: list[str], shots: int, rag: int = 0, *, merged: bool = True) -> list[Candidate]:
    """Turn command-line MODEL arguments into candidates; a base model gets a K-shot row and a row
    with `rag` retrieved examples too; a run its merged model's row unless `merged` is False."""
    out = _candidates(specs, shots, merged)
    if not rag:
        return out
    with_rag = []
    for i, c in enumerate(out):
        with_rag.append(c)
        later = out[i + 1] if i + 1 < len(out) else None
        if c.kind == "base" and not (later and later.kind == "base" and later.path == c.path):  # after its K-shot row
            name = c.label.replace(" zero-shot", "").replace(f" {c.shots}-shot", "")
            retrieved = f" + {rag} retrieved"
            label = name.replace(" (ONNX)", f"{retrieved} (ONNX)") if c.backend == "onnx" else name + retrieved
            with_rag.append(replace(c, label=label, shots=rag, retrieved=True))
    return with_rag


def _candidates(specs: list[str], shots: int, merged: bool) -> list[Candidate]:
    out = []
    for spec in specs:
        path = Path(spec)
        if adapter_base(path) is not None:  # `export --as-adapter`'s folder: its shared base with it
            run = _run_of(path)
            out.append(
                Candidate(
                    f"{run.path.name if run else path.name} base + adapter (ONNX)", "onnx", path, kind="fine-tuned"
                )
            )
        elif (path / "genai_config.json").is_file():
            if _fine_tuned_export(path):
                out.append(Candidate(f"{path.name} (ONNX)", "onnx", path, kind="fine-tuned"))
            else:  # an export of a base model: it gets the few-shot row too
                out.append(Candidate(f"{path.name} zero-shot (ONNX)", "onnx", path))
                if shots:
                    out.append(Candidate(f"{path.name} {shots}-shot (ONNX)", "onnx", path, shots=shots))
        elif Run.is_run(path):
            from edgeft.pipeline.merge import open_tuned_run

            run = open_tuned_run(path)  # the reference row: what training produced, before any merge
            out.append(
                Candidate(
                    f"{run.path.name} as trained (PyTorch)", "pytorch", run.adapter_dir, kind="as-trained", run=run
                )
            )
            if merged and run.has_merged():
                out.append(
                    Candidate(f"{run.path.name} merged (PyTorch)", "pytorch", run.merged_dir, kind="merged", run=run)
                )
        else:
            resolved = models.resolve_model(spec)
            name = Path(spec).name if resolved.kind != "builtin" else spec
            fine_tuned = (resolved.path / "edgeft-export.json").exists() or resolved.path.name == "merged"
            out.append(
                Candidate(
                    f"{name} zero-shot" if not fine_tuned else name,
                    "pytorch",
                    resolved.path,
                    kind="fine-tuned" if fine_tuned else "base",
                )
            )
            if shots and not fine_tuned:
                out.append(Candidate(f"{name} {shots}-shot", "pytorch", resolved.path, shots=shots))
    return out


def adapter_base(folder: Path) -> Path | None:
    """The shared base export of a runtime adapter's folder (RUN/onnx-adapter); None for any other path
    (a run directory included: it gives the model as trained)."""
    from edgeft.runtime.engine import adapter_alone

    alone = None if Run.is_run(folder) else adapter_alone(folder)
    return alone[0] if alone else None


def _fine_tuned_export(folder: Path) -> bool:
    """Exported from a run's merged model (fine-tuned), or from a base model (gets a few-shot row)?"""
    record = folder / "edgeft-export.json"
    if record.is_file():
        source = Path(json.loads(record.read_text()).get("source", ""))
        return source.name == "merged" and Run.is_run(source.parent)
    return Run.is_run(folder.parent)


def held_out_data(todo: list[Candidate]) -> Path:
    """The held-out data of the run among the candidates: its --eval-file, else the validation split
    tune held out of its training data."""
    for run in (c.run or _run_of(c.path) for c in todo):
        record = run.tune_record() if run else None
        if record and (found := record.eval_file or record.held_out):
            return found
    raise ConfigError(
        "no held-out data to evaluate on: pass --data FILE (chat examples whose last message is the answer). "
        "A run holds some out by itself when trained without --eval-file on 100 examples or more."
    )


def _run_of(path: Path) -> Run | None:
    """The run an export or merged folder belongs to, if any."""
    for folder in (path, path.parent, path.parent.parent):
        if Run.is_run(folder):
            return Run.open(folder)
    return None


def load_samples(path: str | Path, limit: int | None = None) -> list[Sample]:
    from edgeft.chatdata import prompt_and_reference

    dataset = load_dataset_checked(path)
    rows = []
    for ex in dataset.examples:
        if ex.text is not None:
            raise DataError(
                f"{path} is plain text; evaluation needs chat data whose last message is the assistant's answer."
            )
        if (pair := prompt_and_reference(ex)) is not None:
            rejected = ex.rejected[-1]["content"] if ex.rejected else None
            rows.append(Sample(*pair, rejected=rejected))
    if not rows:
        raise DataError(f"{path} has no example that ends with an assistant answer to compare against.")
    return rows[:limit] if limit else rows


def load_dataset_checked(path: str | Path):
    from edgeft.chatdata import load_dataset

    dataset = load_dataset(path)
    if dataset.problems:
        shown = "\n".join(f"  {p}" for p in dataset.problems[:10])
        raise DataError(f"{path} has problems:\n{shown}\nCheck it with: edgeft data check {path}")
    return dataset


def with_shots(sample: Sample, shots: list[Sample]) -> list[dict]:
    """K solved examples as earlier turns of the same chat, after the system message."""
    system = [m for m in sample.messages[:1] if m["role"] == "system"]
    rest = sample.messages[len(system) :]
    earlier = []
    for shot in shots:
        earlier += [m for m in shot.messages if m["role"] != "system"] + [
            {"role": "assistant", "content": shot.reference}
        ]
    return system + earlier + rest


# --- metrics ------------------------------------------------------------------------------


def _parse_json(text: str):
    try:
        return json.loads(text)
    except (ValueError, TypeError):
        return None


def is_json(text: str) -> bool:
    return _parse_json(text.strip()) is not None or text.strip() in ("null", "[]", "{}")


def exact_match(prediction: str, reference: str) -> bool:
    """The same answer: JSON compared parsed; function calls compared by name and parsed arguments
    (and the text beside them); other text up to spacing."""
    from edgeft.toolcalls import parse_calls

    text, calls = parse_calls(reference)
    if calls:
        said, made = parse_calls(prediction)
        return made == calls and " ".join(said.split()) == " ".join(text.split())
    ref = _parse_json(reference.strip())
    if ref is not None:
        return _parse_json(prediction.strip()) == ref
    return " ".join(prediction.split()) == " ".join(reference.split())


def _words(text: str) -> list[str]:
    text = text.lower().translate(str.maketrans(string.punctuation, " " * len(string.punctuation)))
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = _words(prediction), _words(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


# --- backends -----------------------------------------------------------------------------


class TorchBackend:
    """Greedy, batched generation with transformers (left padding), and reference perplexity."""

    def __init__(self, candidate: Candidate):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from edgeft.chatdata import stop_ids
        from edgeft.cpu import usable_cpus

        torch.set_num_threads(usable_cpus())
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(candidate.path)
        self.tokenizer.padding_side = "left"
        if candidate.kind == "as-trained":
            from edgeft.trained import Trained, as_trained_model

            self.model = as_trained_model(Trained.of(candidate.run))
        else:
            self.model = AutoModelForCausalLM.from_pretrained(candidate.path, dtype=torch.float32).eval()
        self.stops = stop_ids(self.tokenizer)

    def batch_size(self, tokens: int) -> int:
        """As many prompts of `tokens` (prompt and answer) as fit EVAL_BATCH_MEMORY of KV cache and
        MLP activations, at most EVAL_BATCH_MAX: decoding a batch reads every weight once per
        token, so a bigger batch answers more for the same reads, while a 3.8B model's 600-token
        rows take most of a GB each."""
        c = self.model.config
        heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        per_row = (
            tokens
            * 4
            * (c.num_hidden_layers * 2 * heads * head_dim + 4 * getattr(c, "intermediate_size", 4 * c.hidden_size))
        )
        return max(1, min(EVAL_BATCH_MAX, EVAL_BATCH_MEMORY // per_row))

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))

    def generate_scored(
        self, prompts: list[list[dict]], references: list[str], max_tokens: int
    ) -> tuple[list[tuple], float, list[tuple[float, int]]]:
        """(text, finish reason, answer tokens, prompt tokens) per prompt, their time (without the
        scoring) and, scored on the prompts' own KV cache, each reference's summed NLL and token count."""
        from edgeft.fidelity import torch_greedy_scored

        ids = [self.prompt_ids(m) for m in prompts]
        wanted = [self.tokenizer.encode(r, add_special_tokens=False) + self.stops[:1] for r in references]
        start = time.perf_counter()
        rows, scores, scoring = torch_greedy_scored(
            self.model, ids, max_tokens, set(self.stops), self.tokenizer.pad_token_id, wanted
        )
        took = time.perf_counter() - start - scoring
        results = []
        for prompt, row in zip(ids, rows):
            stopped = bool(row) and row[-1] in self.stops
            text = self.tokenizer.decode(row[:-1] if stopped else row, skip_special_tokens=True)
            results.append((text, "stop" if stopped else "length", len(row), len(prompt)))
        return results, took, scores


class OnnxBackend:
    """The edgeft runtime (onnxruntime-genai), one request at a time as an app would send them."""

    def __init__(self, candidate: Candidate):
        from edgeft.runtime import ChatModel, PromptCache

        # a row that scores its references reads the logits of each reference position (the scoring
        # graph); a constrained row only answers, as an app does: the generation graph
        base = adapter_base(candidate.path)
        self.model = ChatModel.load(
            base or candidate.path,
            adapter=candidate.path if base else None,
            scoring=candidate.response_format is None,
        )
        self.response_format = candidate.response_format
        # few-shot prompts share their examples, and every prompt its system prompt: run those once
        # (and a constrained row's grammar: compile it once)
        self.cache = PromptCache()
        self.count_tokens = self.model.count_tokens

    def generate_scored(
        self, prompts: list[list[dict]], references: list[str], max_tokens: int
    ) -> tuple[list[tuple], float, list[tuple[float, int]]]:
        """One answer (one prompt at a time, as an app sends them), its time (without the scoring)
        and, in the same pass (the prompt is run once), the reference's NLL and token count."""
        (prompt,), (reference,) = prompts, references
        stream = self.model.stream(prompt, score=reference, max_tokens=max_tokens, temperature=0.0, cache=self.cache)
        stream.text()
        reply = stream.result
        answer = (reply.text, reply.finish_reason, reply.usage["completion_tokens"], reply.usage["prompt_tokens"])
        return [answer], reply.elapsed, [(stream.reference_nll, stream.reference_tokens)]

    def generate(self, prompts: list[list[dict]], max_tokens: int) -> list[tuple[str, str, int, int]]:
        results = []
        for messages in prompts:
            reply = self.model.chat(
                messages, max_tokens=max_tokens, temperature=0.0, response_format=self.response_format, cache=self.cache
            )
            results.append(
                (reply.text, reply.finish_reason, reply.usage["completion_tokens"], reply.usage["prompt_tokens"])
            )
        return results


# --- the evaluation -----------------------------------------------------------------------


def evaluate(
    specs: list[str],
    data: str | Path | None = None,
    *,
    shots: int = 0,
    shots_file: str | Path | None = None,
    limit: int | None = None,
    max_tokens: int | None = None,
    batch_size: int | None = None,
    output: str | Path | None = None,
    json_schema: str | Path | None = None,
    rag: int = 0,
    merged: bool = True,
    base_sample: int = BASE_SAMPLE,
) -> dict:
    """Evaluate every candidate on `data`; write a JSON report and record it in the runs involved.

    `json_schema` (a schema file, or "auto" to infer one from the references): each fine-tuned ONNX
    export gets a second row whose answers are constrained to the schema. `rag` K: each base model
    also answers with the K training examples most similar to each prompt (BM25) in its prompt.
    `merged` False leaves out a run's merged PyTorch row (its merge already checked it against the
    model as trained, logit by logit): the slowest row after the model as trained, on a CPU.
    `base_sample` N: a base row that matches none of N examples drawn at random stops there (its
    row says so, with the 95% upper bound of its exact match); 0 answers every example.
    """
    if not specs:
        raise ConfigError(
            "name at least one model to evaluate (a built-in name, a run, a merged folder or an ONNX export)."
        )
    if (
        min(shots, rag, base_sample) < 0
        or (limit is not None and limit < 1)
        or (batch_size is not None and batch_size < 1)
    ):
        raise ConfigError("--shots, --rag and --base-sample must be 0 or more, --limit and --batch-size at least 1.")
    todo = candidates(specs, shots, rag, merged=merged)
    data = data or held_out_data(todo)
    samples = load_samples(data, limit)
    if json_schema is not None:
        todo = with_constrained_rows(todo, load_json_schema(json_schema, samples))
    pool = _example_pool(todo, shots_file, data) if shots or rag else []
    rows = []
    for candidate in todo:
        if candidate.retrieved:
            prompts = [with_shots(s, found) for s, found in zip(samples, retrieve(pool, samples, candidate.shots))]
        else:
            prompts = [with_shots(s, pool[: candidate.shots]) if candidate.shots else s.messages for s in samples]
        rows.append(evaluate_one(candidate, samples, prompts, max_tokens, batch_size, base_sample))
    report = {
        "data": str(Path(data).resolve()),
        "samples": len(samples),
        "max_tokens": max_tokens or max(r.max_tokens for r in rows),
        "shots": shots,
        "rag": rag,
        "finished_at": artifacts.now(),
        "rows": [{k: v for k, v in asdict(r).items() if k != "predictions"} for r in rows],
    }
    run = next((c.run for c in todo if c.run), None)
    target = Path(output) if output else (run.logs_dir / "eval.json" if run else Path("edgeft-eval.json"))
    target.parent.mkdir(parents=True, exist_ok=True)
    # the answers first, each file whole or not at all: a report never stands beside older or torn answers
    lines = [json.dumps({"model": r.label, **p}, ensure_ascii=False) + "\n" for r in rows for p in r.predictions]
    artifacts.write_text_atomic(target.with_suffix(".predictions.jsonl"), "".join(lines))
    artifacts.write_json_atomic(target, report)
    report["path"] = str(target)
    for r in {id(c.run): c.run for c in todo if c.run}.values():
        r.record_stage(
            "eval", status="done", report=str(target.resolve()), rows=report["rows"], finished_at=artifacts.now()
        )
    return report


def with_constrained_rows(todo: list[Candidate], schema: dict) -> list[Candidate]:
    """Each fine-tuned ONNX export again, its answers constrained to `schema`."""
    fmt = {"type": "json_schema", "json_schema": {"name": "reference", "schema": schema}}
    out = []
    for c in todo:
        out.append(c)
        if c.backend == "onnx" and c.kind == "fine-tuned":
            label = c.label.replace(" (ONNX)", ", constrained (ONNX)")
            out.append(replace(c, label=label, response_format=fmt))
    return out


def load_json_schema(source: str | Path, samples: list[Sample]) -> dict:
    """A JSON Schema from a file, or ("auto") inferred from the references when they are all JSON."""
    if str(source) == "auto":
        if not all(is_json(s.reference) for s in samples):
            raise ConfigError("--json-schema auto needs references that are all JSON; pass a schema file instead.")
        return infer_json_schema([json.loads(s.reference) for s in samples])
    from edgeft.runtime.engine import json_schema_format

    return json_schema_format(source)["json_schema"]["schema"]


def infer_json_schema(values: list) -> dict:
    """The narrowest plain schema every value fits: types, object keys (required where always
    present), array items; differing types become anyOf."""
    names = {bool: "boolean", int: "integer", float: "number", str: "string", type(None): "null"}
    kinds = {type(v) for v in values}
    if kinds == {dict}:
        keys = list(dict.fromkeys(k for v in values for k in v))
        properties = {k: infer_json_schema([v[k] for v in values if k in v]) for k in keys}
        required = [k for k in keys if all(k in v for v in values)]
        return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}
    if kinds == {list}:
        items = [item for v in values for item in v]
        return {"type": "array", "items": infer_json_schema(items) if items else {}}
    if kinds == {int, float}:
        return {"type": "number"}
    if len(kinds) == 1 and (kind := kinds.pop()) in names:
        return {"type": names[kind]}
    groups = [[v for v in values if type(v) is k] for k in dict.fromkeys(type(v) for v in values)]
    return {"anyOf": [infer_json_schema(g) for g in groups]} if groups else {}


def retrieve(pool: list[Sample], samples: list[Sample], k: int) -> list[list[Sample]]:
    """For each sample, the k pool examples whose user message is most like its own (BM25 over
    words, English stop words dropped), least similar first so the closest sits next to the question."""
    import bm25s

    def question(s: Sample) -> str:
        return next((m["content"] for m in reversed(s.messages) if m["role"] == "user"), "")

    def tokens(texts: list[str]):
        return bm25s.tokenize(texts, stopwords="en", show_progress=False)

    index = bm25s.BM25()
    index.index(tokens([question(s) for s in pool]), show_progress=False)
    found, _ = index.retrieve(tokens([question(s) for s in samples]), k=min(k, len(pool)), show_progress=False)
    return [[pool[int(i)] for i in reversed(row)] for row in found]


def _example_pool(todo: list[Candidate], shots_file, data) -> list[Sample]:
    """Solved examples for the prompts of base rows: the shots file, else the run's training data."""
    source = shots_file
    if source is None:
        run = next((c.run for c in todo if c.run), None)
        record = run.tune_record() if run else None
        source = record.data if record else None
    if source is None:
        raise ConfigError(
            "--shots and --rag need solved examples: pass --shots-file TRAIN.jsonl (never the evaluation file)."
        )
    if Path(source).resolve() == Path(data).resolve():
        raise ConfigError("--shots-file must not be the evaluation data: the answers would leak into the prompts.")
    # the validation split tune held out is part of the training file: never show its answers
    held = {_key(s) for s in load_samples(data)}
    return [s for s in load_samples(source) if _key(s) not in held]


def _key(sample: Sample) -> str:
    return json.dumps([sample.messages, sample.reference], sort_keys=True)


ANSWER_MARGIN = 8  # tokens past the longest reference: its end of turn, and room for other spacing


def answer_room(count_tokens, samples: list[Sample]) -> int:
    """New tokens per answer: the longest reference (in the model's own tokens) and ANSWER_MARGIN.
    An answer that rambles past that cannot match any reference, and generating the ramble is
    most of what a base model's answer costs."""
    return min(512, max(count_tokens(s.reference) for s in samples) + ANSWER_MARGIN)


def evaluate_one(
    candidate: Candidate,
    samples: list[Sample],
    prompts: list[list[dict]],
    max_tokens: int | None,
    batch_size: int | None,
    base_sample: int = 0,
) -> Row:
    """Answer every prompt (the samples' own, or with examples put in front) and score the answers."""
    from edgeft.progress import progress

    sampled = candidate.kind == "base" and 0 < base_sample < len(samples)
    first = f" ({base_sample} drawn at random first: it stops there if none matches)" if sampled else ""
    log.info(f"Evaluating {candidate.label} on {len(samples)} examples{first}...")
    backend = OnnxBackend(candidate) if candidate.backend == "onnx" else TorchBackend(candidate)
    max_tokens = max_tokens or answer_room(backend.count_tokens, samples)
    chars = [sum(len(m["content"]) for m in p) for p in prompts]  # how long each prompt is, near enough
    step = 1
    if candidate.backend == "pytorch":
        longest = prompts[chars.index(max(chars))]
        step = batch_size or backend.batch_size(len(backend.prompt_ids(longest)) + max_tokens)
    # the reference is scored in the answer's own pass (the prompt is run once, not twice); a
    # constrained row's model is the unconstrained row's, so is its perplexity: it has none
    in_pass = candidate.response_format is None
    phases = [list(range(len(samples)))]
    if sampled:
        phases = _sample_first(len(samples), base_sample)
    if step > 1:  # batches of prompts alike in length: less padding, and answers that end closer together
        for phase in phases:
            phase.sort(key=chars.__getitem__)
    predictions: list[dict] = [{}] * len(samples)
    seconds, generated, nll, count = 0.0, 0, 0.0, 0
    pairs = in_pass and any(s.rejected is not None for s in samples)
    stopped = None

    def answer(batch: list[int]) -> None:
        nonlocal seconds, generated, nll, count
        margins = {}
        if in_pass:
            results, took, scores = backend.generate_scored(
                [prompts[j] for j in batch], [samples[j].reference for j in batch], max_tokens
            )
            nll, count = nll + sum(v for v, _ in scores), count + sum(n for _, n in scores)
            if pairs:  # the other answer scored the same way (its one generated token is not counted)
                _, _, others = backend.generate_scored(
                    [prompts[j] for j in batch], [samples[j].rejected or "" for j in batch], 1
                )
                # log p(preferred) - log p(other): above 0, the model prefers the preferred answer
                margins = {j: other[0] - mine[0] for j, mine, other in zip(batch, scores, others)}
        else:
            start = time.perf_counter()
            results = backend.generate([prompts[j] for j in batch], max_tokens)
            took = time.perf_counter() - start
        seconds += took
        for j, (text, finish, n_tokens, n_prompt) in zip(batch, results):
            sample = samples[j]
            generated += n_tokens
            predictions[j] = {
                "example": j,  # its place in the data: rows that answered different examples pair up by it
                "prediction": text,
                "reference": sample.reference,
                "finish_reason": finish,
                "prompt_tokens": n_prompt,
                "answer_tokens": n_tokens,
                "latency_s": round(took / len(results), 4),
                "exact_match": exact_match(text, sample.reference),
                "token_f1": token_f1(text, sample.reference),
            }
            if j in margins and sample.rejected is not None:
                predictions[j]["preference_margin"] = round(margins[j], 4)
                predictions[j]["prefers_preferred"] = margins[j] > 0

    for k, phase in enumerate(phases):
        if k == 1 and not any(predictions[j]["exact_match"] for j in phases[0]):
            stopped = len(phases[0])
            log.info(
                f"  {candidate.label}: no exact match in {stopped} random examples, stopped there "
                f"(at most {upper_bound_95(stopped):.1f}% at 95% confidence; --base-sample 0 scores every example)"
            )
            break
        # a drawn phase has its own progress line: its time left is the phase's, not the whole row's
        desc = candidate.label if len(phases) == 1 else f"{candidate.label} ({'drawn' if k == 0 else 'the rest'})"
        batches = [phase[i : i + step] for i in range(0, len(phase), step)]
        for batch in progress(batches, desc=desc, unit="batch" if step > 1 else "example"):
            answer(batch)
    predictions = [p for p in predictions if p]  # in the samples' order; a row stopped early has fewer
    json_refs = [p for p in predictions if is_json(p["reference"])]
    n = len(predictions)
    row = Row(
        label=candidate.label,
        backend=candidate.backend,
        kind=candidate.kind,
        shots=candidate.shots,
        exact_match=round(100 * sum(p["exact_match"] for p in predictions) / n, 1),
        token_f1=round(100 * sum(p["token_f1"] for p in predictions) / n, 1),
        json_valid=round(100 * sum(is_json(p["prediction"]) for p in json_refs) / len(json_refs), 1)
        if json_refs
        else None,
        perplexity=round(math.exp(nll / count), 3) if count else None,
        stop_rate=round(100 * sum(p["finish_reason"] == "stop" for p in predictions) / n, 1),
        latency_s=round(seconds / n, 3),
        tokens_per_second=round(generated / seconds, 1) if seconds else 0.0,
        samples=n,
        retrieved=candidate.retrieved,
        prompt_tokens=round(sum(p["prompt_tokens"] for p in predictions) / n, 1),
        answer_tokens=round(sum(p["answer_tokens"] for p in predictions) / n, 1),
        latency_p50_s=round(_percentile([p["latency_s"] for p in predictions], 50), 4),
        latency_p95_s=round(_percentile([p["latency_s"] for p in predictions], 95), 4),
        constrained=candidate.response_format is not None,
        max_tokens=max_tokens,
        function_calls=call_outcomes(predictions),
        preference_accuracy=_share(predictions, "prefers_preferred"),
        stopped_early=(
            {"examples": len(samples), "exact_match_upper95": round(upper_bound_95(stopped), 1)} if stopped else None
        ),
        predictions=predictions,
    )
    log.info(f"  {row.label}: exact match {row.exact_match}%, {row.stop_rate}% stopped, {seconds:.0f} s")
    return row


def _sample_first(total: int, size: int) -> list[list[int]]:
    """The examples' indices in two phases: `size` drawn at random (the same draw every time), then the
    rest. Random, because a file may be ordered (easy examples first, one label after another)."""
    import random

    first = sorted(random.Random(0).sample(range(total), size))
    chosen = set(first)
    return [first, [i for i in range(total) if i not in chosen]]


def upper_bound_95(n: int) -> float:
    """The exact one-sided 95% upper bound (Clopper-Pearson), in %, on a rate seen 0 times in n tries."""
    return 100 * (1 - 0.05 ** (1 / n))


def _share(predictions: list[dict], key: str) -> float | None:
    """% of the predictions that have `key` where it is true (None: none has it)."""
    values = [p[key] for p in predictions if key in p]
    return round(100 * sum(values) / len(values), 1) if values else None


CALL_OUTCOMES = ("right", "wrong_call", "missing_call", "unexpected_call", "broken_call")


def call_outcomes(predictions: list[dict]) -> dict | None:
    """For data whose answers call functions (edgeft.toolcalls' form), each answer counted once:
    right (the calls and text of the reference), wrong_call (calls, but not the reference's: another
    function or other arguments), missing_call (text where the reference calls), unexpected_call (a
    call where the reference answers in text), broken_call (a call that does not parse); the rest
    are text answers to text references. None when no reference calls a function."""
    from edgeft.toolcalls import parse_calls

    references = [parse_calls(p["reference"])[1] for p in predictions]
    if not any(references):
        return None
    counts = dict.fromkeys(CALL_OUTCOMES, 0) | {"calls_expected": sum(bool(r) for r in references)}
    for p, expected in zip(predictions, references):
        _, made = parse_calls(p["prediction"])
        if made is None:
            outcome = "broken_call"
        elif expected:
            outcome = "right" if p["exact_match"] else "wrong_call" if made else "missing_call"
        else:
            outcome = "unexpected_call" if made else None
        if outcome:
            counts[outcome] += 1
    return counts


def _percentile(values: list[float], q: float) -> float:
    """The q-th percentile, linearly interpolated (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        return 0.0
    k = (len(ordered) - 1) * q / 100
    low = int(k)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


def table(report: dict) -> list[str]:
    """The report as a Markdown table (the terminal and report.md show the same thing)."""
    lines = [
        (
            "| model | exact match % | token F1 % | JSON valid % | perplexity | stops % | prompt tokens | answer tokens "
            "| latency p50 s | latency p95 s | tokens/s |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        json_valid = "-" if r["json_valid"] is None else f"{r['json_valid']:.1f}"
        ppl = "-" if r["perplexity"] is None else f"{r['perplexity']:.3f}"
        exact = f"{r['exact_match']:.1f}"
        if stop := r.get("stopped_early"):
            exact += f" (≤ {stop['exact_match_upper95']:.1f}, {r['samples']} of {stop['examples']})"
        lines.append(
            f"| {r['label']} | {exact} | {r['token_f1']:.1f} | {json_valid} | {ppl} | "
            f"{r['stop_rate']:.1f} | {r.get('prompt_tokens', 0):.0f} | {r.get('answer_tokens', 0):.0f} | "
            f"{r.get('latency_p50_s', r['latency_s']):.2f} | {r.get('latency_p95_s', r['latency_s']):.2f} | "
            f"{r['tokens_per_second']:.1f} |"
        )
    if stopped := [r for r in report["rows"] if r.get("stopped_early")]:
        n = stopped[0]["samples"]
        lines += [
            "",
            (
                f"≤ X, n of N: a base row that matched none of {n} examples drawn at random stopped there; X is the "
                "95% upper bound of its exact match, its other columns are from those examples (--base-sample 0 "
                "answers them all)."
            ),
        ]
    if any(r.get("preference_accuracy") is not None for r in report["rows"]):
        lines += [
            "",
            "| model | preferred answer scored higher % |",
            "|---|---:|",
        ]
        lines += [
            f"| {r['label']} | {r['preference_accuracy']:.1f} |"
            for r in report["rows"]
            if r.get("preference_accuracy") is not None
        ]
    if any(r.get("function_calls") for r in report["rows"]):
        lines += [
            "",
            "| model | calls right | wrong call | missing call | call where text was expected | broken call |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in report["rows"]:
            if c := r.get("function_calls"):
                expected = c["calls_expected"]
                lines.append(
                    f"| {r['label']} | {c['right']}/{expected} | {c['wrong_call']} | {c['missing_call']} "
                    f"| {c['unexpected_call']} | {c['broken_call']} |"
                )
    return lines


def cost_comparison(rows: list[dict]) -> str | None:
    """One sentence on what the fine-tuned export saves per request against the prompted base
    models (few-shot, retrieved examples), both run by the same ONNX runtime."""
    tuned = next(
        (r for r in rows if r["backend"] == "onnx" and r["kind"] == "fine-tuned" and not r.get("constrained")), None
    )
    prompted = [r for r in rows if r["backend"] == "onnx" and r["kind"] == "base" and r["shots"] > 0]
    if not tuned or not prompted or not tuned.get("prompt_tokens") or not tuned.get("latency_p50_s"):
        return None
    parts = [
        f"{r['prompt_tokens'] / tuned['prompt_tokens']:.1f}x fewer prompt tokens and "
        f"{r['latency_p50_s'] / tuned['latency_p50_s']:.1f}x faster (median latency) than {r['label']}"
        for r in prompted
    ]
    return (
        f"The fine-tuned int4 model answers with {'; '.join(parts)}, "
        f"at {tuned['exact_match']:.1f}% exact match against {max(r['exact_match'] for r in prompted):.1f}%."
    )
