"""`edgeft serve` through the user's door: the official openai client and raw HTTP against a live server."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

from edgeft.runtime import ChatModel
from edgeft.runtime.server import create_app
from tests.helpers import LiveServer, SlowModel, wait_for

HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def model(tiny_llama_export) -> ChatModel:
    return ChatModel.load(tiny_llama_export)


@pytest.fixture(scope="module")
def server(model):
    live = LiveServer(create_app(model, parallel=2, max_queue=8, max_body=200_000))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return server.client()


# --- the happy path ------------------------------------------------------------------------


def test_chat_completion(client, model):
    expected = model.chat(HI, max_tokens=8, temperature=0)
    response = client.chat.completions.create(model=model.name, messages=HI, max_tokens=8, temperature=0)
    assert response.object == "chat.completion"
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == expected.text
    assert response.choices[0].finish_reason == "length"
    assert response.usage.prompt_tokens == expected.usage["prompt_tokens"]
    assert response.usage.completion_tokens == 8
    assert response.usage.total_tokens == expected.usage["prompt_tokens"] + 8


def test_streaming_chat_completion_with_usage(client, model):
    expected = model.chat(HI, max_tokens=20, temperature=1.0, seed=11)
    chunks = list(
        client.chat.completions.create(
            model=model.name,
            messages=HI,
            max_tokens=20,
            temperature=1.0,
            seed=11,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20


def test_stream_ends_with_done_and_usage_on_the_last_choice_chunk(server):
    with httpx.stream(
        "POST", f"{server.url}/v1/chat/completions", timeout=30, json={"messages": HI, "max_tokens": 5, "stream": True}
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2].removeprefix("data: "))
    assert last["choices"][0]["finish_reason"] == "length" and last["usage"]["completion_tokens"] == 5


def test_stop_strings_and_content_parts(client, model):
    full = model.chat(HI, max_tokens=30, temperature=1.5, top_k=0, seed=3).text
    stop = full[6:9]
    messages = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    response = client.chat.completions.create(
        model="any", messages=messages, max_tokens=30, temperature=1.5, seed=3, stop=[stop], extra_body={"top_k": 0}
    )
    assert response.choices[0].message.content == full[: full.find(stop)]
    assert response.choices[0].finish_reason == "stop"


def test_models_and_health(client, server, model):
    models = client.models.list().data
    assert [m.id for m in models] == [model.name]
    assert client.models.retrieve(model.name).id == model.name
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-5")
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["model"] == model.name


def test_web_page_is_self_contained(server):
    r = httpx.get(f"{server.url}/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    # nothing loaded from elsewhere: no external scripts, styles, fonts or images
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", r.text)
    assert "@import" not in r.text and "url(http" not in r.text
    assert "/v1/chat/completions" in r.text


# --- concurrency --------------------------------------------------------------------------


def test_simultaneous_streams_do_not_mix(server, model):
    seeds = [1, 2, 3, 4, 5, 6]
    expected = {s: model.chat(HI, max_tokens=40, temperature=1.0, seed=s).text for s in seeds}
    client = server.client()

    def ask(seed):
        stream = client.chat.completions.create(
            model="m", messages=HI, max_tokens=40, temperature=1.0, seed=seed, stream=True
        )
        return seed, "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    with concurrent.futures.ThreadPoolExecutor(len(seeds)) as pool:
        answers = dict(pool.map(ask, seeds))
    assert answers == expected
    assert len(set(answers.values())) == len(seeds)


def test_full_queue_answers_503_with_retry_after(model):
    slow = SlowModel(model)
    live = LiveServer(create_app(slow, parallel=1, max_queue=1))
    try:
        body = {"messages": HI, "max_tokens": 2000, "temperature": 0, "stream": True}  # greedy: never ends early
        with httpx.stream("POST", f"{live.url}/v1/chat/completions", json=body, timeout=30) as running:
            running_lines = running.iter_lines()  # (keep it: a dropped iterator closes the connection)
            next(running_lines)  # the first is generating
            with httpx.stream("POST", f"{live.url}/v1/chat/completions", json=body, timeout=30) as waiting:
                assert waiting.status_code == 200  # admitted: it waits for the slot
                busy = live.post({"messages": HI, "max_tokens": 5})
                assert busy.status_code == 503
                assert int(busy.headers["Retry-After"]) >= 1
                assert busy.json()["error"]["code"] == "server_busy"
                health = httpx.get(f"{live.url}/health").json()
                assert (health["running"], health["waiting"]) == (1, 1)
        # both clients left: their generations stop and the server takes work again
        wait_for(lambda: httpx.get(f"{live.url}/health").json()["running"] == 0)
        assert live.post({"messages": HI, "max_tokens": 5}).status_code == 200
    finally:
        live.stop()


def test_client_disconnect_mid_stream_stops_generation(model):
    slow = SlowModel(model)
    live = LiveServer(create_app(slow))
    try:
        body = {"messages": HI, "max_tokens": 2000, "temperature": 0, "stream": True}  # greedy: never ends early
        with httpx.stream("POST", f"{live.url}/v1/chat/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            for _ in range(5):
                next(lines)
        # the connection is closed here, after a handful of tokens
        wait_for(lambda: slow.streams[0].result is not None)
        result = slow.streams[0].result
        assert result.finish_reason == "cancelled"
        assert result.usage["completion_tokens"] < 200
    finally:
        live.stop()


def test_client_disconnect_during_non_streaming_request_stops_generation(model):
    slow = SlowModel(model)
    live = LiveServer(create_app(slow))
    try:
        with pytest.raises(httpx.ReadTimeout):
            live.post({"messages": HI, "max_tokens": 2000, "temperature": 0}, timeout=0.5)
        wait_for(lambda: slow.streams[0].result is not None)
        assert slow.streams[0].result.finish_reason == "cancelled"
    finally:
        live.stop()


# --- bad input ----------------------------------------------------------------------------

BAD_REQUESTS = [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    ({"messages": "hi"}, "messages must be a non-empty array"),
    ({"messages": []}, "messages must be a non-empty array"),
    ({}, "messages must be a non-empty array"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "role must be one of system, user, assistant"),
    (
        {"messages": [{"role": "tool", "content": "x"}]},
        "messages[0] (a tool result) has no assistant tool call before it to answer",
    ),
    ({"messages": [{"role": "user", "content": ""}]}, "content is empty"),
    ({"messages": [{"role": "user", "content": 42}]}, "content must be a string"),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        "only text parts",
    ),
    ({"messages": HI, "max_tokens": -1}, "max_tokens must be at least 1"),
    ({"messages": HI, "max_tokens": "ten"}, "max_tokens must be an integer"),
    ({"messages": HI, "max_tokens": 10**9}, "does not fit"),
    ({"messages": HI, "temperature": 2.5}, "temperature must be 0 to 2"),
    ({"messages": HI, "temperature": "warm"}, "temperature must be a number"),
    ({"messages": HI, "top_p": 0}, "top_p must be greater than 0"),
    ({"messages": HI, "n": 17}, "n must be an integer from 1 to 16"),
    ({"messages": HI, "n": 0}, "n must be an integer from 1 to 16"),
    ({"messages": HI, "stream": "yes"}, "stream must be true or false"),
    ({"messages": HI, "presence_penalty": 1.0}, "presence_penalty is not supported"),
    ({"messages": HI, "model": 5}, "model must be a string"),
    ({"messages": HI, "temprature": 0.5}, "unrecognized request argument: temprature"),
    ({"messages": HI, "stop": ["a", "b", "c", "d", "e"]}, "at most 4"),
    ({"messages": HI, "top_k": 2**31}, "top_k must be 0 to"),
    ({"messages": HI, "top_k": 10**20}, "top_k must be 0 to"),
    (b"[" * 100_000, "nested too deeply"),
    (b'{"messages": [], "max_tokens": ' + b"9" * 5000 + b"}", "not valid JSON"),
    (b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}', "lone UTF-16 surrogate"),
    (b'{"\\udc00": 1}', "lone UTF-16 surrogate"),
]


@pytest.mark.parametrize("body, message", BAD_REQUESTS, ids=[m for _, m in BAD_REQUESTS])
def test_bad_requests_get_400_in_openai_shape(server, body, message):
    r = server.post(body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert message in error["message"]
    assert error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code"}


def test_headers_that_never_end_are_cut_off_first_request_or_next(model, monkeypatch):
    """slowloris: a connection must finish each request's headers in time, also on keep-alive;
    a long answer is not cut off (the deadline covers the headers only)."""
    from edgeft.runtime import connections

    monkeypatch.setattr(connections, "HEADER_TIMEOUT_S", 1.0)
    slow = SlowModel(model, delay=0.1)
    live = LiveServer(create_app(slow), **connections.server_options(parallel=1, max_queue=2))
    host, port = live.url.removeprefix("http://").split(":")

    def closed_after(first: bytes, then: bytes) -> float:
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(first)
            if first:  # a whole request: read its answer, then start the next one and stall
                assert s.recv(65536).startswith(b"HTTP/1.1 200")
            start = time.monotonic()
            s.sendall(then)
            while s.recv(4096):
                pass
            return time.monotonic() - start

    try:
        stalled = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: applic"
        assert closed_after(b"", stalled) < 5
        assert closed_after(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", stalled) < 5
        started = time.monotonic()  # ~2.5 s of trickling answer, longer than the header deadline
        answer = live.post({"messages": HI, "max_tokens": 25, "stream": True})
        assert answer.status_code == 200 and "[DONE]" in answer.text and time.monotonic() - started > 1.5
    finally:
        live.stop()


def test_a_body_that_trickles_in_is_cut_off(model):
    live = LiveServer(create_app(model, body_timeout=1.0))
    try:
        host, port = live.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b'Content-Length: 100\r\n\r\n{"messages"'
            )
            reply = b""
            while b"request_timeout" not in reply and (chunk := s.recv(4096)):
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 408") and b"request_timeout" in reply
        assert live.post({"messages": HI, "max_tokens": 2}).status_code == 200  # and it serves the next one
    finally:
        live.stop()


def test_a_top_k_beyond_the_vocabulary_means_no_limit(client, model):
    """top_k above the vocabulary (onnxruntime-genai crashed on it) samples as top_k 0, "no limit",
    does: the same seed writes the same answer; the default top_k (50) and top_k 2 write others."""
    vocab = model.genai_config["model"]["vocab_size"]

    def sampled(seed: int, top_k: int | None) -> str:
        extra = {} if top_k is None else {"extra_body": {"top_k": top_k}}
        reply = client.chat.completions.create(
            model="edgeft", messages=HI, max_tokens=8, temperature=1.0, seed=seed, **extra
        )
        return reply.choices[0].message.content

    for seed in (0, 1):
        beyond = sampled(seed, 10**6)
        assert beyond == sampled(seed, 0) == sampled(seed, vocab), seed
        assert beyond != sampled(seed, None) and beyond != sampled(seed, 2), seed


def test_a_loopback_server_without_key_answers_only_this_machine(model):
    live = LiveServer(create_app(model, local_only=True))
    try:
        ok = {"messages": HI, "max_tokens": 2}
        assert live.post(ok).status_code == 200
        for host in ("evil.example", "evil.example:80", "192.168.1.5:8000"):  # DNS rebinding: the name is not ours
            r = live.post(ok, headers={"Host": host})
            assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden_host", host
        assert httpx.get(f"{live.url}/health", headers={"Host": "localhost:8000"}).status_code == 200
        form = httpx.post(
            f"{live.url}/v1/chat/completions", content=json.dumps(ok), headers={"Content-Type": "text/plain"}
        )
        assert form.status_code == 415 and "application/json" in form.json()["error"]["message"]
        r = live.post(ok, headers={"Origin": "https://evil.example"})  # a page on another site
        assert r.status_code == 403 and "--cors-origins https://evil.example" in r.json()["error"]["message"]
        assert live.post(ok, headers={"Origin": live.url}).status_code == 200  # the server's own web page
    finally:
        live.stop()


def test_named_origins_may_call_the_api(model):
    live = LiveServer(create_app(model, local_only=True, cors_origins=["http://localhost:3000"]))
    try:
        preflight = httpx.options(
            f"{live.url}/v1/chat/completions",
            headers={
                "Origin": "http://localhost:3000",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "http://localhost:3000"
        r = live.post({"messages": HI, "max_tokens": 2}, headers={"Origin": "http://localhost:3000"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:3000"
        assert (
            live.post({"messages": HI, "max_tokens": 2}, headers={"Origin": "http://localhost:3001"}).status_code == 403
        )
    finally:
        live.stop()


@pytest.mark.parametrize("stream", [False, True])
def test_prompt_over_the_context_is_400_context_length_exceeded(client, stream):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hello " * 3000}], stream=stream
        )
    assert e.value.code == "context_length_exceeded"
    assert "context of 2048 tokens" in e.value.message


def test_openai_client_sees_bad_options_as_bad_request(client):
    with pytest.raises(openai.BadRequestError, match="temperature must be 0 to 2"):
        client.chat.completions.create(model="m", messages=HI, temperature=3)


# --- structured output ----------------------------------------------------------------------

SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string", "maxLength": 6}, "ok": {"type": "boolean"}},
    "required": ["answer", "ok"],
    "additionalProperties": False,
}


def _answer(client, stream: bool, **kwargs) -> str:
    """The answer's text, streamed or not (a random tiny model: only the constraint makes it valid)."""
    reply = client.chat.completions.create(model="m", messages=HI, max_tokens=80, stream=stream, **kwargs)
    if not stream:
        return reply.choices[0].message.content
    return "".join(c.choices[0].delta.content or "" for c in reply if c.choices)


