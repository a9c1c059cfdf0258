"""What the server's prompt cache saves: the second turn of conversations with a long system
prompt, through `edgeft serve` and the official `openai` client, with the cache and without it.

    python benchmarks/prompt_cache.py runs/quickstart/onnx-int4
    python benchmarks/prompt_cache.py smollm2-int4 --conversations 6 --system-tokens 500

Per conversation (its own system prompt of about --system-tokens tokens, so nothing is shared
between conversations): turn 1 (cold), then turn 2 (the system prompt, turn 1 and a new question).
Every first turn runs, then every second turn (A1 B1 C1 D1 A2 B2 ...): each second turn follows
other conversations' requests, so the cache must keep several. Time to first token is measured by
the client on the streamed answer, greedy, medians. Each server is started as a user starts it
(`edgeft serve PATH --port N`, then `--prompt-cache-mb 0` for the run without cache); the answers
of the two runs are compared. Target (issue 30): turn 2 with the cache at most 30% of turn 2
without it. Results: benchmarks/results/prompt_cache.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from servers import RESULTS, start_llama_server, start_server, stop

TOPICS = ["boilers", "bicycles", "printers", "kettles", "routers", "lawn mowers", "dishwashers", "scooters"]


def system_prompt(topic: str, tokens: int, count) -> str:
    """A support manual of about `tokens` tokens, unique to `topic` from its first word."""
    text = f"{topic.capitalize()} support desk. You answer questions about {topic} in one or two sentences."
    rule = 1
    while count(text) < tokens:
        text += f" Rule {rule}: when a customer asks about {topic} part {rule}, check the warranty, the model year and the manual page {rule * 7}."
        rule += 1
    return text


def ask(client, messages: list[dict], max_tokens: int) -> tuple[float, str, int]:
    """Time to the first content piece, the answer, and the prompt tokens the server had cached."""
    start = time.perf_counter()
    first, pieces, cached = None, [], 0
    stream = client.chat.completions.create(
        model="edgeft",
        messages=messages,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage:
            details = getattr(chunk.usage, "prompt_tokens_details", None)  # llama.cpp's server may not say
            cached = (details.cached_tokens or 0) if details else None
    return (first or time.perf_counter()) - start, "".join(pieces), cached


def run(started: tuple, conversations: list[str], max_tokens: int) -> dict:
    from openai import OpenAI

    server, url = started
    try:
        client = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        ask(client, [{"role": "user", "content": "hi"}], 4)  # warm-up: first-call costs are not the cache's
        turn1, turn2, answers, cached = [], [], [], []
        history = {}
        for topic, system in conversations:
            messages = [{"role": "system", "content": system}, {"role": "user", "content": f"My {topic} is broken."}]
            seconds, answer, _ = ask(client, messages, max_tokens)
            turn1.append(seconds)
            history[topic] = [*messages, {"role": "assistant", "content": answer}]
            answers.append(answer)
        for topic, _ in conversations:
            messages = [*history[topic], {"role": "user", "content": "Which part should I check first?"}]
            seconds, answer, held = ask(client, messages, max_tokens)
            turn2.append(seconds)
            answers.append(answer)
            cached.append(held)
        return {"turn1_ttft_s": turn1, "turn2_ttft_s": turn2, "cached_tokens": cached, "answers": answers}
    finally:
        stop(server)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", help="An ONNX export folder or a run.")
    parser.add_argument("--conversations", type=int, default=4, help="Conversations, each with its own system prompt.")
    parser.add_argument("--system-tokens", type=int, default=500, help="Length of each system prompt, in tokens.")
    parser.add_argument("--max-tokens", type=int, default=24, help="New tokens per answer.")
    parser.add_argument("--gguf", help="The same model as a GGUF: llama.cpp's server runs the conversations too.")
    parser.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER", "llama-server"))
    args = parser.parse_args()

    from edgeft.bench import machine
    from edgeft.cpu import usable_cpus
    from edgeft.runtime import ChatModel

    model = ChatModel.load(args.export)
    topics = (TOPICS * (args.conversations // len(TOPICS) + 1))[: args.conversations]
    conversations = [
        (f"{t} {i}" if i >= len(TOPICS) else t, system_prompt(t, args.system_tokens, model.count_tokens))
        for i, t in enumerate(topics)
    ]
    prompt_tokens = statistics.median(model.count_tokens([{"role": "system", "content": s}]) for _, s in conversations)
    del model
    cold = run(start_server(args.export, "--prompt-cache-mb", "0"), conversations, args.max_tokens)
    warm = run(start_server(args.export), conversations, args.max_tokens)
    llama = None
    if args.gguf:  # one slot, as edgeft serve's default; its prompt cache as it comes
        started = start_llama_server(args.llama_server, args.gguf, slots=1, slot_tokens=4096, threads=usable_cpus())
        llama = run(started, conversations, args.max_tokens)
    runs = (("off", cold), ("on", warm)) + ((("llama.cpp", llama),) if llama else ())
    med = {name: {k: statistics.median(r[k]) for k in ("turn1_ttft_s", "turn2_ttft_s")} for name, r in runs}
    ratio = med["on"]["turn2_ttft_s"] / med["off"]["turn2_ttft_s"]
    report = {
        "machine": machine(),
        "export": args.export,
        "conversations": args.conversations,
        "system_prompt_tokens": prompt_tokens,
        "max_tokens": args.max_tokens,
        "cache_off": cold,
        "cache_on": warm,
        "llama_cpp": llama,
        "gguf": args.gguf,
        "medians": med,
        "turn2_ratio": round(ratio, 3),
        "target_met": ratio <= 0.30,
        "same_answers": cold["answers"] == warm["answers"],
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "prompt_cache.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"Machine: {report['machine']}.",
        (
            f"Export: {args.export}; {args.conversations} conversations in turn, system prompts of {prompt_tokens:.0f} "
            f"tokens, greedy, {args.max_tokens} new tokens, time to first token measured by the `openai` client (medians)."
        ),
        "",
        "| prompt cache | turn 1 TTFT (s) | turn 2 TTFT (s) | turn 2 tokens cached (median) |",
        "|---|---:|---:|---:|",
        (
            f"| off (`--prompt-cache-mb 0`) | {med['off']['turn1_ttft_s']:.3f} | {med['off']['turn2_ttft_s']:.3f} | "
            f"{statistics.median(cold['cached_tokens']):.0f} |"
        ),
        (
            f"| on (default) | {med['on']['turn1_ttft_s']:.3f} | {med['on']['turn2_ttft_s']:.3f} | "
            f"{statistics.median(warm['cached_tokens']):.0f} |"
        ),
        *(
            [
                (
                    f"| llama.cpp's llama-server, 1 slot, its prompt cache as it comes ({os.path.basename(args.gguf)}) "
                    f"| {med['llama.cpp']['turn1_ttft_s']:.3f} | {med['llama.cpp']['turn2_ttft_s']:.3f} | - |"
                )
            ]
            if llama
            else []
        ),
        "",
        (
            f"Turn 2 with the cache: {ratio:.0%} of its time without (target: at most 30%, "
            f"{'met' if report['target_met'] else 'NOT met'}); the same answers: {report['same_answers']}."
        ),
    ]
    (RESULTS / "prompt_cache.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
