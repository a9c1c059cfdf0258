"""`edgeft serve`: an OpenAI-compatible chat API and a web chat page, on FastAPI + uvicorn.

    POST /v1/chat/completions   non-streaming, or `"stream": true` as server-sent events
    POST /v1/completions        a text prompt continued as it is (no chat template), same options
    GET  /v1/models             the model served, and each runtime adapter on it
    GET  /health                liveness and load (no API key needed)
    GET  /                      the web chat page

Generation runs in worker threads (onnxruntime-genai releases the GIL while it computes), at most
`parallel` at a time; up to `max_queue` more requests wait for a slot, and beyond that the server
answers 503 with Retry-After instead of piling up work it cannot finish. A streaming client that
disconnects cancels its generation after the current token. Every error is OpenAI's error JSON.

Needs edgeft[serve] (fastapi, uvicorn); nothing else in edgeft.runtime imports them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Any

from edgeft.errors import ConfigError, EdgeftError, GenerationError, ModelError
from edgeft.runtime.batching import BatchDecoder
from edgeft.runtime.engine import ChatModel, ChatResult, ContextLengthError, PromptCache

try:
    from fastapi import APIRouter, Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
except ImportError as e:  # pragma: no cover - depends on the install
    raise EdgeftError("edgeft serve needs the server extra: pip install 'edgeft[serve]'.") from e

log = logging.getLogger("edgeft")

API_KEY_ENV = "EDGEFT_API_KEY"
# The web page is one self-contained file: it loads nothing from elsewhere, talks only to this server,
# and is never framed by another site (clickjacking) nor sniffed as another type.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
DEFAULT_MAX_BODY = 1_000_000  # bytes; a long conversation is a few hundred KB at most
RETRY_AFTER_S = 2
PROMPT_CACHE_BYTES = 1 << 30  # KV caches kept for prompts that begin alike (`serve --prompt-cache-mb`)
PROMPT_CACHE_SPARE_SLOTS = 3  # cached prompts beyond the answers running: a few conversations at once
BODY_TIMEOUT_S = 30.0  # a request body must arrive within this; a trickling client is cut off with 408

# OpenAI fields we accept and ignore when they ask for nothing we would do differently.
IGNORED_FIELDS = {
    "user",
    "store",
    "metadata",
    "service_tier",
    "frequency_penalty",
    "presence_penalty",
    "reasoning_effort",
    "modalities",
}
OPTION_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "stop",
    "seed",
    "response_format",
    "logprobs",
    "top_logprobs",
)
MAX_N = 16  # answers one request may ask for (n); each is generated in turn, in the request's one slot
TOOL_FIELDS = ("tools", "tool_choice", "parallel_tool_calls", "functions", "function_call")
# Fields that ask for something this server does not do: refused unless they ask for nothing.
UNSUPPORTED_FIELDS = {
    "logit_bias": "logit_bias is not supported; constrain the answer with response_format instead",
}


class ApiError(Exception):
    """An HTTP error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# --- admission and worker threads ---------------------------------------------------------


class Ticket:
    """One admitted request; released exactly once, whichever way the request ends."""

    def __init__(self, scheduler: Scheduler):
        self._scheduler, self._released = scheduler, False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._scheduler.admitted -= 1


