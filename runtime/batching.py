"""Batched decoding: answers generated side by side share each forward pass (continuous batching).

One ONNX Runtime session over the export's generation graph and one KV cache of `rows` rows, laid
out as onnxruntime-genai lays out one answer's (keys and values [rows, kv heads, row tokens, head
size] per layer; the past and present buffers are the same memory). An answer holds a row while
it runs: its prompt runs alone into its row, in chunks, from where the row's last tokens differ
(the prompt cache: a row keeps its tokens when its answer ends); then each decoding step runs
the next token of every row in one pass. Rows join and leave at any step. Each row is
right-padded: the attention mask gives GroupQueryAttention each row's own length, so a row's
answer is the one it would get alone (checked against onnxruntime-genai when the decoder starts).

A row looks like an onnxruntime-genai Generator to ChatStream (append_tokens, generate_next_token,
get_next_tokens, get_logits, is_done): the answer's loop, its stop strings, logprobs, cancellation
and usage are ChatStream's own. The batch serves answers without a response_format, tools, a
runtime adapter, a repetition penalty, a seed or a reference to score; the others, and answers
longer than a row, run on their own onnxruntime-genai generator as before.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from edgeft.errors import GenerationError
from edgeft.fidelity import common_prefix

log = logging.getLogger("edgeft")

GATHER_S = 0.004  # how long a step waits for rows whose answers have not sent their next token yet
PREFILL_CHUNK = 512  # prompt tokens per pass: a long prompt delays the other rows' steps by one chunk at a time
ROW_TOKENS = 2048  # a row's room (prompt and answer), like llama.cpp's context per slot; longer answers run alone
# The KV cache holds this many places a row to begin with, and doubles when an answer needs more
# (up to ROW_TOKENS): a step attends over the rows' strided buffers, and with 4 rows it ran 25%
# faster with 512 places than with 2048 (SmolLM2-135M int4, 2 threads).
FIRST_CAPACITY = 256
CHECK_TOKENS = 8  # greedy tokens compared with onnxruntime-genai's when the decoder starts


@dataclass
class Sampling:
    """How a row picks its tokens: greedy at temperature 0, else sampled as onnxruntime-genai does
    (temperature, then top_k, then top_p over what is left)."""

    temperature: float
    top_p: float = 1.0
    top_k: int = 0

    def pick(self, logits: Any, rng: Any) -> int:
        import numpy as np

        if self.temperature <= 0:
            return int(np.argmax(logits))
        scores = np.asarray(logits, dtype=np.float64) / self.temperature
        order = np.argsort(-scores)
        if 0 < self.top_k < len(order):
            order = order[: self.top_k]
        probs = np.exp(scores[order] - scores[order[0]])
        probs /= probs.sum()
        if self.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), self.top_p)) + 1
            order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
        return int(order[rng.choice(len(order), p=probs)])


class Row:
    """One answer's place in the batch, driven like an onnxruntime-genai Generator."""

    def __init__(self, decoder: BatchDecoder, index: int):
        self.decoder, self.index = decoder, index
        self.tokens: list[int] = []  # what the row's KV cache holds, in order
        self.busy = False
        self.last_used = 0
        self.feed: list[int] | None = None  # tokens waiting for the next pass
        self.logits: Any = None
        self.error: BaseException | None = None
        self.served = threading.Event()  # set when the row's feed has been run, or it is to run the passes
        self.lead = False
        self.sampling = Sampling(0.0)
        self.rng: Any = None
        self._next: int | None = None  # the token picked last, fed on the next call that needs logits

    # --- the Generator interface ChatStream uses ---
    def append_tokens(self, ids: Any) -> None:
        self._run([int(t) for t in ids])

    def generate_next_token(self) -> None:
        self._catch_up()
        self._next = self.sampling.pick(self.logits, self.rng)

    def get_next_tokens(self) -> list[int]:
        return [self._next] if self._next is not None else []

    def get_logits(self) -> Any:
        self._catch_up()
        return self.logits.reshape(1, -1)

    def is_done(self) -> bool:
        return len(self.tokens) + (self._next is not None) >= self.decoder.row_tokens

    # --- the rest ---
    def release(self) -> None:
        """The answer ended: the row is free, and keeps its tokens for a prompt that begins alike."""
        self.decoder._release(self)

    def _catch_up(self) -> None:
        if self._next is not None:
            token, self._next = self._next, None
            self._run([token])

    def _run(self, ids: list[int]) -> None:
        if ids:
            self.decoder._run(self, ids)
        if self.error is not None:
            error, self.error = self.error, None
            raise GenerationError(f"batched decoding failed: {error}") from error


