"""ChatModel: chat with an exported model on CPU through onnxruntime-genai, without torch.

The loop is the one onnxruntime-genai's own chat example uses: render the chat template, encode,
`append_tokens`, then `generate_next_token()` until done, decoding through a token stream. What we
add around it: the model's own chat template rendered the way transformers renders it, option
checks with messages a user can act on, stop strings (also when one is split across tokens),
usage counts, cancellation from another thread, and a context-length check before any work.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from edgeft import toolcalls
from edgeft.cpu import usable_cpus
from edgeft.errors import ConfigError, GenerationError, ModelError
from edgeft.fidelity import common_prefix, forced_logits, negative_log_likelihood, teacher_forced_logits
from edgeft.runtime import tooluse
from edgeft.runtime.batching import Sampling
from edgeft.runtime.template import ChatTemplate

log = logging.getLogger("edgeft")

ROLES = ("system", "user", "assistant")
EXPORT_FOLDERS = ("onnx-int4", "onnx-int8", "onnx-fp32")  # preference order inside a run directory
REQUIRED_FILES = ("genai_config.json", "tokenizer.json", "tokenizer_config.json")
# An export's graphs (one weights file): the builder's, with every position's logits; the one
# genai_config.json names for generation, whose prompt pass computes only the last position's; and
# the one scoring loads, with the logits of a chunk's last few positions (see write_derived_graphs)
ALL_LOGITS_GRAPH = "model.onnx"
GENERATE_GRAPH = "model-generate.onnx"
SCORE_GRAPH = "model-score.onnx"
MAX_STOP_STRINGS = 4  # as in OpenAI's API; each one costs a scan per token
MAX_SEED = 2**31 - 1  # onnxruntime-genai's random_seed is a C++ int
MAX_TOP_LOGPROBS = 20  # as in OpenAI's API
MAX_TOP_K = 2**31 - 1  # a C++ int too; above the vocabulary it means "no limit"


class ContextLengthError(GenerationError):
    """The prompt, or the prompt plus max_tokens, does not fit in the model's context."""


# --- options and results ------------------------------------------------------------------


@dataclass
class GenerationOptions:
    """How to generate one answer. `None` means the model's default from genai_config.json."""

    max_tokens: int | None = None  # new tokens at most; None = up to the end of the context
    temperature: float | None = None  # 0 = greedy (always the most likely token); 0..2
    top_p: float | None = None  # nucleus sampling: keep the smallest set of tokens with this mass; (0, 1]
    top_k: int | None = None  # sample among the k most likely tokens; 0 = no limit
    repetition_penalty: float | None = None  # > 1 discourages repeating tokens; 1 = off
    stop: str | Sequence[str] | None = None  # up to 4 strings that end the answer (not included in it)
    seed: int | None = None  # makes sampling repeatable; None = a random seed
    # OpenAI's {"type": "json_object"} or {"type": "json_schema", "json_schema": {"schema": {...}}},
    # or edgeft's {"type": "regex", "regex": ...} / {"type": "lark_grammar", "grammar": ...}: every
    # token is constrained to fit (llguidance, inside onnxruntime-genai).
    response_format: dict | None = None
    logprobs: bool = False  # each answer token's log probability (after temperature, as it was chosen)
    top_logprobs: int | None = None  # and the most likely alternatives at each position, 0 to 20 (needs logprobs)

    def __post_init__(self):
        self.max_tokens = _check_int("max_tokens", self.max_tokens, low=1)
        self.temperature = _check_float("temperature", self.temperature, low=0.0, high=2.0, allowed="0 to 2")
        self.top_p = _check_float("top_p", self.top_p, low=0.0, high=1.0, allowed="greater than 0, at most 1")
        if self.top_p == 0.0:
            raise GenerationError("top_p must be greater than 0 and at most 1, got 0.")
        self.top_k = _check_int("top_k", self.top_k, low=0, high=MAX_TOP_K)
        self.repetition_penalty = _check_float(
            "repetition_penalty", self.repetition_penalty, low=0.0, high=10.0, allowed="greater than 0, at most 10"
        )
        if self.repetition_penalty == 0.0:
            raise GenerationError("repetition_penalty must be greater than 0 (1 means no penalty), got 0.")
        self.seed = _check_int("seed", self.seed, low=0, high=MAX_SEED)
        self.stop = _check_stop(self.stop)
        self.guidance = guidance(self.response_format)
        if not isinstance(self.logprobs, bool):
            raise GenerationError(f"logprobs must be true or false, got {self.logprobs!r}.")
        self.top_logprobs = _check_int("top_logprobs", self.top_logprobs, low=0, high=MAX_TOP_LOGPROBS)
        if self.top_logprobs and not self.logprobs:
            raise GenerationError("top_logprobs needs logprobs set to true.")

    @classmethod
    def from_kwargs(cls, options: dict[str, Any]) -> GenerationOptions:
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise GenerationError(f"unknown generation option {unknown[0]!r}; known options: {', '.join(known)}.")
        return cls(**options)


def _check_int(name: str, value: Any, *, low: int, high: int | None = None) -> int | None:
    if value is None:
        return None
    # bool is an int in Python, but `max_tokens=True` is a mistake, not a 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise GenerationError(f"{name} must be an integer, got {value!r}.")
    if value < low or (high is not None and value > high):
        allowed = f"at least {low}" if high is None else f"{low} to {high}"
        raise GenerationError(f"{name} must be {allowed}, got {value}.")
    return value


def _check_float(name: str, value: Any, *, low: float, high: float, allowed: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise GenerationError(f"{name} must be a number ({allowed}), got {value!r}.")
    if math.isnan(value) or not low <= value <= high:
        raise GenerationError(f"{name} must be {allowed}, got {value}.")
    return float(value)


def _check_stop(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) for s in stops):
        raise GenerationError(f"stop must be a string or a list of strings, got {stop!r}.")
    if len(stops) > MAX_STOP_STRINGS:
        raise GenerationError(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}.")
    if any(s == "" for s in stops):
        raise GenerationError("stop strings must not be empty.")
    return tuple(stops)


RESPONSE_FORMATS = "text, json_object, json_schema (OpenAI's), regex, lark_grammar (edgeft's)"