class Scheduler:
    """At most `parallel` generations at once and `max_queue` waiting; the rest are turned away.

    All counting happens on the event loop thread, so it needs no lock. A slot is given back only
    when its worker thread has really finished, so a cancelled generation that is still computing
    its last token never overlaps with the next one.
    """

    def __init__(self, parallel: int, max_queue: int):
        self.parallel, self.max_queue = parallel, max_queue
        self.admitted = 0  # running + waiting
        self.running = 0
        self._slots: asyncio.Semaphore | None = None
        self._executor = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="edgeft-generate")

    def admit(self) -> Ticket | None:
        if self.admitted >= self.parallel + self.max_queue:
            return None
        self.admitted += 1
        return Ticket(self)

    async def run(self, stream: Any, ticket: Ticket) -> AsyncIterator[tuple[str, Any]]:
        """Run a ChatStream in a worker thread; yield ("piece", text) ... then ("done", ChatResult)."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.parallel)
        slots, loop, events = self._slots, asyncio.get_running_loop(), asyncio.Queue()
        await slots.acquire()  # waiting here is "in the queue"; a client that leaves is simply cancelled
        self.running += 1

        def finished(_: Any) -> None:
            self.running -= 1
            slots.release()
            ticket.release()

        future = loop.run_in_executor(self._executor, _pump, stream, loop, events)
        future.add_done_callback(finished)
        try:
            while True:
                kind, value = await events.get()
                if kind == "error":
                    raise value
                yield kind, value
                if kind == "done":
                    return
        finally:
            stream.cancel()  # a no-op when it finished; otherwise the worker stops after this token

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _pump(stream: Any, loop: asyncio.AbstractEventLoop, events: asyncio.Queue) -> None:
    """Worker thread: generate, handing each piece to the event loop."""

    def put(item: tuple[str, Any]) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, item)
        except RuntimeError:  # the loop is closed: the server is shutting down
            stream.cancel()

    take_logprobs = getattr(stream, "take_logprobs", list)
    try:
        for piece in stream:
            if entries := take_logprobs():  # the tokens that made this piece, sent with it
                put(("logprobs", entries))
            put(("piece", piece))
        if entries := take_logprobs():
            put(("logprobs", entries))
        put(("done", stream.result))
    except Exception as e:  # reported to the client by the request that owns the stream
        put(("error", e))


# --- request parsing ----------------------------------------------------------------------


async def read_json(request: Request, max_body: int, timeout: float = 30.0) -> dict:
    """The request body as a JSON object, refusing bodies over `max_body` bytes before reading them,
    and bodies that trickle in slower than `timeout` seconds in all (a slow client holds a connection)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_body:
        raise ApiError(
            413,
            f"the request body is {declared} bytes; this server accepts at most {max_body}.",
            code="request_too_large",
        )
    body, chunks = bytearray(), request.stream().__aiter__()
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            left = max(0.01, deadline - asyncio.get_running_loop().time())
            chunk = await asyncio.wait_for(chunks.__anext__(), timeout=left)
        except StopAsyncIteration:
            break
        except TimeoutError:
            raise ApiError(
                408, f"the request body did not arrive within {timeout:g} s.", code="request_timeout"
            ) from None
        body += chunk
        if len(body) > max_body:
            raise ApiError(
                413,
                f"the request body is over {max_body} bytes, the most this server accepts.",
                code="request_too_large",
            )
    try:
        data = json.loads(body)
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply to be a chat request.") from None
    except (ValueError, UnicodeDecodeError) as e:  # ValueError: also a number of thousands of digits
        raise ApiError(400, f"the request body is not valid JSON ({e}).") from None
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:  # "\ud800" parses as JSON, but no tokenizer or reply can carry it
        raise ApiError(
            400, "the request body holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text."
        ) from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(data).__name__}.")
    return data


def parse_chat_request(body: dict) -> tuple[list[dict], dict[str, Any], bool, bool]:
    """OpenAI chat request -> (messages, generation options, stream, include_usage); `n` is read by
    `choices_of`."""
    known = {
        "model",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "stream",
        "stream_options",
        "n",
        *OPTION_FIELDS,
        *TOOL_FIELDS,
        *IGNORED_FIELDS,
        *UNSUPPORTED_FIELDS,
    }
    unknown = sorted(set(body) - known)
    if unknown:
        raise ApiError(400, f"unrecognized request argument: {unknown[0]}.", param=unknown[0])
    if "model" in body and not isinstance(body["model"], str):
        raise ApiError(400, "model must be a string.", param="model")
    n = body.get("n", 1) if body.get("n") is not None else 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
        raise ApiError(400, f"n must be an integer from 1 to {MAX_N}, got {n!r}.", param="n")
    for name in ("frequency_penalty", "presence_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise ApiError(
                400, f"{name} is not supported; use repetition_penalty (> 1 discourages repeats).", param=name
            )
    for name, why in UNSUPPORTED_FIELDS.items():
        if body.get(name) not in (None, False, 0, {}):
            raise ApiError(400, f"{name}: {why}.", param=name)
    options = _tool_options(body)
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise ApiError(400, "stream must be true or false.", param="stream")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise ApiError(400, "stream_options must be an object.", param="stream_options")

    options |= {k: body[k] for k in OPTION_FIELDS if body.get(k) is not None}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        options["max_tokens"] = max_tokens
    return _messages(body.get("messages")), options, bool(stream), bool(stream_options.get("include_usage"))


