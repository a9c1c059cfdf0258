"""The terminal chat behind `edgeft chat`: one answer for scripts, or a multi-turn loop.

Answers stream to stdout as they are generated. In the loop, Ctrl-C stops the current answer and
keeps the conversation going (the ONNX Runtime call in progress finishes its token first, so the
stop is immediate in practice); Ctrl-D or /exit leaves; /reset starts a new conversation. With --tools, a call the model makes is
shown and you type its result; the model then goes on with it.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, TextIO

from edgeft.errors import GenerationError
from edgeft.runtime.engine import ChatModel, ChatResult, ChatStream, PromptCache

COMMANDS = {"/reset": "forget the conversation (keeps --system)", "/exit": "leave (or Ctrl-D)", "/help": "this list"}


def answer_once(
    model: ChatModel,
    prompt: str,
    *,
    system: str | None = None,
    options: dict[str, Any] | None = None,
    stats: bool = False,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> ChatResult:
    """Answer one message, streaming it to `out`; for `--prompt` and piped input."""
    out, err = out or sys.stdout, err or sys.stderr
    if not prompt.strip():
        raise GenerationError("the prompt is empty: pass --prompt TEXT or pipe some text on stdin.")
    result = stream_answer(model, _start(system) + [{"role": "user", "content": prompt.strip()}], options or {}, out)
    for call in result.tool_calls or ():  # a script reads the calls as JSON lines
        out.write(
            json.dumps({"name": call["function"]["name"], "arguments": json.loads(call["function"]["arguments"])})
            + "\n"
        )
    out.write("\n")
    if stats:
        err.write(format_stats(result) + "\n")
    return result


def chat_loop(
    model: ChatModel,
    *,
    system: str | None = None,
    options: dict[str, Any] | None = None,
    stats: bool = False,
    input_fn: Callable[[str], str] = input,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> list[dict[str, str]]:
    """Chat until /exit or Ctrl-D; returns the conversation."""
    out, err = out or sys.stdout, err or sys.stderr
    options = options or {}
    history = _start(system)
    # Each turn's prompt is the last one plus its answer and a new question: greedy turns run only
    # what is new (the conversation so far is not prefilled again on every turn).
    cache = PromptCache()
    if input_fn is input and sys.stdin.isatty():
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (arrow keys and line editing for input())
    err.write(
        f"Chatting with {model.name} ({model.context_length} tokens of context). "
        "Ctrl-C stops an answer, /reset starts over, /exit or Ctrl-D leaves.\n"
    )
    while True:
        try:
            line = input_fn(">>> ").strip()
        except EOFError:
            out.write("\n")
            return history
        except KeyboardInterrupt:
            err.write("\n(Ctrl-C stops an answer; /exit or Ctrl-D leaves.)\n")
            continue
        if not line:
            continue
        if line.split()[0].startswith("/") and len(line.split()) == 1:
            if line == "/exit" or line == "/quit":
                return history
            if line == "/reset":
                history = _start(system)
                err.write("(new conversation)\n")
            else:
                err.write("".join(f"  {c:<7} {what}\n" for c, what in COMMANDS.items()))
            continue
        turn = len(history)
        history.append({"role": "user", "content": line})
        while True:  # an answer that calls functions: you give each result, then the model goes on
            try:
                result = stream_answer(model, history, options, out, cache=cache)
            except GenerationError as e:
                del history[turn:]
                err.write(f"Error: {e}\n(/reset starts a new conversation)\n")
                break
            out.write("\n")
            if result.finish_reason == "cancelled":
                err.write("[stopped]\n")
            if stats:
                err.write(format_stats(result) + "\n")
            if result.tool_calls:
                history.append({"role": "assistant", "content": result.text, "tool_calls": result.tool_calls})
                try:
                    history += [_tool_result(call, input_fn, out) for call in result.tool_calls]
                except (EOFError, KeyboardInterrupt):
                    del history[turn:]
                    err.write("\n(the call was not answered: the turn is dropped)\n")
                    break
                continue
            if result.text.strip():
                history.append({"role": "assistant", "content": result.text})
            elif len(history) == turn + 1:
                history.pop()  # nothing was said: drop the question too, so turns keep alternating
            break


def _tool_result(call: dict, input_fn: Callable[[str], str], out: TextIO) -> dict:
    """Show a call the model made and ask for its result (what your function would return)."""
    function = call["function"]
    out.write(f"-> {function['name']}({function['arguments']})\n")
    return {"role": "tool", "tool_call_id": call["id"], "content": input_fn(f"result of {function['name']}> ")}


def stream_answer(
    model: ChatModel,
    messages: list[dict[str, str]],
    options: dict[str, Any],
    out: TextIO,
    *,
    cache: PromptCache | None = None,
) -> ChatResult:
    """Stream one answer to `out`; Ctrl-C (SIGINT) cancels it instead of raising."""
    stream = model.stream(messages, cache=cache, **options)
    with _ctrl_c_cancels(stream):
        for piece in stream:
            out.write(piece)
            out.flush()
    assert stream.result is not None
    return stream.result


def format_stats(result: ChatResult) -> str:
    """'[42 tokens, 118.3 tokens/s, first token 0.05 s (180 of 200 prompt tokens cached), stop]'"""
    speed = result.tokens_per_second
    ttft = result.time_to_first_token
    cached = (
        f" ({result.cached_tokens} of {result.usage['prompt_tokens']} prompt tokens cached)"
        if result.cached_tokens
        else ""
    )
    return (
        f"[{result.usage['completion_tokens']} tokens, "
        f"{f'{speed:.1f}' if speed else '-'} tokens/s, "
        f"first token {f'{ttft:.2f}' if ttft is not None else '-'} s{cached}, {result.finish_reason}]"
    )


def _start(system: str | None) -> list[dict[str, str]]:
    return [{"role": "system", "content": system}] if system else []


@contextlib.contextmanager
def _ctrl_c_cancels(stream: ChatStream) -> Iterator[None]:
    # A KeyboardInterrupt raised in the middle of the generator would end it without a result;
    # a handler that only sets the cancel flag lets the answer finish cleanly as "cancelled".
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda *_: stream.cancel())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