def guidance(response_format: Any) -> tuple[str, str] | None:
    """A response_format as onnxruntime-genai guidance (kind, data), or None for free text. Checks
    the shape; whether the schema or grammar compiles is known when generation is set up."""
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if not isinstance(kind, str):
        raise GenerationError(
            f"response_format must be an object with a type ({RESPONSE_FORMATS}), got {response_format!r}."
        )
    if kind == "text":
        return None
    if kind == "json_object":
        return "json_schema", json.dumps({"type": "object", "x-guidance": toolcalls.JSON_LAYOUT})
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise GenerationError(
                "response_format json_schema needs {'json_schema': {'name': ..., 'schema': {a JSON Schema object}}}."
            )
        return "json_schema", json.dumps({"x-guidance": toolcalls.JSON_LAYOUT, **spec["schema"]})
    field = {"regex": "regex", "lark_grammar": "grammar"}.get(kind)
    if field is None:
        raise GenerationError(f"response_format type {kind!r} is not supported; use one of: {RESPONSE_FORMATS}.")
    value = response_format.get(field)
    if not isinstance(value, str) or not value.strip():
        raise GenerationError(f"response_format type {kind!r} needs a non-empty string {field!r}.")
    return kind, value


def json_schema_format(path: str | Path) -> dict:
    """The response_format for answers that fit the JSON Schema in a file."""
    path = Path(path)
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read the JSON schema {path}: {e.strerror or e}.") from None
    except ValueError as e:
        raise ConfigError(f"{path} is not JSON ({e}); a JSON Schema file is expected.") from None
    if not isinstance(schema, dict):
        raise ConfigError(f"{path} must hold a JSON Schema object, got {type(schema).__name__}.")
    return {"type": "json_schema", "json_schema": {"name": path.stem, "schema": schema}}


def check_messages(messages: Any) -> list[dict[str, str]]:
    """Check a conversation and return it as plain {'role', 'content'} dicts."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise GenerationError("messages must be a non-empty list of {'role': ..., 'content': ...} objects.")
    checked = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise GenerationError(f"messages[{i}] must be an object with 'role' and 'content', got {m!r}.")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise GenerationError(f"messages[{i}].role must be one of {', '.join(ROLES)}; got {role!r}.")
        if not isinstance(content, str):
            raise GenerationError(f"messages[{i}].content must be a string, got {type(content).__name__}.")
        if not content.strip():
            raise GenerationError(f"messages[{i}].content is empty; every message needs some text.")
        checked.append({"role": role, "content": content})
    return checked


@dataclass
class ChatResult:
    """One finished answer."""

    text: str
    finish_reason: str  # "stop" (end of turn or a stop string), "length" (max_tokens or context), "cancelled"
    usage: dict[str, int]  # prompt_tokens, completion_tokens, total_tokens (OpenAI's names)
    time_to_first_token: float | None = None  # seconds from the start of generation to the first token
    elapsed: float = 0.0  # seconds from the start of generation (not counting a wait in a queue) to the end
    cached_tokens: int = 0  # prompt tokens a PromptCache already held (not run again)
    # OpenAI's tool_calls, when the answer calls functions (finish_reason "tool_calls")
    tool_calls: list[dict] | None = None
    # with logprobs=True: one entry per answer token (OpenAI's logprobs.content)
    logprobs: list[dict] | None = None

    @property
    def tokens_per_second(self) -> float | None:
        """Generation speed after the first token (decode speed, what a reader feels)."""
        n = self.usage["completion_tokens"] - 1
        if n < 1 or self.time_to_first_token is None or self.elapsed <= self.time_to_first_token:
            return None
        return n / (self.elapsed - self.time_to_first_token)


# --- stop strings ---------------------------------------------------------------------------


class StopStringFilter:
    """Holds back text that could be the start of a stop string, so none ever reaches the user.

    A stop string can arrive split over several tokens ("<|" + "eot|>"), so each piece is added
    to a buffer; the text before a complete stop string is released and generation ends, and a
    tail that is a prefix of some stop string waits for the next piece.
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self.buffer = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the answer

    def push(self, piece: str) -> str:
        """Add a decoded piece; return the text that is now safe to show."""
        if not self.stops:
            return piece
        self.buffer += piece
        hits = [i for i in (self.buffer.find(s) for s in self.stops) if i >= 0]
        if hits:
            at = min(hits)
            self.matched = next(s for s in self.stops if self.buffer.find(s) == at)
            out, self.buffer, self.stopped = self.buffer[:at], "", True
            return out
        keep = self._held_back()
        out = self.buffer[: len(self.buffer) - keep]
        self.buffer = self.buffer[len(self.buffer) - keep :]
        return out

    def flush(self) -> str:
        """Generation ended without a stop string: the held-back tail is ordinary text."""
        out, self.buffer = self.buffer, ""
        return out

    def _held_back(self) -> int:
        longest = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.buffer)), longest, -1):
                if self.buffer.endswith(s[:n]):
                    longest = n
                    break
        return longest


# --- the stream -----------------------------------------------------------------------------


class _Pieces:
    """What every answer stream shares: iterate it for text pieces (generation starts on the first
    next(), in the thread that iterates); `text()` runs it to the end; `close()` stops it now and
    frees the generator (`.result` then holds the partial answer)."""

    _pieces: Iterator[str] | None = None

    def __iter__(self) -> _Pieces:
        return self

    def __next__(self) -> str:
        if self._pieces is None:
            self._pieces = self._generate()
        return next(self._pieces)

    def text(self) -> str:
        """Run to the end and return the whole answer."""
        return "".join(self)

    def close(self) -> None:
        self.cancel()
        if self._pieces is not None:
            self._pieces.close()