COMPLETION_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty", "stop", "seed")
# completions fields that ask for nothing unless set: refused when they ask for something
COMPLETION_REFUSED = {
    "echo": (False, "echo is not supported: the text returned is the continuation only"),
    "suffix": (None, "suffix (insertion) is not supported"),
    "best_of": (1, "best_of is not supported; ask for n answers and choose"),
}
MAX_COMPLETION_LOGPROBS = 5  # as in OpenAI's completions API


def parse_completion_request(body: dict) -> tuple[list[str], dict[str, Any], int, bool, bool]:
    """OpenAI completions request -> (prompts, generation options, n, stream, include_usage)."""
    known = {"model", "prompt", "max_tokens", "n", "stream", "stream_options", "logprobs", "logit_bias", "user"}
    known |= {*COMPLETION_FIELDS, *COMPLETION_REFUSED, "frequency_penalty", "presence_penalty"}
    if unknown := sorted(set(body) - known):
        raise ApiError(400, f"unrecognized request argument: {unknown[0]}.", param=unknown[0])
    for name, (allowed, why) in COMPLETION_REFUSED.items():
        if body.get(name, allowed) not in (allowed, None):
            raise ApiError(400, f"{why}.", param=name)
    for name in ("frequency_penalty", "presence_penalty", "logit_bias"):
        if body.get(name) not in (None, 0, 0.0, {}):
            raise ApiError(400, f"{name} is not supported.", param=name)
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise ApiError(400, "prompt must be a non-empty string or an array of them.", param="prompt")
    n = body.get("n") or 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n * len(prompts) <= MAX_N:
        raise ApiError(400, f"n must be an integer, and n times the prompts at most {MAX_N}.", param="n")
    options = {k: body[k] for k in COMPLETION_FIELDS if body.get(k) is not None}
    options["max_tokens"] = body.get("max_tokens", 16)  # OpenAI's default for completions
    top = body.get("logprobs")
    if top is not None:
        if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_COMPLETION_LOGPROBS:
            raise ApiError(400, f"logprobs must be an integer from 0 to {MAX_COMPLETION_LOGPROBS}.", param="logprobs")
        options |= {"logprobs": True, "top_logprobs": top}
    stream, stream_options = body.get("stream") or False, body.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(stream_options, dict):
        raise ApiError(400, "stream must be true or false, and stream_options an object.", param="stream")
    return prompts, options, n, stream, bool(stream_options.get("include_usage"))