@pytest.mark.parametrize("stream", [False, True])
def test_a_json_schema_response_format_gives_schema_valid_json(client, stream):
    fmt = {"type": "json_schema", "json_schema": {"name": "reply", "schema": SCHEMA, "strict": True}}
    data = json.loads(_answer(client, stream, response_format=fmt))
    assert set(data) == {"answer", "ok"} and isinstance(data["ok"], bool)
    assert isinstance(data["answer"], str) and len(data["answer"]) <= 6
    free = _answer(client, stream, temperature=0)  # and without one, the same model writes no JSON at all
    with pytest.raises(ValueError):
        json.loads(free)


def test_requests_reuse_the_cached_prompt_that_shares_the_most(model):
    """A request runs only what its prompt does not share with a cached one (OpenAI's
    usage.prompt_tokens_details.cached_tokens says how much) and answers exactly as a fresh
    generator would: two conversations in turn each keep their own, a response_format its own (its
    grammar), a sampled request without a seed reuses too; a seeded one gets a fresh generator."""
    live = LiveServer(create_app(model, parallel=1))
    try:
        client = live.client()
        systems = [{"role": "system", "content": f"You answer in one word, {who}. " * 6} for who in ("Ann", "Bob")]
        fmt = {"type": "json_schema", "json_schema": {"name": "reply", "schema": SCHEMA}}
        asks = [  # (messages, options, reuses a cached prompt: same model, response_format and settings)
            ([systems[0], {"role": "user", "content": "hi"}], {}, False),
            ([systems[1], {"role": "user", "content": "hi"}], {}, False),  # another conversation
            ([systems[0], {"role": "user", "content": "and now?"}], {}, True),  # the first one's slot
            ([systems[1], {"role": "user", "content": "and now?"}], {}, True),  # the second one's, kept
            ([systems[0], {"role": "user", "content": "json"}], {"response_format": fmt}, False),
            ([systems[0], {"role": "user", "content": "json again"}], {"response_format": fmt}, True),  # grammar kept
            ([systems[0], {"role": "user", "content": "hi"}], {}, True),  # back to free text: its slot is there
        ]
        system_tokens = model.count_tokens([systems[0]])
        for n, (messages, extra, reuses) in enumerate(asks):
            reply = client.chat.completions.create(model="m", messages=messages, max_tokens=12, temperature=0, **extra)
            fresh = model.chat(messages, max_tokens=12, temperature=0, **extra)
            assert reply.choices[0].message.content == fresh.text, n
            cached = reply.usage.prompt_tokens_details.cached_tokens
            assert cached >= system_tokens - 2 if reuses else cached < system_tokens / 2, (n, cached)
        chunks = client.chat.completions.create(  # the last prompt again: all of it is held but its last token
            model="m",
            messages=asks[6][0],
            max_tokens=5,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        usage = list(chunks)[-1].usage
        assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1
        sampled = [
            client.chat.completions.create(model="m", messages=asks[2][0], max_tokens=12, temperature=1.0)
            for _ in range(2)
        ]
        assert sampled[1].usage.prompt_tokens_details.cached_tokens >= system_tokens - 2  # no seed: reused
        seeded = client.chat.completions.create(model="m", messages=asks[2][0], max_tokens=12, temperature=1.0, seed=5)
        assert seeded.usage.prompt_tokens_details.cached_tokens == 0
        assert seeded.choices[0].message.content == model.chat(asks[2][0], max_tokens=12, temperature=1.0, seed=5).text
    finally:
        live.stop()


def test_answers_running_side_by_side_never_share_a_cached_generator(model):
    """parallel=2, the same system prompt sent by many clients at once: every answer is the one a
    fresh generator gives, and the later ones still reuse the prompt."""
    from concurrent.futures import ThreadPoolExecutor

    live = LiveServer(create_app(model, parallel=2, max_queue=16))
    try:
        client = live.client()
        system = {"role": "system", "content": "You answer in one word. " * 6}
        asks = [[system, {"role": "user", "content": f"question {i}"}] for i in range(8)]
        with ThreadPoolExecutor(4) as pool:
            replies = list(
                pool.map(
                    lambda m: client.chat.completions.create(model="m", messages=m, max_tokens=10, temperature=0), asks
                )
            )
        for messages, reply in zip(asks, replies):
            assert reply.choices[0].message.content == model.chat(messages, max_tokens=10, temperature=0).text
        cached = [r.usage.prompt_tokens_details.cached_tokens for r in replies]
        assert sum(c >= model.count_tokens([system]) - 2 for c in cached) >= len(asks) - 2, cached
    finally:
        live.stop()


@pytest.mark.parametrize(
    "fmt, check",
    [
        ({"type": "json_object"}, lambda text: isinstance(json.loads(text), dict)),
        ({"type": "regex", "regex": "(yes|no), [0-9]{3}"}, lambda text: re.fullmatch(r"(yes|no), [0-9]{3}", text)),
        ({"type": "lark_grammar", "grammar": 'start: "red" | "green"'}, lambda text: text in ("red", "green")),
    ],
    ids=["json_object", "regex", "lark_grammar"],
)
def test_the_other_response_formats(client, fmt, check):
    text = _answer(client, False, response_format=fmt)
    assert check(text), text


def test_a_text_response_format_is_free_text(client):
    """{"type": "text"} constrains nothing: the same seeded answer as with no response_format, streamed
    or not, where a constraining format (json_object) changes that answer."""
    sample = dict(temperature=1.0, seed=7)
    free = _answer(client, False, **sample)
    assert _answer(client, False, response_format={"type": "text"}, **sample) == free
    assert _answer(client, True, response_format={"type": "text"}, **sample) == free
    assert _answer(client, False, response_format={"type": "json_object"}, **sample) != free


@pytest.mark.parametrize(
    "body, message",
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}},
            "Invalid type: nope",
        ),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "needs {'json_schema'"),
        ({"response_format": {"type": "xml"}}, "type 'xml' is not supported"),
        ({"response_format": {"type": "regex", "regex": "(["}}, "regex cannot be used"),
        ({"response_format": {"type": "lark_grammar", "grammar": "start: ???"}}, "lark grammar cannot be used"),
        ({"response_format": "json"}, "must be an object with a type"),
        ({"top_logprobs": 3}, "top_logprobs needs logprobs set to true"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs must be 0 to 20"),
        ({"logit_bias": {"50": -100}}, "logit_bias is not supported"),
    ],
)
def test_what_cannot_be_honoured_is_a_400_before_generation(server, body, message):
    r = server.post({"messages": HI, "max_tokens": 4, **body})
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
    assert r.json()["error"]["param"] in set(body)
    assert server.post({"messages": HI, "max_tokens": 2, "logprobs": False, "logit_bias": {}}).status_code == 200