class ChatStream(_Pieces):
    """An answer being generated: iterate it for text pieces; `.result` is set when it ends.

    Generation starts on the first `next()`, in the thread that iterates. `cancel()` may be
    called from any thread (a server whose client went away, a Ctrl-C handler); the stream then
    ends after the current token with finish_reason "cancelled".
    """

    def __init__(
        self,
        model: ChatModel,
        prompt_ids: list[int],
        options: GenerationOptions,
        max_tokens: int,
        *,
        score_ids: list[int] | None = None,
        cache: PromptCache | None = None,
    ):
        self.model = model
        self.prompt_tokens = len(prompt_ids)
        self.result: ChatResult | None = None
        # `score_ids` (a reference answer): scored on the prompt's own prefill, from the answer's
        # steps while it writes the reference, then by rewinding for the rest (ReferenceScore); the
        # summed NLL lands in `reference_nll`, over `reference_tokens` tokens (with its end of turn).
        self._score_ids = score_ids
        # answers pick up where a cached prompt left off (a constrained one reusing its grammar),
        # except seeded samples: a seed must give the same answer as a fresh generator
        self.reused_tokens = 0  # prompt tokens the cache already held: not run again
        seeded = options.seed is not None and model.temperature(options) > 0
        self._cache = cache if cache is not None and not seeded else None
        self._slot: _Slot | None = None
        self._row: Any = None  # the batch row the answer runs in (PromptCache.batch), if it does
        self.reference_nll: float | None = None
        self.reference_tokens = len(score_ids or ())
        self._prompt_ids = prompt_ids
        self._options = options
        self._max_tokens = max_tokens
        # what a generator must hold: the prompt and the longer of the answer and the reference to score
        self._length = self.prompt_tokens + max(max_tokens, len(score_ids or ()))
        self._cancelled = threading.Event()
        self.stopped_on: str | None = None  # the stop string that ended the answer, if one did
        self._logprobs: list[dict] | None = [] if options.logprobs else None
        self._logprobs_taken = 0
        self._pieces: Iterator[str] | None = None
        self._generator, self._setup_seconds = None, 0.0
        if options.guidance is not None and not self._reuses_cache():
            start = time.perf_counter()
            self._generator = self._new_generator(self._room())
            self._setup_seconds = time.perf_counter() - start  # counted in time to first token

    def _new_generator(self, max_length: int | None = None) -> Any:
        """The search settings and, with a response_format, its compiled grammar (~0.5 s for a JSON
        schema on SmolLM2's 49k-token vocabulary): a schema or grammar that does not compile is a
        GenerationError here."""
        import onnxruntime_genai as og

        params = self.model._search_params(self._options, max_length=max_length or self._length)
        if self._options.guidance is not None:
            params.set_guidance(*self._options.guidance)
        try:
            generator = og.Generator(self.model._og_model, params)
            if self.model.adapter is not None:
                generator.set_active_adapter(*self.model._active_adapter())
            return generator
        except RuntimeError as e:
            if self._options.guidance is None:
                raise
            kind = self._options.guidance[0].replace("_", " ")
            problem = str(e).removeprefix("Error creating grammar: ").strip()
            raise GenerationError(f"the response_format's {kind} cannot be used: {problem}") from None

    def _room(self) -> int:
        """A new generator's length: this answer's, or room for answers like it when the cache keeps it."""
        return self._length if self._cache is None else min(self.model.context_length, 2 * self._length)

    def _reuses_cache(self) -> bool:
        """Does the cache hold a generator for this answer: one that fits it, made for the same
        response_format (its compiled grammar is then reused: rewinding restarts the grammar) and
        sampling settings."""
        return self._cache is not None and self._cache.has_slot(self._cache_key(), self._length)

    def _cache_key(self) -> tuple:
        """What a cached generator is good for: this model (and runtime adapter), the
        response_format and the settings its search was made with."""
        opts, temperature = self._options, self.model.temperature(self._options)
        sampling = (temperature, opts.top_p, opts.top_k) if temperature > 0 else ()
        return (id(self.model._og_model), self.model.adapter, opts.guidance, opts.repetition_penalty, *sampling)

    def _cached_generator(self) -> tuple[Any, int]:
        """A generator and how many prompt tokens it already holds: the cache's slot that shares
        the most with this prompt, rewound to where they differ; else a new one, kept in a slot."""
        cache = self._cache
        if cache is None:
            generator, self._generator = self._generator or self._new_generator(), None
            return generator, 0
        if cache.batch is not None and self._batchable(cache.batch):
            sampling = self.model.sampling(self._options)
            opened = cache.batch.open(self._prompt_ids, self._length, sampling, _random_source())
            if opened is not None:  # else (every row busy, or the answer longer than a row) a generator of its own
                self._row, known = opened
                return self._row, known
        # with a grammar, even a prompt that shares nothing is cheaper to run than a new generator
        slot, known = cache.take(
            self._cache_key(), self._prompt_ids, self._length, any_prefix=self._options.guidance is not None
        )
        if slot is not None:
            slot.generator.rewind_to(known)
            self._generator = None
        else:
            room = self._room()  # room for prompts like this one
            generator, self._generator = self._generator or self._new_generator(room), None
            slot = _Slot(generator, [], room, self._cache_key(), room * self.model.kv_bytes_per_token)
        slot.tokens = list(self._prompt_ids)
        self._slot = slot
        return slot.generator, known

    def _batchable(self, batch: Any) -> bool:
        """Can the batch decode this answer: plain sampling on the batch's own model (see batching)."""
        opts = self._options
        return (
            batch.model._og_model is self.model._og_model
            and self.model.adapter is None
            and opts.guidance is None
            and opts.repetition_penalty in (None, 1.0)
            and self._score_ids is None
        )

    def cancel(self) -> None:
        """Stop generating after the current token (thread-safe)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def _generate(self) -> Iterator[str]:
        model, started = self.model, time.perf_counter() - self._setup_seconds
        stops = StopStringFilter(self._options.stop)
        parts: list[str] = []
        generated, first_token_at, last, ended = 0, None, None, None
        try:
            if self.cancelled:  # cancelled before its turn came (a server queue): skip even the prefill
                return
            generator, self.reused_tokens = self._cached_generator()
            # the prefill: the prompt, less what the cache holds
            generator.append_tokens(self._prompt_ids[self.reused_tokens :])
            score = ReferenceScore(self._score_ids) if self._score_ids else None
            decoder = model._tokenizer.create_stream()
            while not generator.is_done() and generated < self._max_tokens and not self.cancelled and not stops.stopped:
                if score:
                    score.step(generator)
                logits = generator.get_logits() if self._logprobs is not None else None
                generator.generate_next_token()
                last = int(generator.get_next_tokens()[0])
                if score:
                    score.chose(last)
                generated += 1
                first_token_at = first_token_at or time.perf_counter()
                if last in model.eos_token_ids:
                    break  # the end-of-turn token itself is not part of the answer
                if logits is not None:
                    self._logprobs.append(self._logprob_entry(logits, last))
                piece = stops.push(decoder.decode(last))
                if piece:
                    parts.append(piece)
                    yield piece
            self.stopped_on = stops.matched
            if not stops.stopped and not self.cancelled and (tail := stops.flush()):
                parts.append(tail)
                yield tail
            if score and not self.cancelled:
                ended = time.perf_counter()  # the answer's time; scoring is the evaluation's, not the request's
                self.reference_nll = score.finish(generator, self.prompt_tokens)
        except GeneratorExit:  # the caller stopped iterating (close(), break): a cancelled answer
            self._cancelled.set()
            raise
        except BaseException:
            self._slot = None  # a generator an error stopped midway is not given back
            raise
        finally:
            if self._row is not None:
                self._row.release()
                self._row = None
            if self._slot is not None:
                self._cache.give(self._slot)
                self._slot = None
            if self.cancelled:
                reason = "cancelled"
            elif stops.stopped or last in model.eos_token_ids:
                reason = "stop"
            else:
                reason = "length"
            self.result = ChatResult(
                text="".join(parts),
                finish_reason=reason,
                usage={
                    "prompt_tokens": self.prompt_tokens,
                    "completion_tokens": generated,
                    "total_tokens": self.prompt_tokens + generated,
                },
                time_to_first_token=None if first_token_at is None else first_token_at - started,
                elapsed=(ended or time.perf_counter()) - started,
                cached_tokens=self.reused_tokens,
                logprobs=self._logprobs,
            )

    def _logprob_entry(self, logits: Any, token: int) -> dict:
        """OpenAI's logprobs entry for a chosen token: its log probability under the distribution it
        was drawn from (the logits over the temperature; greedy: the logits), and the top alternatives."""
        import numpy as np

        scores = np.asarray(logits, dtype=np.float64).reshape(-1)
        temperature = self.model.temperature(self._options)
        if temperature > 0:
            scores = scores / temperature
        shifted = scores - scores.max()
        logprobs = shifted - np.log(np.exp(shifted).sum())
        entry = self._token_entry(token, float(logprobs[token]))
        if n := self._options.top_logprobs:
            best = np.argpartition(-logprobs, n)[:n]
            best = best[np.argsort(-logprobs[best])]
            entry["top_logprobs"] = [self._token_entry(int(t), float(logprobs[t])) for t in best]
        else:
            entry["top_logprobs"] = []
        return entry

    def _token_entry(self, token: int, logprob: float) -> dict:
        text = self.model._tokenizer.decode([token])
        return {"token": text, "logprob": round(logprob, 6), "bytes": list(text.encode("utf-8"))}

    def take_logprobs(self) -> list[dict]:
        """The logprobs entries of the tokens generated since the last call (for streaming)."""
        if self._logprobs is None:
            return []
        taken, self._logprobs_taken = self._logprobs[self._logprobs_taken :], len(self._logprobs)
        return taken


class ToolCallStream(_Pieces):
    """A ChatStream's interface (iterate for text pieces, `.result`, `cancel()`, `close()`) over an
    answer that may call the declared functions; `.result.tool_calls` holds the calls."""

    def __init__(self, model, prompt_ids: list[int], options, max_tokens: int, *, choice, functions, parallel, cache):
        self.model, self._prompt_ids, self._options, self._max_tokens = model, prompt_ids, options, max_tokens
        self._functions, self._parallel, self._choice = functions, parallel, choice
        self.prompt_tokens = len(prompt_ids)
        self.result = None
        self._current = None
        self._cancelled = False
        self._pieces: Iterator[str] | None = None
        self._calls = None
        if choice == "required":
            self._calls_stream("")  # a grammar that does not compile fails here, before any generation
        else:  # free text first, up to where a call begins ("none": a call the model begins ends the answer)
            stops = replace(options, stop=(*options.stop, toolcalls.CALL_OPEN))
            self._current = ChatStream(model, prompt_ids, stops, max_tokens, cache=cache)

    @property
    def reused_tokens(self) -> int:
        return getattr(self._current, "reused_tokens", 0)

    def _calls_stream(self, text: str):
        """The constrained continuation after `text` and `<tool_call>`."""
        grammar = toolcalls.calls_grammar(self._functions, parallel=self._parallel)
        opts = GenerationOptions(
            temperature=self._options.temperature,
            top_p=self._options.top_p,
            top_k=self._options.top_k,
            repetition_penalty=self._options.repetition_penalty,
            seed=self._options.seed,
            response_format={"type": "lark_grammar", "grammar": grammar},
        )
        # the text and the opening tag as training tokenized them: one piece of text
        ids = self._prompt_ids + [int(t) for t in self.model._tokenizer.encode(text + toolcalls.CALL_OPEN)]
        room = min(self._max_tokens, self.model.context_length - len(ids))
        if room < 1:
            return None
        stream = ChatStream(self.model, ids, opts, room)
        self._calls = stream
        return stream

    def cancel(self) -> None:
        self._cancelled = True
        if self._current is not None:
            self._current.cancel()

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def _generate(self) -> Iterator[str]:
        text, free = "", None
        if self._current is not None:
            free = self._current
            for piece in free:
                text += piece
                yield piece
            if self._choice == "none" or free.stopped_on != toolcalls.CALL_OPEN:
                self.result = free.result
                return
        calls_stream = self._calls if free is None else self._calls_stream(text)
        if calls_stream is None or self._cancelled:
            self.result = free.result if free else None
            return
        self._current = calls_stream
        written = "".join(calls_stream)
        done = calls_stream.result
        _, calls = toolcalls.parse_calls(toolcalls.CALL_OPEN + written)
        before = free.result if free else None
        used = (before.usage["completion_tokens"] if before else 0) + done.usage["completion_tokens"]
        complete = done.finish_reason == "stop" and bool(calls)  # else cut short: the raw text, as OpenAI does
        first = before.time_to_first_token if before and before.usage["completion_tokens"] > 1 else None
        self.result = ChatResult(
            text=text.strip() if complete else text + toolcalls.CALL_OPEN + written,
            finish_reason="tool_calls" if complete else done.finish_reason,
            usage={
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": used,
                "total_tokens": self.prompt_tokens + used,
            },
            time_to_first_token=first if first is not None else done.time_to_first_token,
            elapsed=(before.elapsed if before else 0.0) + done.elapsed,
            cached_tokens=before.cached_tokens if before else 0,
            tool_calls=tooluse.openai_calls(calls) if complete else None,
        )


REUSE_MIN_TOKENS = 16  # a cached prompt is taken over only when it shares at least this many tokens


@dataclass
class _Slot:
    """One generator a PromptCache keeps, and what it holds."""

    generator: Any
    tokens: list[int]  # the prompt it last ran (its KV cache holds at least these)
    max_length: int
    made_for: tuple  # the model, runtime adapter, response_format and sampling settings it serves
    nbytes: int  # the KV cache it holds room for


class PromptCache:
    """KV caches of recent prompts, for answers whose prompts begin alike (one system prompt and
    tools, the earlier turns of a conversation, the same few-shot examples): an answer takes the
    slot whose last prompt shares the most with its own and runs only from where they differ.
    Answers with one response_format also keep its compiled grammar (~0.5 s a request otherwise).

    A slot serves one answer at a time (taken when its prefill starts, given back when it ends),
    so answers generated side by side never share a generator. The least recently used slots go
    when there are more than `max_slots` or their KV room passes `max_bytes`. Greedy answers and
    sampled ones without a `seed` use it; a seeded answer always gets a fresh generator, so the
    same seed gives the same answer. Pass it to `ChatModel.stream(..., cache=)`."""

    def __init__(self, max_slots: int = 4, max_bytes: int = 1 << 30, *, batch: Any = None):
        self.max_slots, self.max_bytes = max_slots, max_bytes
        # a BatchDecoder: the answers it can take run in its rows, decoded together (see batching)
        self.batch = batch
        self._slots: list[_Slot] = []  # least recently used first
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._slots)

    @property
    def generator(self) -> Any:
        """The generator of the slot given back last (None when empty)."""
        with self._lock:
            return self._slots[-1].generator if self._slots else None

    def has_slot(self, made_for: tuple, length: int) -> bool:
        with self._lock:
            return any(s.made_for == made_for and s.max_length >= length for s in self._slots)

    def take(
        self, made_for: tuple, prompt_ids: list[int], length: int, *, any_prefix: bool
    ) -> tuple[_Slot | None, int]:
        """The slot for this prompt and how many of its tokens the slot holds: the one that shares
        the most, if taking it over is worth it (below), removed until it is given back."""
        with self._lock:
            best, known = None, 0
            for slot in self._slots:
                if slot.made_for != made_for or slot.max_length < length:
                    continue
                shared = common_prefix(slot.tokens, prompt_ids[:-1])  # at least one token to run
                if best is None or shared > known:
                    best, known = slot, shared
            if best is None:
                return None, 0
            # Taken over, a slot loses what this prompt does not share: worth it when the prompt
            # keeps most of it (a conversation going on, one system prompt) or the cache is full;
            # else a new generator, and the slot stays for the prompts like its own. A grammar
            # (~0.5 s to compile) is always worth reusing.
            keeps_most = known >= REUSE_MIN_TOKENS and 2 * known >= len(best.tokens)
            full = len(self._slots) >= self.max_slots and known >= REUSE_MIN_TOKENS
            if not (keeps_most or full or any_prefix):
                return None, 0
            self._slots.remove(best)
            return best, known

    def give(self, slot: _Slot) -> None:
        with self._lock:
            self._slots.append(slot)
            while len(self._slots) > self.max_slots or sum(s.nbytes for s in self._slots) > self.max_bytes:
                self._slots.pop(0)


def _random_source() -> Any:
    import numpy as np

    return np.random.default_rng()


class ReferenceScore:
    """The summed NLL of a reference answer after the prompt, from the logits the answer's own
    greedy steps chose by while the answer is the reference's start (all of it, for a fine-tuned
    model's usual answer), and for the rest from one rewind to where the answer left it, fed in
    pieces (as teacher_forced_logits): the prompt is never run twice."""

    def __init__(self, ids: list[int]):
        self.ids, self.nll = ids, 0.0
        self.position = 0  # tokens generated so far
        self.scored = 0  # reference tokens scored
        self.on_reference = True  # the answer so far is the reference's start

    def step(self, generator: Any) -> None:
        """Before a token is chosen: while the answer so far is the reference's start, these
        logits follow the reference's own tokens and score its token at this position."""
        import numpy as np

        if self.on_reference and self.position < len(self.ids):
            logits = np.asarray(generator.get_logits(), dtype=np.float32).reshape(1, -1)
            self.nll += negative_log_likelihood(logits, self.ids[self.position : self.position + 1])
            self.scored = self.position + 1

    def chose(self, token: int) -> None:
        self.on_reference = self.on_reference and self.position < len(self.ids) and token == self.ids[self.position]
        self.position += 1

    def finish(self, generator: Any, prompt_tokens: int) -> float:
        """The reference's tokens no step scored: rewind to the last token the answer shares with
        it and feed the reference from there."""
        import numpy as np

        if not self.scored:  # no token was generated: the prefill's logits
            self.step(generator)
        if self.scored < len(self.ids):
            generator.rewind_to(prompt_tokens + self.scored - 1)
            rows = forced_logits(generator, self.ids[self.scored - 1 : -1])
            self.nll += negative_log_likelihood(np.concatenate(rows), self.ids[self.scored :])
            self.scored = len(self.ids)
        return self.nll