def _tool_options(body: dict) -> dict[str, Any]:
    """tools, tool_choice and parallel_tool_calls for ChatModel.stream (OpenAI's older functions /
    function_call read as tools)."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is None and body.get("functions") is not None:
        functions = body["functions"]
        tools = [{"type": "function", "function": f} for f in functions] if isinstance(functions, list) else functions
        legacy = body.get("function_call")
        choice = {"type": "function", "function": legacy} if isinstance(legacy, dict) else legacy
    if tools is not None and not isinstance(tools, list):
        raise ApiError(400, "tools must be an array of function definitions.", param="tools")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise ApiError(400, "parallel_tool_calls must be true or false.", param="parallel_tool_calls")
    out = {"tools": tools or None, "tool_choice": choice}
    return out | ({"parallel_tool_calls": parallel} if parallel is not None else {})


def _messages(messages: Any) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty array of {role, content} objects.", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}] must be an object with role and content.", param=f"messages[{i}]")
        role, content = m.get("role"), m.get("content")
        role = "system" if role == "developer" else role  # OpenAI's newer name for the system role
        if isinstance(content, list):  # content parts: only text is supported
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
            ):
                raise ApiError(
                    400, f"messages[{i}].content: only text parts are supported.", param=f"messages[{i}].content"
                )
            content = "\n".join(p["text"] for p in content)
        message = {"role": role, "content": content}
        # a function-calling conversation: the assistant's calls, the results that answer them
        message |= {k: m[k] for k in ("tool_calls", "tool_call_id", "function_call", "name") if m.get(k) is not None}
        if role == "assistant" and content is None and (message.get("tool_calls") or message.get("function_call")):
            message["content"] = ""
        out.append(message)
    return out


# --- the app ------------------------------------------------------------------------------


def create_app(
    model: ChatModel,
    api_key: str | None = None,
    max_queue: int = 8,
    max_body: int = DEFAULT_MAX_BODY,
    parallel: int = 1,
    local_only: bool = False,
    cors_origins: Sequence[str] = (),
    body_timeout: float = BODY_TIMEOUT_S,
    adapters: Sequence[ChatModel] = (),
    failed_adapters: dict[str, str] | None = None,
    prompt_cache_bytes: int = PROMPT_CACHE_BYTES,
) -> FastAPI:
    """The ASGI app serving `model`; `api_key` (if set) is required as `Authorization: Bearer KEY` on /v1.

    `adapters` (from `model.with_adapter`) are served too, each under its own name: a request's
    `model` picks one, and an unknown name is a 404. Alone, `model` answers whatever name a client
    sends. `failed_adapters` (name: why) are named in that 404, so a client learns why its adapter
    is missing while the others serve.

    `local_only` (a loopback server with no API key, as `serve` sets it) also refuses a Host that is
    not this machine (DNS rebinding) and POST bodies that are not JSON (a cross-site form). In every
    mode a browser request from another origin is refused unless it is in `cors_origins`.
    """
    if parallel < 1 or max_queue < 0 or max_body < 1:
        raise ConfigError(
            f"parallel must be at least 1, max_queue at least 0 and max_body at least 1; "
            f"got {parallel}, {max_queue}, {max_body}."
        )
    scheduler = Scheduler(parallel, max_queue)
    # Requests share one PromptCache: a prompt runs only from where it first differs from the
    # cached prompt that shares the most with it (a system prompt and tools, a chat's earlier
    # turns), and a response_format repeated is not compiled again (~0.45 s). Each answer running
    # holds its own slot; a few more keep recent prompts for the next requests. With parallel > 1
    # the answers that can be batched run side by side in one BatchDecoder's rows, whose tokens
    # are kept the same way (a row per answer running).
    batch = BatchDecoder.start(model, rows=parallel) if parallel > 1 else None
    cache = PromptCache(max_slots=parallel + PROMPT_CACHE_SPARE_SLOTS, max_bytes=prompt_cache_bytes, batch=batch)
    created = int(time.time())
    served = {model.name: model, **{a.name: a for a in adapters}}
    failed = dict(failed_adapters or {})

    def pick(name: str | None) -> ChatModel:
        if name in served:
            return served[name]
        if (not adapters and not failed) or name is None:
            return model  # one model: OpenAI clients must send some name
        raise not_served(name)

    def not_served(name: str) -> ApiError:
        why = f" It failed to load: {failed[name]}" if name in failed else ""
        return ApiError(
            404,
            f"model {name!r} is not served here; this server serves {', '.join(map(repr, served))}.{why}",
            type="not_found_error",
            param="model",
            code="model_not_found",
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        scheduler.shutdown()
        if batch is not None:
            batch.close()

    app = FastAPI(title="edgeft", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.scheduler, app.state.model = scheduler, model
    allowed_origins = {o.rstrip("/") for o in cors_origins}

    app.add_middleware(BrowserGuard, local_only=local_only, allowed_origins=allowed_origins)

    if allowed_origins:  # added last, so it runs first: it answers the browser's preflight itself
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=sorted(allowed_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["authorization", "content-type"],
        )
    page = resources.files("edgeft.runtime").joinpath("web/index.html").read_text(encoding="utf-8")

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return e.response()

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", type=kind).response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        return ApiError(400, f"invalid request: {e.errors()}").response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        # the details go to the server's log only: an exception's text can hold paths and data
        # that a client (on 0.0.0.0, anyone) must not see; the id ties the answer to the log line
        incident = uuid.uuid4().hex[:12]
        log.exception("unexpected error %s on %s %s", incident, request.method, request.url.path)
        message = f"internal error {incident}: the server could not answer; its log has the details."
        return ApiError(500, message, type="server_error").response()

    async def require_key(request: Request) -> None:
        if api_key:
            _check_key(request.headers.get("authorization"), api_key)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])  # checked before the body is read

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Cache-Control": "no-store", **PAGE_HEADERS})

    @app.get("/health")
    async def health() -> dict:
        return {
            "status": "ok",
            "model": model.name,
            "adapters": [a.name for a in adapters],
            **({"adapters_failed": failed} if failed else {}),
            "running": scheduler.running,
            # A streaming response gives its ticket back when the client is gone, maybe a token
            # before its worker thread stops: never report that moment as -1 waiting.
            "waiting": max(0, scheduler.admitted - scheduler.running),
        }

    @v1.get("/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [_model_card(m, created) for m in served.values()]}

    @v1.get("/models/{model_id:path}")
    async def get_model(model_id: str) -> dict:
        if model_id not in served:
            raise not_served(model_id)
        return _model_card(served[model_id], created)

    async def admitted(prompt_field: str, start, *args) -> tuple[Ticket, list[Any]]:
        """A place in the queue first (rendering and tokenizing cost CPU, which a full server must not
        spend), then the request's streams: rendered and tokenized off the event loop (a long prompt
        takes a moment), every option and the context length checked before any generation."""
        ticket = scheduler.admit()
        if ticket is None:
            raise _busy(scheduler)
        try:
            return ticket, await run_in_threadpool(start, *args)
        except ContextLengthError as e:
            ticket.release()
            raise ApiError(400, str(e), param=prompt_field, code="context_length_exceeded") from None
        except GenerationError as e:
            ticket.release()
            raise ApiError(400, str(e), param=_param_of(str(e))) from None
        except BaseException:
            ticket.release()
            raise

    @v1.post("/chat/completions")
    async def chat_completions(request: Request):
        body = await read_json(request, max_body, body_timeout)
        messages, options, stream_it, include_usage = parse_chat_request(body)
        model = pick(body.get("model"))
        ticket, streams = await admitted("messages", choices_of, model, messages, cache, options, body.get("n") or 1)
        completion_id, started = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        logprobs = bool(options.get("logprobs"))
        if stream_it:
            events = _sse(
                _in_turn(scheduler, streams, ticket), completion_id, started, model.name, include_usage, logprobs
            )
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of events
            return _TicketedStreamingResponse(events, ticket, media_type="text/event-stream", headers=headers)
        try:
            results = [await _collect(scheduler.run(s, ticket), request, s) for s in streams]
        finally:
            ticket.release()
        return _completion(results, completion_id, started, model.name, logprobs)

    @v1.post("/completions")
    async def completions(request: Request):
        body = await read_json(request, max_body, body_timeout)
        prompts, options, n, stream_it, include_usage = parse_completion_request(body)
        model = pick(body.get("model"))
        ticket, streams = await admitted("prompt", completion_choices, model, prompts, cache, options, n)
        completion_id, started = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        logprobs = "logprobs" in options
        if stream_it:
            events = _text_sse(_in_turn(scheduler, streams, ticket), completion_id, started, model.name, include_usage, logprobs, len(prompts))  # fmt: skip
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return _TicketedStreamingResponse(events, ticket, media_type="text/event-stream", headers=headers)
        try:
            results = [await _collect(scheduler.run(s, ticket), request, s) for s in streams]
        finally:
            ticket.release()
        return {
            "id": completion_id,
            "object": "text_completion",
            "created": started,
            "model": model.name,
            "choices": [
                {"index": i, "text": r.text, "finish_reason": r.finish_reason, "logprobs": _text_logprobs(r.logprobs) if logprobs else None}
                for i, r in enumerate(results)
            ],
            "usage": _usage(results, prompts=len(prompts)),
        }  # fmt: skip

    app.include_router(v1)
    return app


def _busy(scheduler: Scheduler) -> ApiError:
    """503 with Retry-After: every slot and place in the queue is taken."""
    return ApiError(
        503,
        f"the server is busy: {scheduler.running} answers running and "
        f"{max(0, scheduler.admitted - scheduler.running)} waiting (the most is {scheduler.parallel} + "
        f"{scheduler.max_queue}). Retry in a few seconds.",
        type="server_error",
        code="server_busy",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


class BrowserGuard:
    """Plain ASGI middleware (Starlette's BaseHTTPMiddleware would hide a client's disconnect from
    the endpoint, and a non-streaming generation would then run on for nobody)."""

    def __init__(self, app, *, local_only: bool, allowed_origins: set[str]):
        self.app, self.local_only, self.allowed_origins = app, local_only, allowed_origins

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            error = _browser_check(Request(scope), local_only=self.local_only, allowed_origins=self.allowed_origins)
            if error:
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _browser_check(request: Request, *, local_only: bool, allowed_origins: set[str]) -> ApiError | None:
    """What a web page the user happens to visit must not be able to do with this server."""
    host = request.headers.get("host", "")
    if local_only and not _is_loopback(_hostname(host)):
        return ApiError(
            403,
            f"Host {host!r} is not this machine: a server without an API key answers only to localhost names "
            "(DNS rebinding guard). Set --api-key to serve other names.",
            type="permission_error",
            code="forbidden_host",
        )
    origin = (request.headers.get("origin") or "").rstrip("/")
    same_origin = origin.split("://", 1)[-1] == host
    if origin and not same_origin and origin not in allowed_origins:
        return ApiError(
            403,
            f"requests from the web page at {origin} are not allowed. Start the server with --cors-origins {origin} "
            "to allow them.",
            type="permission_error",
            code="forbidden_origin",
        )
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if local_only and request.method == "POST" and content_type != "application/json":
        return ApiError(
            415,
            f"send the request as JSON with the header 'Content-Type: application/json' (got {content_type or 'none'!r}).",
            code="unsupported_media_type",
        )
    return None


def _hostname(host: str) -> str:
    """'127.0.0.1:8000' -> '127.0.0.1', '[::1]:8000' -> '::1', 'localhost' -> 'localhost'."""
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _check_key(header: str | None, api_key: str) -> None:
    if not header:
        raise ApiError(
            401,
            "no API key: send the header 'Authorization: Bearer YOUR_KEY'.",
            code="missing_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
        raise ApiError(401, "incorrect API key.", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def _model_card(model: ChatModel, created: int) -> dict:
    return {
        "id": model.name,
        "object": "model",
        "created": created,
        "owned_by": "edgeft",
        "context_length": model.context_length,
    }


class _TicketedStreamingResponse(StreamingResponse):
    """Releases the request's queue ticket however the response ends, even if it never started."""

    def __init__(self, content: Any, ticket: Ticket, **kwargs: Any):
        super().__init__(content, **kwargs)
        self.ticket = ticket

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.ticket.release()