def test_oversize_body_is_413(server):
    big = {"messages": [{"role": "user", "content": "x" * 300_000}]}
    r = server.post(big)
    assert r.status_code == 413
    assert "at most 200000" in r.json()["error"]["message"]


def test_oversize_body_without_content_length_is_413(server):
    def chunks():
        for _ in range(30):
            yield b"x" * 10_000

    r = httpx.post(f"{server.url}/v1/chat/completions", content=chunks(), timeout=30)
    assert r.status_code == 413


def test_unknown_route_and_method_in_openai_shape(server):
    r = httpx.get(f"{server.url}/v1/completions")
    assert r.status_code in (404, 405) and "error" in r.json()
    r = httpx.delete(f"{server.url}/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["message"]


def test_server_keeps_serving_after_a_burst_of_bad_requests(server, client):
    for body, _ in BAD_REQUESTS * 3:
        assert server.post(body).status_code == 400
    assert server.post({"messages": [{"role": "user", "content": "x" * 300_000}]}).status_code == 413
    response = client.chat.completions.create(model="m", messages=HI, max_tokens=3)
    assert response.usage.completion_tokens == 3


def test_robustness_under_mixed_abuse(model):
    """In the spirit of vLLM's and llama.cpp's server tests, bounded in count and time, loopback only:
    concurrent streams, a burst of clients that time out and leave, malformed, oversized and slow
    bodies, all at once; afterwards a fresh request completes quickly and no slot is stuck."""
    live = LiveServer(
        create_app(SlowModel(model, delay=0.01), parallel=2, max_queue=8, max_body=50_000, body_timeout=1.0)
    )
    url = f"{live.url}/v1/chat/completions"
    stream_body = {"messages": HI, "max_tokens": 30, "temperature": 0, "stream": True}

    def stream_one(_):
        with httpx.stream("POST", url, json=stream_body, timeout=60) as r:
            return r.status_code, sum(1 for line in r.iter_lines() if line.startswith("data: "))

    def leave_early(_):
        with contextlib.suppress(httpx.TimeoutException):
            httpx.post(url, json={"messages": HI, "max_tokens": 500, "temperature": 0}, timeout=0.05)

    def malformed(i):
        bodies = [b"{", b"[]", b"\x00\xff", b'{"messages": ' + b"[" * 5000 + b"]" * 5000 + b"}", b"x" * 60_000]
        return live.post(bodies[i % len(bodies)]).status_code

    def slow_body(_):
        host, port = live.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{")
            return s.recv(64)

    try:
        with concurrent.futures.ThreadPoolExecutor(24) as pool:
            streams = [pool.submit(stream_one, i) for i in range(6)]
            gone = [pool.submit(leave_early, i) for i in range(10)]
            bad = [pool.submit(malformed, i) for i in range(10)]
            slow = [pool.submit(slow_body, i) for i in range(3)]
            results = [f.result(timeout=120) for f in streams]
            for f in gone:
                f.result(timeout=60)
            assert {f.result(timeout=60) for f in bad} <= {400, 413}
            assert all(f.result(timeout=60).startswith(b"HTTP/1.1 408") for f in slow)
        # A stream is turned away only when the queue is full (503); the others run to the end.
        assert all(code == 200 and events > 1 or code == 503 for code, events in results)
        assert sum(code == 200 for code, _ in results) >= 2
        wait_for(lambda: httpx.get(f"{live.url}/health").json()["running"] == 0, timeout=30)
        health = httpx.get(f"{live.url}/health").json()
        assert (health["running"], health["waiting"]) == (0, 0)  # no stuck slot
        start = time.monotonic()
        assert live.post({"messages": HI, "max_tokens": 3}).status_code == 200
        assert time.monotonic() - start < 5
    finally:
        live.stop()


# --- API key ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def secured(model):
    live = LiveServer(create_app(model, api_key="s3cret"))
    yield live
    live.stop()


def test_api_key_is_required(secured):
    with pytest.raises(openai.AuthenticationError) as e:
        secured.client(api_key="wrong").chat.completions.create(model="m", messages=HI, max_tokens=2)
    assert e.value.code == "invalid_api_key"
    r = secured.post({"messages": HI, "max_tokens": 2})
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    assert r.headers["WWW-Authenticate"] == "Bearer"
    with pytest.raises(openai.AuthenticationError):
        secured.client(api_key="wrong").models.list()


def test_right_api_key_works_and_health_and_page_stay_open(secured):
    response = secured.client(api_key="s3cret").chat.completions.create(model="m", messages=HI, max_tokens=2)
    assert response.usage.completion_tokens == 2
    assert httpx.get(f"{secured.url}/health").status_code == 200
    assert httpx.get(f"{secured.url}/").status_code == 200


def test_key_is_checked_before_the_body_is_read(secured):
    r = secured.post(b"{broken", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401


# --- the command --------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_edgeft_serve_command(tiny_phi3_export, tmp_path):
    port = _free_port()
    env = {**os.environ, "EDGEFT_API_KEY": "from-env"}
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - the server writes to it until the test stops it
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeft", "serve", str(tiny_phi3_export), "--port", str(port), "--threads", "1"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        wait_for(lambda: _health(port), timeout=60)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="from-env", max_retries=0)
        assert client.chat.completions.create(model="m", messages=HI, max_tokens=3).usage.completion_tokens <= 3
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0).models.list()
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()
    assert f"Serving phi3-onnx-fp32 on http://127.0.0.1:{port}" in (tmp_path / "serve.log").read_text()


def _health(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_edgeft_serve_on_a_folder_that_is_not_an_export(tmp_path):
    from tests.helpers import run_cli

    result = run_cli("serve", tmp_path, "--port", str(_free_port()), ok=False)
    assert result.exit_code == 1
    assert "is not an edgeft/onnxruntime-genai export: genai_config.json is missing" in result.output


def test_edgeft_serve_rejects_bad_flags(tiny_llama_export):
    from tests.helpers import run_cli

    result = run_cli("serve", tiny_llama_export, "--parallel", "0", ok=False)
    assert result.exit_code == 1 and "--parallel must be at least 1" in result.output


# --- logprobs, n, seed -----------------------------------------------------------------------


def test_logprobs_through_the_openai_client(client, model):
    r = client.chat.completions.create(
        model=model.name, messages=HI, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    entries = r.choices[0].logprobs.content
    assert len(entries) == r.usage.completion_tokens == 6
    assert "".join(e.token for e in entries) == r.choices[0].message.content
    for e in entries:  # greedy: the chosen token is the most likely one, and the alternatives come in order
        tops = [t.logprob for t in e.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and e.logprob == pytest.approx(tops[0])
        assert e.logprob <= 0 and e.top_logprobs[0].token == e.token
    # streamed: the same entries, each with the piece it made
    chunks = list(
        client.chat.completions.create(
            model=model.name, messages=HI, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3, stream=True
        )
    )
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in entries]
    # to float rounding: the second request may reuse the first one's prompt from the server's cache
    # (a CI run saw -5.429707 against -5.429706)
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in entries], abs=1e-5)
    plain = client.chat.completions.create(model=model.name, messages=HI, max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None


def test_n_answers_with_a_seed_are_repeatable(client, model):
    ask = dict(model=model.name, messages=HI, max_tokens=8, temperature=1.0, seed=5, n=3)
    first, again = client.chat.completions.create(**ask), client.chat.completions.create(**ask)
    answers = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2] and answers == [c.message.content for c in again.choices]
    assert len(set(answers)) > 1  # sampled with seeds 5, 6, 7: not three copies
    assert answers[0] == model.chat(HI, max_tokens=8, temperature=1.0, seed=5).text
    assert first.usage.completion_tokens == 24 and first.usage.prompt_tokens == model.count_tokens(HI)
    chunks = list(client.chat.completions.create(**ask, stream=True))
    streamed = {i: "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i) for i in range(3)}  # fmt: skip
    assert list(streamed.values()) == answers
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"] * 3


def test_completions_through_the_openai_client(client, model):
    """/v1/completions: the prompt continued as it is (no chat template), with OpenAI's fields."""
    r = client.completions.create(model=model.name, prompt="The capital of France is", max_tokens=5, temperature=0)
    direct = model.complete_stream("The capital of France is", max_tokens=5, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text == direct.text()
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    assert r.usage.prompt_tokens == direct.prompt_tokens < model.count_tokens([{"role": "user", "content": "x"}]) + 6
    two = client.completions.create(
        model=model.name, prompt=["a b c", "1 2 3"], n=2, max_tokens=4, temperature=1.0, seed=3, logprobs=2
    )
    assert [c.index for c in two.choices] == [0, 1, 2, 3] and two.usage.completion_tokens == 16
    for c in two.choices:  # a token of part of a character shows as U+FFFD alone (its bytes are in chat's logprobs)
        assert len(c.logprobs.tokens) == len(c.logprobs.token_logprobs) == 4
        # (two tokens that both show as U+FFFD share one key of the dict)
        assert all(1 <= len(top) <= 2 for top in c.logprobs.top_logprobs) and max(c.logprobs.token_logprobs) <= 0
        offsets = c.logprobs.text_offset
        assert offsets[0] == 0 and offsets == sorted(offsets)
    streamed = list(client.completions.create(model=model.name, prompt="a b c", max_tokens=4, temperature=1.0, seed=3, stream=True))  # fmt: skip
    assert "".join(c.choices[0].text for c in streamed if c.choices) == two.choices[0].text
    for bad, param in (({"echo": True}, "echo"), ({"best_of": 3}, "best_of"), ({"logprobs": 9}, "logprobs")):
        with pytest.raises(openai.BadRequestError, match=param):
            client.completions.create(model=model.name, prompt="x", max_tokens=2, **bad)


def test_an_unexpected_error_tells_the_client_nothing_of_its_details(model, monkeypatch, caplog):
    app = create_app(model, parallel=1, max_queue=2)
    live = LiveServer(app)
    try:
        monkeypatch.setattr(
            ChatModel, "stream", lambda *a, **k: (_ for _ in ()).throw(ValueError("/home/alice/secret.txt"))
        )
        r = live.post({"messages": HI, "max_tokens": 2})
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert "secret" not in r.text and "ValueError" not in r.text
        incident = re.search(r"internal error (\w+):", r.json()["error"]["message"]).group(1)
        assert any(incident in rec.getMessage() and rec.exc_info for rec in caplog.records)  # the log has it all
    finally:
        live.stop()


def test_the_web_page_is_served_with_security_headers(server):
    r = httpx.get(server.url + "/")
    policy = r.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in policy and "connect-src 'self'" in policy and "default-src 'none'" in policy
    assert r.headers["x-frame-options"] == "DENY" and r.headers["x-content-type-options"] == "nosniff"