# --- the model ------------------------------------------------------------------------------


class ChatModel:
    """An exported chat model, ready to answer. Make one with `ChatModel.load(path)`."""

    def __init__(
        self, path: Path, og_model: Any, tokenizer: Any, genai_config: dict, template: ChatTemplate, name: str
    ):
        self.path = path
        self.name = name
        self.genai_config = genai_config
        self.template = template
        self._og_model = og_model
        self._tokenizer = tokenizer
        model_cfg = genai_config.get("model", {})
        context = model_cfg.get("context_length") or genai_config.get("search", {}).get("max_length")
        if not isinstance(context, int) or context < 2:
            raise ModelError(
                f"{path / 'genai_config.json'} has no usable model.context_length ({context!r}). Export again."
            )
        self.context_length: int = context
        decoder = model_cfg.get("decoder", {})
        # a generator's KV cache per token of its room (fp32 keys and values on CPU): PromptCache's bound
        self.kv_bytes_per_token: int = (
            2
            * 4
            * decoder.get("num_hidden_layers", 1)
            * decoder.get("num_key_value_heads", 1)
            * decoder.get("head_size", 1)
        )
        eos = model_cfg.get("eos_token_id", [])
        self.eos_token_ids: frozenset[int] = frozenset([eos] if isinstance(eos, int) else eos)
        # Scoring (a reference's likelihood) reads the logits of every position of a chunk; a model
        # loaded from the generation graph has only the last one's (see SCORE_GRAPH).
        self.scoring = _decoder_file(genai_config) in (ALL_LOGITS_GRAPH, SCORE_GRAPH)
        # the tokenizer's special tokens (<|im_start|>, <|im_end|>, ...): only the template makes them
        self.control_tokens: tuple[str, ...] = ()
        self.threads: int = usable_cpus()  # intra-op threads of its sessions
        self.adapter: str | None = None  # the runtime LoRA adapter this model answers with
        self._adapters: dict[str, Any] = {"og": None, "files": {}}  # shared with every adapter view

    @classmethod
    def load(
        cls,
        path: str | Path,
        threads: int | None = None,
        adapter: str | Path | None = None,
        *,
        scoring: bool = False,
    ) -> ChatModel:
        """Load an export folder (runs/NAME/onnx-int4) or a run directory (runs/NAME); with `adapter`
        (an .onnx_adapter, its folder or its run), a shared base export answering with that adapter.
        `scoring`: the graph that gives the logits scoring reads (`reference_nll`,
        `stream(score=...)`): a chunk's last positions, not only its last; prompts run a little slower."""
        import onnxruntime_genai as og

        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise GenerationError(f"threads must be a whole number of at least 1, got {threads!r}.")
        if adapter is None and (alone := adapter_alone(Path(path).expanduser())) is not None:
            path, adapter = alone  # a runtime adapter's folder, or a run exported only as one: its base with it
        folder, name = resolve_export(Path(path).expanduser())
        genai_config = _read_json(folder / "genai_config.json")
        graph = scoring_graph(folder) if scoring else None
        if graph:
            genai_config["model"]["decoder"]["filename"] = graph
        tokenizer_config = _read_json(folder / "tokenizer_config.json")
        template = ChatTemplate.from_folder(folder, tokenizer_config)
        threads = threads or usable_cpus()
        try:
            og_model = og.Model(og_config(folder, threads, graph=graph))
            tokenizer = og.Tokenizer(og_model)
        except Exception as e:  # onnxruntime-genai raises plain RuntimeError for every load problem
            raise ModelError(
                f"onnxruntime-genai could not load {folder}: {e}. Export it again with `edgeft export`."
            ) from e
        # The rendered template already holds any BOS the model wants, as in transformers'
        # apply_chat_template(tokenize=True); the tokenizer must not add another.
        tokenizer.update_options(add_special_tokens="false")
        model = cls(folder, og_model, tokenizer, genai_config, template, name)
        model.control_tokens = control_tokens(tokenizer_config)
        model.threads = threads
        log.debug("loaded %s (context %d, threads %s)", folder, model.context_length, threads)
        return model.with_adapter(adapter) if adapter is not None else model

    def with_adapter(self, path: str | Path, name: str | None = None) -> ChatModel:
        """This base with a runtime LoRA adapter loaded: a model that answers with the adapter, sharing
        the base's weights with every other adapter loaded on it (the base itself still answers without).

        Refuses an adapter made for another base, a damaged file, and a name already taken."""
        import copy

        import onnxruntime_genai as og

        from edgeft.runtime.adapters import adapter_name, check_adapter, resolve_adapter

        file = resolve_adapter(path)
        name = name or adapter_name(file)
        if name in self._adapters["files"]:
            raise ModelError(f"an adapter named {name!r} is already loaded (from {self._adapters['files'][name]}).")
        check_adapter(file, self.path)
        try:
            if self._adapters["og"] is None:
                self._adapters["og"] = og.Adapters(self._og_model)
            self._adapters["og"].load(str(file), name)
        except Exception as e:
            raise ModelError(f"onnxruntime-genai could not load the adapter {file}: {e}") from None
        self._adapters["files"][name] = file
        view = copy.copy(self)
        view.adapter, view.name = name, name
        return view

    def _active_adapter(self) -> tuple[Any, str] | None:
        return None if self.adapter is None else (self._adapters["og"], self.adapter)

    def __repr__(self) -> str:
        return f"ChatModel({self.name!r}, path={str(self.path)!r}, context_length={self.context_length})"

    # --- text -> tokens ---------------------------------------------------------------------
    def apply_template(self, messages: Sequence[dict]) -> str:
        """The exact prompt text the model sees for this conversation (ending with the assistant cue)."""
        return self.template.render(check_messages(messages))

    def count_tokens(self, text_or_messages: str | Sequence[dict]) -> int:
        """Tokens in a string, or in the prompt a conversation renders to."""
        if isinstance(text_or_messages, str):
            return len(self._tokenizer.encode(text_or_messages))
        return len(self.prompt_ids(text_or_messages))

    def prompt_ids(self, messages: Sequence[dict]) -> list[int]:
        """The prompt's tokens. Text in a message is text: a control token written in it
        (`<|im_end|>`, `<|im_start|>`) is encoded as its characters, never as the token, so a user
        cannot end their turn and open a system or assistant turn of their own; only the template
        makes control tokens."""
        checked = check_messages(messages)
        if not any(token in m["content"] for m in checked for token in self.control_tokens):
            return [int(t) for t in self._tokenizer.encode(self.template.render(checked))]
        # the template around each message, encoded as usual; each message's text on its own
        marks = [f"\ue000{i}\ue001" for i in range(len(checked))]  # private-use characters no one types
        rest = self.template.render([{**m, "content": mark} for m, mark in zip(checked, marks)])
        ids: list[int] = []
        for message, mark in zip(checked, marks):
            before, found, rest = rest.partition(mark)
            if not found:  # the template changed or dropped the text: no safe split
                raise GenerationError(
                    f"a message contains a control token of the chat format ({self._first_control(checked)}), which "
                    "this model's chat template does not let edgeft keep as plain text. Remove it from the message."
                )
            ids += self._encode(before) + self._encode_text(message["content"])
        return ids + self._encode(rest)

    def _encode(self, text: str) -> list[int]:
        return [int(t) for t in self._tokenizer.encode(text)] if text else []

    def _encode_text(self, text: str) -> list[int]:
        """`text` with each control token in it encoded as two pieces of plain text."""
        pattern = "(" + "|".join(re.escape(t) for t in self.control_tokens) + ")"
        ids: list[int] = []
        for i, part in enumerate(re.split(pattern, text)):
            ids += self._encode(part) if i % 2 == 0 else self._encode(part[:1]) + self._encode(part[1:])
        return ids

    def _first_control(self, messages: list[dict]) -> str:
        return next(t for m in messages for t in self.control_tokens if t in m["content"])

    # --- generation -------------------------------------------------------------------------
    def stream(
        self,
        messages: Sequence[dict],
        *,
        tools: Sequence[dict] | None = None,
        tool_choice: str | dict | None = None,
        parallel_tool_calls: bool = True,
        score: str | None = None,
        cache: PromptCache | None = None,
        **options: Any,
    ) -> ChatStream:
        """Start an answer; iterate the returned ChatStream for text pieces, then read `.result`.

        Options: max_tokens, temperature, top_p, top_k, repetition_penalty, stop, seed (see
        GenerationOptions). Bad options, bad messages and prompts that do not fit the context
        raise GenerationError here, before any generation. `score` (a reference answer, for
        evaluation): after the answer, `stream.reference_nll` holds how surprised the model is by
        it, as `reference_nll` computes it, without running the prompt again. `cache` (a
        PromptCache; greedy answers): the part of the prompt the cache's last prompt shares is not
        run again, nor a response_format compiled again.

        `tools` (OpenAI's function definitions), `tool_choice` ("auto", "none", "required" or a named
        function) and `parallel_tool_calls`: the answer may call them; `.result.tool_calls` then holds
        the calls (OpenAI's form), each one parsed and fitting its function's schema (see tooluse).
        Messages may hold assistant `tool_calls` and `tool` results.
        """
        opts = GenerationOptions.from_kwargs(options)
        functions = tooluse.functions_of(tools) if tools else []
        choice, callable_functions = tooluse.resolve_choice(tool_choice, functions)
        if functions or any(
            isinstance(m, dict) and (m.get("tool_calls") or m.get("role") in ("tool", "function"))
            for m in messages or ()
        ):
            # "none": the tools stay out of the prompt, so the model answers in text
            messages = toolcalls.plain_conversation(list(messages), functions if choice != "none" else [])
        prompt_ids = self.prompt_ids(messages)
        room = self._room_after(prompt_ids, opts)
        if score is not None:
            self._check_scoring()
        score_ids = None if score is None else self._answer_ids(score)
        if score_ids and len(prompt_ids) + len(score_ids) > self.context_length:
            raise ContextLengthError(f"the prompt and the reference to score do not fit {self.name}'s context.")
        if choice != "none":
            if score is not None or opts.guidance is not None:
                raise GenerationError("tools cannot be combined with a response_format or a reference to score.")
            return ToolCallStream(
                self,
                prompt_ids,
                opts,
                opts.max_tokens or room,
                choice=choice,
                functions=callable_functions,
                parallel=parallel_tool_calls is not False,
                cache=cache,
            )
        if functions:  # tool_choice "none": should the model begin a call anyway, the answer ends there
            opts.stop = (*opts.stop, toolcalls.CALL_OPEN)
        return ChatStream(self, prompt_ids, opts, opts.max_tokens or room, score_ids=score_ids, cache=cache)

    def complete_stream(self, prompt: str, *, cache: PromptCache | None = None, **options: Any) -> ChatStream:
        """Continue `prompt` as it is, without the chat template (OpenAI's completions); the same
        options as `stream`."""
        if not isinstance(prompt, str) or not prompt:
            raise GenerationError("prompt must be a non-empty string.")
        opts = GenerationOptions.from_kwargs(options)
        prompt_ids = [int(t) for t in self._tokenizer.encode(prompt)]
        return ChatStream(self, prompt_ids, opts, opts.max_tokens or self._room_after(prompt_ids, opts), cache=cache)

    def _room_after(self, prompt_ids: list[int], opts: GenerationOptions) -> int:
        """How many new tokens fit after the prompt; a ContextLengthError when none do, or fewer
        than max_tokens."""
        room = self.context_length - len(prompt_ids)
        if room < 1:
            raise ContextLengthError(
                f"the prompt is {len(prompt_ids)} tokens, but {self.name} has a context of {self.context_length} "
                "tokens and needs room for at least one new token. Shorten the conversation or start a new one."
            )
        if opts.max_tokens is not None and opts.max_tokens > room:
            raise ContextLengthError(
                f"max_tokens={opts.max_tokens} does not fit: the prompt is {len(prompt_ids)} tokens and {self.name} "
                f"has a context of {self.context_length}, so at most {room} new tokens fit. Lower max_tokens."
            )
        return room

    def chat(self, messages: Sequence[dict], **options: Any) -> ChatResult:
        """Answer a conversation in one go; same options as `stream`."""
        stream = self.stream(messages, **options)
        stream.text()
        assert stream.result is not None
        return stream.result

    def reference_nll(self, messages: Sequence[dict], reference: str) -> tuple[float, int]:
        """How surprised the model is by `reference` as the answer: summed negative log-likelihood and
        token count (the answer plus the end-of-turn token), feeding the reference, not its own picks."""
        self._check_scoring()
        prompt = self.prompt_ids(messages)
        answer = self._answer_ids(reference)
        logits = teacher_forced_logits(self._og_model, prompt, answer, adapter=self._active_adapter())
        return negative_log_likelihood(logits, answer), len(answer)

    def _check_scoring(self) -> None:
        if not self.scoring:
            raise GenerationError(
                f"scoring a reference needs the logits of every reference position, and {self.name} was loaded for generation "
                "(its prompt pass computes only the last position's). Load it with ChatModel.load(path, scoring=True)."
            )

    def _answer_ids(self, reference: str) -> list[int]:
        """A reference answer as the tokens a model should write: its text and the end of its turn."""
        return [int(t) for t in self._tokenizer.encode(reference)] + [self.end_of_turn_id]

    @property
    def end_of_turn_id(self) -> int:
        """The stop id that closes an assistant turn in this chat format (<|im_end|>, <|end|>, ...)."""
        from edgeft.chatdata import END_OF_TURN_TOKENS

        for token in END_OF_TURN_TOKENS:
            if token in self.template.source:
                token_id = int(self._tokenizer.to_token_id(token))
                if token_id in self.eos_token_ids:
                    return token_id
        return min(self.eos_token_ids)

    def temperature(self, opts: GenerationOptions) -> float:
        """The temperature an answer runs at: the one asked for, else the model's own (0 = greedy)."""
        if opts.temperature is not None:
            return opts.temperature
        defaults = self.genai_config.get("search", {})
        return float(defaults.get("temperature", 1.0)) if defaults.get("do_sample") else 0.0

    def sampling(self, opts: GenerationOptions) -> Sampling:
        """The answer's temperature, and its top_p and top_k (the model's defaults where not asked)."""
        defaults = self.genai_config.get("search", {})
        temperature = self.temperature(opts)
        if temperature <= 0:
            return Sampling(0.0)
        top_p = opts.top_p if opts.top_p is not None else float(defaults.get("top_p", 1.0))
        top_k = opts.top_k if opts.top_k is not None else int(defaults.get("top_k", 50))
        # onnxruntime-genai sorts top_k candidates: more than the vocabulary is "no limit" (and crashed it).
        return Sampling(temperature, top_p, min(top_k, int(self.genai_config["model"].get("vocab_size", top_k))))

    def _search_params(self, opts: GenerationOptions, max_length: int) -> Any:
        import onnxruntime_genai as og

        sampling = self.sampling(opts)
        search: dict[str, Any] = {"max_length": max_length, "do_sample": sampling.temperature > 0}
        if sampling.temperature > 0:
            search |= {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k}
        if opts.repetition_penalty is not None:
            search["repetition_penalty"] = opts.repetition_penalty
        if opts.seed is not None:
            search["random_seed"] = opts.seed
        params = og.GeneratorParams(self._og_model)
        params.set_search_options(**search)
        return params