async def _collect(events: AsyncIterator[tuple[str, Any]], request: Request, stream: Any) -> ChatResult:
    """Run a non-streaming request to the end, cancelling it if the client goes away meanwhile."""

    async def watch() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.5)
        stream.cancel()

    watcher = asyncio.create_task(watch())
    try:
        async with contextlib.aclosing(events):
            async for kind, value in events:
                if kind == "done":
                    return value
        raise RuntimeError("generation ended without a result")
    finally:
        watcher.cancel()


def completion_choices(model: ChatModel, prompts: list[str], cache, options: dict, n: int) -> list[Any]:
    """n streams per prompt, in OpenAI's order (prompt by prompt), seeded as `choices_of` seeds them."""
    seed = options.get("seed")
    return [
        model.complete_stream(prompt, cache=cache, **(options | ({"seed": seed + i} if seed is not None and i else {})))
        for prompt in prompts
        for i in range(n)
    ]


def _text_logprobs(entries: list[dict] | None) -> dict:
    """Chat logprobs entries in the completions API's shape."""
    entries = entries or []
    offsets, at = [], 0
    for e in entries:
        offsets.append(at)
        at += len(e["token"])
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
        "text_offset": offsets,
    }


async def _text_sse(
    events, completion_id: str, created: int, name: str, include_usage: bool, logprobs: bool, prompts: int = 1
):
    """Completions as OpenAI text_completion server-sent events, ending with [DONE]."""

    def chunk(choices: list[dict], **extra: Any) -> str:
        data = {"id": completion_id, "object": "text_completion", "created": created, "model": name}
        return f"data: {json.dumps(data | {'choices': choices, **extra}, ensure_ascii=False)}\n\n"

    results: list[ChatResult] = []
    pending: list[dict] = []
    try:
        async with contextlib.aclosing(events):
            async for index, kind, value in events:
                if kind == "logprobs":
                    pending += value
                elif kind in ("piece", "done"):
                    text, finish = (value, None) if kind == "piece" else ("", value.finish_reason)
                    shown = _text_logprobs(pending) if logprobs else None
                    yield chunk([{"index": index, "text": text, "finish_reason": finish, "logprobs": shown}])
                    pending = []
                    if kind == "done":
                        results.append(value)
        if include_usage and results:
            yield chunk([], usage=_usage(results, prompts))
    except Exception:
        log.exception("generation failed mid-stream")
        yield f"data: {json.dumps(_failed_mid_stream().body())}\n\n"
    yield "data: [DONE]\n\n"