class BatchDecoder:
    """`rows` answers decoded together on `model`'s export. Make one with `BatchDecoder.start`."""

    def __init__(self, model: Any, session: Any, rows: int, row_tokens: int):
        import numpy as np

        decoder = model.genai_config["model"]["decoder"]
        self.model, self.session, self.row_tokens = model, session, row_tokens
        names, outputs = decoder["inputs"], decoder["outputs"]
        self._ids_name, self._mask_name, self._logits_name = (
            names["input_ids"],
            names["attention_mask"],
            outputs["logits"],
        )
        self._pairs = kv_names(decoder)
        self._dtype = np.float16 if "float16" in session.get_inputs()[2].type else np.float32
        self._shape = (rows, decoder["num_key_value_heads"], decoder["head_size"])
        self._capacity, self._wanted = 0, min(FIRST_CAPACITY, row_tokens)
        self._cache: list[Any] = []
        self._bindings: dict[tuple[int, int], Any] = {}
        self.rows = [Row(self, i) for i in range(rows)]
        self._cond = threading.Condition()
        self._uses = 0
        self._running = False  # an answer's thread is running passes (see _run)
        self._gathering = False  # and waiting for the rows still busy with their last token
        self._closed = False

    @classmethod
    def start(cls, model: Any, rows: int, row_tokens: int = ROW_TOKENS) -> BatchDecoder | None:
        """A decoder for `model`, or None (with the reason logged) where its export cannot be
        batched this way: the answers then run one generator each, as without batching."""
        import onnxruntime as ort

        from edgeft.cpu import ort_session_options

        decoder = model.genai_config.get("model", {}).get("decoder", {})
        reason = _unsupported(model.genai_config)
        if reason is None:
            graph = str(model.path / decoder["filename"])
            session = ort.InferenceSession(
                graph, ort_session_options(model.threads), providers=["CPUExecutionProvider"]
            )
            inputs = {i.name for i in session.get_inputs()}
            expected = {decoder["inputs"]["input_ids"], decoder["inputs"]["attention_mask"]}
            expected |= {past for past, _ in kv_names(decoder)}
            if inputs != expected:
                reason = f"its graph takes inputs batching does not fill ({', '.join(sorted(inputs - expected))})"
        if reason is None:
            batch = cls(model, session, rows, min(row_tokens, model.context_length))
            reason = batch._differs_from_genai()
            if reason is None:
                return batch
            batch.close()
        log.warning("batched decoding is off for %s: %s; each answer runs on its own.", model.name, reason)
        return None

    def open(self, prompt_ids: list[int], length: int, sampling: Sampling, rng: Any) -> tuple[Row, int] | None:
        """A free row for an answer of `length` tokens (prompt and answer) and how many of the
        prompt's tokens it holds already: the free row whose tokens share the most with the
        prompt, else the one used least recently. None when no row is free or the answer does not fit."""
        if length > self.row_tokens - 1:  # a row keeps one place free (see _decode)
            return None
        with self._cond:
            free = [r for r in self.rows if not r.busy]
            if not free:
                return None
            row = max(free, key=lambda r: (common_prefix(r.tokens, prompt_ids[:-1]), -r.last_used))
            known = common_prefix(row.tokens, prompt_ids[:-1])  # at least one token runs: its logits
            self._uses += 1
            row.busy, row.last_used, row.tokens = True, self._uses, row.tokens[:known]
            self._wanted = max(self._wanted, length + 1)  # the runner grows the cache before its next pass
            row.sampling, row.rng, row.error, row._next = sampling, rng, None, None
            return row, known

    def close(self) -> None:
        """Answers still running end with a GenerationError at their next token."""
        with self._cond:
            self._closed = True

    # --- the passes: run by the answers' own threads, one at a time ---
    def _run(self, row: Row, ids: list[int]) -> None:
        """Feed `ids` to `row` and return when its logits are ready. No thread of its own: the
        answer that finds no pass running runs the next one, for every row fed by then (after
        waiting a moment for the rows still busy with their last token), until its own row is
        served; then it wakes the answers it served and hands the running on to one still waiting.
        One answer alone runs its passes itself, as a generator does."""
        with self._cond:
            row.feed, row.lead = ids, False
            row.served.clear()
            if self._closed:
                row.feed, row.error = None, GenerationError("the batch decoder was closed")
                return
            if self._running:
                if self._gathering:
                    self._cond.notify()  # the running answer is waiting for rows like this one
                leads = False
            else:
                self._running = leads = True
        if not leads:
            row.served.wait()
            if not row.lead:
                return
        while True:
            with self._cond:
                self._gathering = True
                deadline = time.monotonic() + GATHER_S
                while any(r.busy and r.feed is None for r in self.rows) and (left := deadline - time.monotonic()) > 0:
                    self._cond.wait(left)
                self._gathering = False
                fed = [(r, r.feed) for r in self.rows if r.feed]
                for r, _ in fed:
                    r.feed = None
            try:
                self._passes(fed)
            except BaseException as e:  # (a Ctrl-C in this thread): the others must not wait on a runner gone
                with self._cond:
                    self._running = False
                    for r in self.rows:
                        if r is not row and (r.feed or any(r is f for f, _ in fed)):
                            r.feed, r.error = None, GenerationError(f"the answer running the batch stopped ({e!r})")
                            r.served.set()
                raise
            with self._cond:
                for r, _ in fed:
                    if r is not row and r.feed is None:  # served (a prompt chunk left is fed again)
                        r.served.set()
                if row.feed is not None and not self._closed:
                    continue  # its own prompt has chunks left
                waiting = [r for r in self.rows if r.feed]
                if waiting and not self._closed:
                    waiting[0].lead = True
                    waiting[0].served.set()
                else:
                    self._running = False
                    for r in waiting:  # closed: nobody runs them
                        r.feed, r.error = None, GenerationError("the batch decoder was closed")
                        r.served.set()
                return

    def _passes(self, fed: list[tuple[Row, list[int]]]) -> None:
        """One decoding step for the rows fed one token, then a prompt chunk for each row fed more."""
        if self._wanted > self._capacity:
            try:
                self._grow()
            except Exception as e:  # no memory for a longer answer: the step's rows fail, the server goes on
                log.exception("growing the batch's KV cache failed")
                for r, _ in fed:
                    r.error, r.feed = e, None
                return
        steps = [(r, ids) for r, ids in fed if len(ids) == 1]
        prompts = [(r, ids) for r, ids in fed if len(ids) > 1]
        for rows, run in ([(steps, self._decode)] if steps else []) + [([p], self._prefill) for p in prompts]:
            try:
                run(rows)
            except Exception as e:  # a failed pass fails its rows' answers, not the server
                log.exception("batched decoding pass failed")
                for r, _ in rows:
                    r.error, r.feed = e, None

    def _release(self, row: Row) -> None:
        with self._cond:
            row.busy, row.feed, row._next = False, None, None

    def _grow(self) -> None:
        """Room for the longest answer open: double the places a row has (rows keep their tokens)."""
        import numpy as np

        capacity = max(self._capacity, FIRST_CAPACITY)
        while capacity < self._wanted:
            capacity *= 2
        capacity = min(capacity, self.row_tokens)
        rows, heads, size = self._shape
        grown = []
        for old in self._cache or [None] * len(self._pairs):
            new = np.zeros((rows, heads, capacity, size), self._dtype)  # pages are taken as rows fill
            if old is not None:
                new[:, :, : self._capacity] = old
            grown.append(new)
        self._cache, self._capacity, self._bindings = grown, capacity, {}

    def _binding(self, start: int, stop: int) -> Any:
        """The session's binding for rows start..stop-1: their KV cache as both past and present
        (views of the rows' memory itself, not copies), made once per range."""
        import onnxruntime as ort

        key = (start, stop)
        if key not in self._bindings:
            io = self.session.io_binding()
            for cache, (past, present) in zip(self._cache, self._pairs):
                view = ort.OrtValue.ortvalue_from_numpy(cache[start:stop])
                io.bind_ortvalue_input(past, view)
                io.bind_ortvalue_output(present, view)
            self._bindings[key] = io
        return self._bindings[key]

    def _pass(self, start: int, stop: int, ids: Any, mask: Any) -> Any:
        io = self._binding(start, stop)
        io.bind_cpu_input(self._ids_name, ids)
        io.bind_cpu_input(self._mask_name, mask)
        io.bind_output(self._logits_name)
        self.session.run_with_iobinding(io)
        return io.get_outputs()[-1].numpy()

    def _prefill(self, fed: list[tuple[Row, list[int]]]) -> None:
        """One chunk of one row's prompt, alone; the rest goes back in line behind the next step."""
        import numpy as np

        ((row, ids),) = fed
        chunk, rest = ids[:PREFILL_CHUNK], ids[PREFILL_CHUNK:]
        total = len(row.tokens) + len(chunk)
        logits = self._pass(row.index, row.index + 1, np.asarray([chunk], np.int64), np.ones((1, total), np.int64))
        row.tokens += chunk
        if rest:
            with self._cond:  # back in line: the next pass takes it, after a decoding step of the others
                row.feed = rest
        else:
            row.logits = logits[0, -1].copy()

    def _decode(self, fed: list[tuple[Row, list[int]]]) -> None:
        """One token for each fed row, in one pass over the rows from the first fed one to the last
        (one answer alone: its row only, wherever it is). A row in that range with no token (free,
        or its answer not ready) runs a stand-in token that writes its keys and values one place
        past its own tokens, where nothing reads them."""
        import numpy as np

        low, top = min(r.index for r, _ in fed), max(r.index for r, _ in fed) + 1
        ids = np.zeros((top - low, 1), np.int64)
        lengths = [len(r.tokens) for r in self.rows[low:top]]
        for r, (token,) in fed:
            ids[r.index - low, 0] = token
        mask = np.zeros((top - low, max(lengths) + 1), np.int64)
        for i, n in enumerate(lengths):
            mask[i, : n + 1] = 1
        logits = self._pass(low, top, ids, mask)
        for r, (token,) in fed:
            r.tokens.append(token)
            r.logits = logits[r.index - low, -1].copy()

    def _differs_from_genai(self) -> str | None:
        """Greedy tokens of a short prompt from row 0 and from onnxruntime-genai: None when they agree."""
        import numpy as np
        import onnxruntime_genai as og

        prompt = self.model.prompt_ids([{"role": "user", "content": "What is the capital of France?"}])
        params = og.GeneratorParams(self.model._og_model)
        params.set_search_options(max_length=len(prompt) + CHECK_TOKENS + 1, do_sample=False)
        generator = og.Generator(self.model._og_model, params)
        generator.append_tokens(np.asarray([prompt], np.int32))
        expected = []
        while len(expected) < CHECK_TOKENS and not generator.is_done():
            generator.generate_next_token()
            expected.append(int(generator.get_next_tokens()[0]))
            if expected[-1] in self.model.eos_token_ids:
                break
        opened = self.open(prompt, len(prompt) + CHECK_TOKENS, Sampling(0.0), None)
        assert opened is not None
        row, _ = opened
        try:
            row.append_tokens(prompt)
            got = []
            for _ in expected:
                row.generate_next_token()
                got.append(row.get_next_tokens()[0])
        except GenerationError as e:
            return f"its graph did not run batched ({e})"
        finally:
            row.release()
            row.tokens = []
        return None if got == expected else f"its greedy tokens differ from onnxruntime-genai's ({got} vs {expected})"


def kv_names(decoder: dict) -> list[tuple[str, str]]:
    """(past input, present output) names of each layer's keys and values, from genai_config's decoder."""
    names, outputs = decoder["inputs"], decoder["outputs"]
    return [
        (names[f"past_{kind}_names"] % i, outputs[f"present_{kind}_names"] % i)
        for i in range(decoder["num_hidden_layers"])
        for kind in ("key", "value")
    ]


def _unsupported(genai_config: dict) -> str | None:
    decoder = genai_config.get("model", {}).get("decoder", {})
    inputs, outputs = decoder.get("inputs", {}), decoder.get("outputs", {})
    if not genai_config.get("search", {}).get("past_present_share_buffer"):
        return "its KV cache is not one shared past/present buffer"
    needed = ("input_ids", "attention_mask", "past_key_names", "past_value_names")
    if any(name not in inputs for name in needed) or "logits" not in outputs:
        return "its genai_config.json does not name the inputs batching fills"
    if any(key not in decoder for key in ("num_hidden_layers", "num_key_value_heads", "head_size", "filename")):
        return "its genai_config.json lacks the KV cache's shape"
    return None