def control_tokens(tokenizer_config: dict) -> tuple[str, ...]:
    """The tokenizer's special tokens (tokenizer_config.json's added_tokens_decoder), longest first."""
    added = tokenizer_config.get("added_tokens_decoder") or {}
    found = {t["content"] for t in added.values() if isinstance(t, dict) and t.get("special") and t.get("content")}
    return tuple(sorted(found, key=len, reverse=True))


def og_config(folder: Path, threads: int, *, graph: str | None = None) -> Any:
    """onnxruntime-genai's config for `folder` with `threads` intra-op threads, and `graph` (a file
    in the folder) in place of the one genai_config.json names. An overlay changes the config in
    memory: a large export is never copied or rewritten to change its threads."""
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    decoder: dict[str, Any] = {"session_options": {"intra_op_num_threads": threads}}
    if graph:
        decoder["filename"] = graph
    config.overlay(json.dumps({"model": {"decoder": decoder}}))
    return config


def scoring_graph(folder: Path) -> str | None:
    """The graph that scoring loads: the scoring graph, else (exports from before it) model.onnx,
    whose every position's logits serve too; None where the folder has neither (genai_config's)."""
    return next((name for name in (SCORE_GRAPH, ALL_LOGITS_GRAPH) if (folder / name).is_file()), None)