def _failed_mid_stream() -> ApiError:
    """What a stream that broke says to its client (the details are in the server's log)."""
    return ApiError(500, "generation failed: the server's log has the details.", type="server_error")


def choices_of(model: ChatModel, messages: list[dict], cache: PromptCache, options: dict, n: int) -> list[Any]:
    """The request's `n` answers as streams, checked before any runs: with a seed, answer i samples
    with seed + i (n different answers that a second request repeats); greedy answers are alike."""
    seed = options.get("seed")
    return [
        model.stream(messages, cache=cache, **(options | ({"seed": seed + i} if seed is not None and i else {})))
        for i in range(n)
    ]


async def _in_turn(scheduler: Scheduler, streams: list[Any], ticket: Ticket) -> AsyncIterator[tuple[int, str, Any]]:
    """The answers' events one answer after the other, each tagged with its choice index."""
    for index, stream in enumerate(streams):
        async with contextlib.aclosing(scheduler.run(stream, ticket)) as events:
            async for kind, value in events:
                yield index, kind, value


def _completion(results: list[ChatResult], completion_id: str, created: int, name: str, logprobs: bool) -> dict:
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": name,
        "choices": [
            {
                "index": i,
                "message": _message(result),
                "finish_reason": result.finish_reason,
                "logprobs": {"content": result.logprobs or []} if logprobs else None,
            }
            for i, result in enumerate(results)
        ],
        "usage": _usage(results),
    }


