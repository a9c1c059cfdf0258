"""Batched decoding (edgeft.runtime.batching): answers decoded together are the answers each gets alone."""

from __future__ import annotations

import json
import shutil
import threading
import time

import numpy as np
import pytest

from edgeft.runtime import ChatModel, PromptCache
from edgeft.runtime.batching import BatchDecoder, Sampling
from edgeft.runtime.server import create_app
from tests.helpers import LiveServer

ASKS = ["hi", "tell me a long story about the sea and the ships on it", "why?", "count from one to ten, slowly"]


@pytest.fixture
def exported(tiny_export) -> ChatModel:
    return ChatModel.load(tiny_export)


@pytest.fixture
def batch(exported):
    decoder = BatchDecoder.start(exported, rows=4)
    assert decoder is not None  # the builder's exports batch
    passes: list[int] = []  # rows per decoding pass
    decode = decoder._decode

    def counted(fed):  # and slowed to a real model's pace, so answers started together overlap
        passes.append(len(fed))
        time.sleep(0.002)
        return decode(fed)

    decoder._decode = counted
    decoder.passes = passes
    yield decoder
    decoder.close()


def _messages(ask: str) -> list[dict]:
    return [{"role": "user", "content": ask}]


def _together(model, cache, asks, **options) -> list:
    """Each ask streamed from its own thread, all at once, as a server's requests run."""
    results: list = [None] * len(asks)
    start = threading.Barrier(len(asks))

    def answer(i):
        stream = model.stream(_messages(asks[i]), cache=cache, **options)
        start.wait()
        stream.text()
        results[i] = stream.result

    threads = [threading.Thread(target=answer, args=(i,)) for i in range(len(asks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_answers_decoded_together_are_the_ones_each_gets_alone(exported, batch):
    """Four prompts of different lengths, greedy: the same text, finish reason and usage as alone,
    and the passes did run several rows at once."""
    alone = [exported.chat(_messages(a), max_tokens=24, temperature=0) for a in ASKS]
    together = _together(exported, PromptCache(batch=batch), ASKS, max_tokens=24, temperature=0)
    for one, many in zip(alone, together):
        assert (many.text, many.finish_reason, many.usage) == (one.text, one.finish_reason, one.usage)
    assert max(batch.passes) >= 2, batch.passes
    assert not any(r.busy for r in batch.rows)  # every answer gave its row back


def test_rows_join_and_leave_while_others_decode(exported, batch):
    """An answer starts while another is half written, and a short one ends while the long one goes on."""
    cache = PromptCache(batch=batch)
    long_ask, alone = ASKS[1], {}
    for ask in ASKS:
        alone[ask] = exported.chat(_messages(ask), max_tokens=40, temperature=0).text
    first = exported.stream(_messages(long_ask), cache=cache, max_tokens=40, temperature=0)
    pieces = iter(first)
    head = [next(pieces) for _ in range(5)]  # first holds a row, mid-answer
    later = _together(exported, cache, [ASKS[0], ASKS[2]], max_tokens=40, temperature=0)
    assert "".join(head + list(pieces)) == alone[long_ask]
    assert [r.text for r in later] == [alone[ASKS[0]], alone[ASKS[2]]]


def test_one_answer_runs_passes_over_its_own_row_alone(exported, batch, monkeypatch):
    """Answers one after another move between the rows (the least recently used keeps its tokens
    longest); an answer alone in a later row decodes in passes of that row only, not of every row
    before it (measured: four rows cost 1.6x one row's pass), and answers as alone."""
    cache, ranges = PromptCache(batch=batch), []
    run = batch._pass

    def spied(start, stop, ids, mask):
        ranges.append((start, stop))
        return run(start, stop, ids, mask)

    monkeypatch.setattr(batch, "_pass", spied)
    for ask in ASKS:
        answer = exported.stream(_messages(ask), cache=cache, max_tokens=8, temperature=0).text()
        assert answer == exported.chat(_messages(ask), max_tokens=8, temperature=0).text
    assert {stop - start for start, stop in ranges} == {1}, ranges
    assert max(start for start, _ in ranges) > 0, ranges  # some answer ran in a row after the first


def test_a_cancelled_answer_frees_its_row(exported, batch):
    cache = PromptCache(batch=batch)
    stream = exported.stream(_messages(ASKS[1]), cache=cache, max_tokens=200, temperature=0)
    for i, _ in enumerate(stream):
        if i == 3:
            stream.cancel()
    assert stream.result.finish_reason == "cancelled"
    assert not any(r.busy for r in batch.rows)
    again = exported.stream(_messages(ASKS[0]), cache=cache, max_tokens=12, temperature=0)
    assert again.text() == exported.chat(_messages(ASKS[0]), max_tokens=12, temperature=0).text


def test_a_row_keeps_its_tokens_for_a_prompt_that_begins_alike(exported, batch):
    """The next turn of a conversation runs only its new tokens, and is answered as onnxruntime-genai's
    own prompt cache answers it."""
    first = _messages("tell me about the sea")
    second = first + [
        {"role": "assistant", "content": "the sea is wide"},
        {"role": "user", "content": "and the ships?"},
    ]
    unbatched = PromptCache()
    for cache in (PromptCache(batch=batch), unbatched):
        for messages in (first, second):
            stream = exported.stream(messages, cache=cache, max_tokens=12, temperature=0)
            stream.text()
        if cache is not unbatched:
            batched = stream.result
    assert batched.cached_tokens >= exported.count_tokens(first) - 1
    assert batched.text == stream.result.text and batched.cached_tokens == stream.result.cached_tokens


def test_answers_the_batch_cannot_take_run_on_their_own(exported, batch):
    """A response_format, a seed, a repetition penalty, an answer longer than a row: no row is used,
    and each answer is the one it gets without the batch."""
    cases = [
        dict(response_format={"type": "json_object"}, max_tokens=16),
        dict(temperature=1.0, seed=3, max_tokens=16),
        dict(repetition_penalty=1.3, max_tokens=16, temperature=0),
    ]
    small = BatchDecoder.start(exported, rows=2, row_tokens=64)
    try:
        for decoder, options in [(batch, o) for o in cases] + [(small, dict(max_tokens=80, temperature=0))]:
            expected = exported.chat(_messages(ASKS[0]), **options).text
            stream = exported.stream(_messages(ASKS[0]), cache=PromptCache(batch=decoder), **options)
            assert stream.text() == expected, options
            assert all(r.last_used <= 1 for r in decoder.rows), options  # only the start-up check used a row
    finally:
        small.close()


def test_sampling_stays_inside_top_k_and_top_p():
    rng = np.random.default_rng(0)
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    assert {Sampling(1.0, 1.0, 2).pick(logits, rng) for _ in range(200)} == {0, 1}
    assert {Sampling(1.0, 0.7, 0).pick(logits, rng) for _ in range(200)} == {0, 1}  # 0.5 + 0.3 covers 0.7
    assert {Sampling(1.0, 1.0, 0).pick(logits, rng) for _ in range(400)} == {0, 1, 2, 3}
    assert Sampling(0.0).pick(logits, rng) == 0
    picks = [Sampling(1.0).pick(logits, rng) for _ in range(4000)]
    assert abs(picks.count(0) / 4000 - 0.5) < 0.04  # drawn from the distribution, not its top


def test_sampled_answers_decode_together(exported, batch):
    """Unseeded sampling batches too; each answer is whole and its logprobs are its tokens'."""
    results = _together(exported, PromptCache(batch=batch), ASKS, max_tokens=16, temperature=0.9, logprobs=True)
    for r in results:
        assert r.finish_reason in ("stop", "length") and len(r.logprobs) <= r.usage["completion_tokens"]
        assert all(e["logprob"] <= 0 for e in r.logprobs)
    assert max(batch.passes) >= 2


def test_an_export_batching_cannot_run_is_served_one_answer_at_a_time(tiny_llama_export, tmp_path, caplog):
    folder = shutil.copytree(tiny_llama_export, tmp_path / "export")
    config = json.loads((folder / "genai_config.json").read_text())
    config["search"]["past_present_share_buffer"] = False
    (folder / "genai_config.json").write_text(json.dumps(config))
    model = ChatModel.load(folder)
    with caplog.at_level("WARNING", logger="edgeft"):
        assert BatchDecoder.start(model, rows=2) is None
    assert "batched decoding is off" in caplog.text and "shared past/present buffer" in caplog.text
    app = create_app(model, parallel=2)  # the server starts all the same
    live = LiveServer(app)
    try:
        reply = live.client().chat.completions.create(model="m", messages=_messages("hi"), max_tokens=8, temperature=0)
        assert reply.choices[0].message.content == model.chat(_messages("hi"), max_tokens=8, temperature=0).text
    finally:
        live.stop()


def test_the_server_decodes_concurrent_streams_together(tiny_llama_export):
    """`serve --parallel 4`: four streaming openai clients at once get the answers each gets alone."""
    from concurrent.futures import ThreadPoolExecutor

    model = ChatModel.load(tiny_llama_export)
    app = create_app(model, parallel=4)
    live = LiveServer(app)
    try:
        client = live.client()

        def streamed(ask):
            chunks = client.chat.completions.create(
                model="m", messages=_messages(ask), max_tokens=20, temperature=0, stream=True
            )
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

        with ThreadPoolExecutor(4) as pool:
            texts = list(pool.map(streamed, ASKS))
        assert texts == [model.chat(_messages(a), max_tokens=20, temperature=0).text for a in ASKS]
    finally:
        live.stop()


def test_the_cache_grows_while_answers_run(exported, monkeypatch):
    """A row's room starts small and doubles when a longer answer opens; the answers running keep
    their tokens through the move."""
    from edgeft.runtime import batching

    monkeypatch.setattr(batching, "FIRST_CAPACITY", 16)
    decoder = BatchDecoder.start(exported, rows=2)
    try:
        cache = PromptCache(batch=decoder)
        short = exported.stream(_messages(ASKS[1]), cache=cache, max_tokens=30, temperature=0)
        pieces = iter(short)
        head = [next(pieces) for _ in range(4)]
        small = decoder._capacity
        longer = exported.stream(_messages(ASKS[3]), cache=cache, max_tokens=300, temperature=0)
        assert longer.text() == exported.chat(_messages(ASKS[3]), max_tokens=300, temperature=0).text
        assert decoder._capacity > small
        assert "".join(head + list(pieces)) == exported.chat(_messages(ASKS[1]), max_tokens=30, temperature=0).text
    finally:
        decoder.close()