def _decoder_file(genai_config: dict) -> str:
    return genai_config.get("model", {}).get("decoder", {}).get("filename", ALL_LOGITS_GRAPH)


# --- finding and reading an export --------------------------------------------------------


def resolve_export(path: Path) -> tuple[Path, str]:
    """The export folder to load for `path` (an export folder or a run directory), and a display name."""
    from edgeft.artifacts import Run, restore_interrupted

    if not path.exists():
        restore_interrupted(path.parent)  # an export a killed `edgeft export --force` left hidden
    if not path.exists():
        raise ModelError(
            f"{path} does not exist. Pass an export folder (runs/NAME/onnx-int4) or a run directory (runs/NAME)."
        )
    if not path.is_dir():
        raise ModelError(f"{path} is a file; pass the export folder that holds genai_config.json, or a run directory.")
    if Run.is_run(path):
        folder = _export_of_run(Run.open(path))
        return check_export(folder), f"{path.resolve().name}/{folder.name}"
    folder = check_export(path)
    parent = folder.resolve().parent
    name = f"{parent.name}/{folder.name}" if Run.is_run(parent) else folder.resolve().name
    return folder, name


def adapter_alone(path: Path) -> tuple[Path, Path] | None:
    """(base export, adapter folder) for a runtime adapter's folder, or for a run whose only export is
    its adapter (a run trained on an export's weights); None for anything else."""
    from edgeft.artifacts import ADAPTER_FOLDER, Run

    folder = path
    if Run.is_run(path):
        run = Run.open(path)
        stage = run.stage("adapter")
        if run.stage("export") or not stage or any((path / name).is_dir() for name in EXPORT_FOLDERS):
            return None
        folder = path / stage.get("path", ADAPTER_FOLDER)
    record = folder / "edgeft-export.json"
    if not record.is_file():
        return None
    info = _read_json(record)
    return (Path(info["base"]), folder) if info.get("kind") == "adapter" and info.get("base") else None