def _param_of(message: str) -> str | None:
    """The request field a GenerationError is about, for OpenAI's error.param."""
    for name in ("response_format", "tool_choice", "parallel_tool_calls", "tools", "top_logprobs", "logprobs"):
        if message.startswith(name) or f"{name}'" in message or f" {name}" in message:
            return name
    return None


def _message(result: ChatResult) -> dict:
    """The answer as OpenAI's assistant message: its text, and its calls when it makes some."""
    if result.tool_calls:
        return {"role": "assistant", "content": result.text or None, "tool_calls": result.tool_calls}
    return {"role": "assistant", "content": result.text}


def _usage(results: list[ChatResult], prompts: int = 1) -> dict:
    """OpenAI's usage over a request's answers (each of its `prompts` counted once), with the prompt
    tokens the server's cache already held as cached_tokens."""
    per = len(results) // prompts
    prompt = sum(r.usage["prompt_tokens"] for r in results[::per])
    completion = sum(r.usage["completion_tokens"] for r in results)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": results[0].cached_tokens},
    }


async def _sse(
    events: AsyncIterator[tuple[int, str, Any]],
    completion_id: str,
    created: int,
    name: str,
    include_usage: bool,
    logprobs: bool = False,
) -> AsyncIterator[str]:
    """The answers' events as OpenAI chat.completion.chunk server-sent events, ending with [DONE]."""

    def chunk(index: int | None, delta: dict | None, finish_reason: str | None = None, entries=None, **extra) -> str:
        choices = []
        if delta is not None:
            shown = {"content": entries or []} if logprobs else None
            choices = [{"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": shown}]
        data = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": name,
            "choices": choices,
            **extra,
        }
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    results: list[ChatResult] = []
    pending: list[dict] = []  # logprobs of tokens whose text comes in the next piece
    started = -1
    try:
        async with contextlib.aclosing(events):
            async for index, kind, value in events:
                if index != started:  # each answer opens with the assistant role
                    started = index
                    yield chunk(index, {"role": "assistant", "content": ""})
                if kind == "logprobs":
                    pending += value
                elif kind == "piece":
                    yield chunk(index, {"content": value}, entries=pending)
                    pending = []
                else:
                    results.append(value)
                    for i, call in enumerate(value.tool_calls or ()):  # each call whole, in one delta
                        yield chunk(index, {"tool_calls": [{"index": i, **call}]})
                    # usage rides on the last chunk always, and on a chunk of its own when asked for, as OpenAI does
                    yield chunk(index, {}, value.finish_reason, entries=pending, usage=_usage(results))
                    pending = []
        if include_usage and results:
            yield chunk(None, None, usage=_usage(results))
    except Exception:  # headers are sent already: report in the stream, then end it properly
        log.exception("generation failed mid-stream")
        yield f"data: {json.dumps(_failed_mid_stream().body())}\n\n"
    yield "data: [DONE]\n\n"


# --- running it ---------------------------------------------------------------------------


def serve(
    path: str | os.PathLike,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    threads: int | None = None,
    parallel: int = 1,
    max_queue: int = 8,
    max_body: int = DEFAULT_MAX_BODY,
    log_level: str = "info",
    cors_origins: Sequence[str] = (),
    adapters: Sequence[str] = (),
    prompt_cache_bytes: int = PROMPT_CACHE_BYTES,
) -> None:
    """Load the model at `path` (and each `NAME=PATH` adapter on it) and serve it until Ctrl-C."""
    import uvicorn

    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    if not _is_loopback(host) and not api_key:
        log.warning(
            "Serving on %s without an API key: anyone who can reach this machine can use the model. "
            "Set --api-key or %s.",
            host,
            API_KEY_ENV,
        )
    model = ChatModel.load(path, threads=threads)
    views, failed = load_adapters(model, adapters)
    app = create_app(
        model,
        adapters=views,
        failed_adapters=failed,
        api_key=api_key,
        max_queue=max_queue,
        max_body=max_body,
        parallel=parallel,
        local_only=_is_loopback(host) and not api_key,
        cors_origins=cors_origins,
        prompt_cache_bytes=prompt_cache_bytes,
    )
    shown = f"[{host}]" if ":" in host else host
    log.info(
        "Serving %s on http://%s:%d  (web chat at /, OpenAI API at /v1%s). Ctrl-C stops.",
        model.name,
        shown,
        port,
        ", API key required" if api_key else "",
    )
    from edgeft.runtime.connections import server_options

    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=5,
        **server_options(parallel, max_queue),
    )


def load_adapters(model: ChatModel, specs: Sequence[str]) -> tuple[list[ChatModel], dict[str, str]]:
    """Each `NAME=PATH` adapter on `model`. One that cannot load is logged and skipped (the others
    serve; a request for it gets a 404 that says why), unless none loads at all."""
    from edgeft.runtime.adapters import adapter_name, parse_adapter_spec, resolve_adapter

    views, failed = [], {}
    for spec in specs:
        name, path = parse_adapter_spec(spec)
        try:
            views.append(model.with_adapter(path, name))
        except ModelError as e:
            if not name:
                try:
                    name = adapter_name(resolve_adapter(path))
                except ModelError:
                    name = path
            log.error("Adapter %s (%s) not served: %s", name, path, e)
            failed[name] = str(e)
    if specs and not views:
        raise ModelError(f"none of the adapters could be loaded: {'; '.join(failed.values())}")
    return views, failed


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