def _export_of_run(run: Any) -> Path:
    stage = run.stage("export") or {}
    if stage.get("path"):
        folder = run.path / stage["path"]
        if not (folder / "genai_config.json").is_file():
            raise ModelError(
                f"the manifest of run {run.path} names the export {folder}, but it has no genai_config.json. "
                f"Export again with `edgeft export {run.path} --int4`."
            )
        return folder
    for name in EXPORT_FOLDERS:
        if (run.path / name / "genai_config.json").is_file():
            return run.path / name
    raise ModelError(f"run {run.path} has no ONNX export yet. Make one with `edgeft export {run.path} --int4`.")


def check_export(folder: Path) -> Path:
    """Fail with the name of the first missing file if `folder` is not a loadable export."""
    for name in REQUIRED_FILES:
        if not (folder / name).is_file():
            hint = ""
            if (folder / "config.json").is_file():
                hint = " It looks like a Hugging Face checkpoint: export it first with `edgeft export`."
            raise ModelError(
                f"{folder} is not an edgeft/onnxruntime-genai export: {name} is missing.{hint} "
                "Pass runs/NAME or runs/NAME/onnx-int4 after `edgeft export runs/NAME --int4`."
            )
    genai_config = _read_json(folder / "genai_config.json")
    decoder = genai_config.get("model")
    decoder = decoder.get("decoder") if isinstance(decoder, dict) else None
    if not isinstance(decoder, dict) or not isinstance(decoder.get("filename", "model.onnx"), str):
        raise ModelError(
            f"{folder / 'genai_config.json'} has no model.decoder section, so it does not describe a model. "
            "Export the model again."
        )
    model_file = decoder.get("filename", "model.onnx")
    if not (folder / model_file).is_file():
        raise ModelError(
            f"{folder} is an incomplete export: {model_file} (named in genai_config.json) is missing. "
            "Export again with `edgeft export runs/NAME --int4`."
        )
    return folder


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read {path}: {e}. Export the model again.") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path} should hold a JSON object. Export the model again.")
    return data
