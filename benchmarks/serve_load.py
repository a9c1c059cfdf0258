"""Several clients at once: `edgeft serve --parallel N` (batched decoding) beside llama.cpp's server
with as many slots, on the same base model, streamed through the official `openai` client.

    python benchmarks/serve_load.py smollm2-int4 --gguf ~/.cache/edgeft/models/smollm2-135m/source.gguf \\
        --llama-server /path/to/llama-server

Each server is started as a user starts it, then for 1 and for 4 clients at once: each client
streams --requests answers one after another (its own questions, greedy, --max-tokens each).
Aggregate tokens/s = every answer's completion tokens (the server's usage) over the wall time of
all of them; time to first token is the client's, to the first piece of content (p50 and p95).
Rows: edgeft with --parallel N (answers decoded together), edgeft with --parallel 1 (one at a
time, what batching replaces) and llama.cpp's llama-server with -np N (continuous batching, its
context split among the slots as edgeft's rows split theirs). Targets (issue 30): edgeft at 4
clients >= 2x edgeft at 1, and >= llama.cpp's server at 1 and at 4. The CPU model and flags are
printed with the numbers. Results: benchmarks/results/serve_load.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from pathlib import Path

from servers import RESULTS, start_llama_server, start_server, stop

SUBJECTS = [
    "a lighthouse keeper", "a lost cat", "a mountain village", "a robot gardener", "a river journey",
    "a baker at dawn", "an old clockmaker", "a storm at sea", "a desert caravan", "a winter market",
    "a city library", "a forest ranger", "a train at night", "a small island", "a violin maker", "a kite festival",
]  # fmt: skip


def ask(client, question: str, max_tokens: int) -> tuple[float, int, float]:
    """(time to the first content piece, completion tokens, seconds) of one streamed answer."""
    start = time.perf_counter()
    first, tokens = None, 0
    stream = client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": question}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    return (first or end) - start, tokens, end - start


def load(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    """`clients` threads, each streaming `requests` answers in turn; aggregate tokens/s and TTFT."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
    results: list[tuple[float, int, float]] = []
    lock, barrier = threading.Lock(), threading.Barrier(clients)

    def one(c: int) -> None:
        barrier.wait()
        for r in range(requests):
            subject = SUBJECTS[(c * requests + r) % len(SUBJECTS)]
            got = ask(client, f"Write a long, detailed story about {subject}.", max_tokens)
            with lock:
                results.append(got)

    threads = [threading.Thread(target=one, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ttfts = sorted(r[0] for r in results)
    tokens = sum(r[1] for r in results)
    return {
        "clients": clients,
        "answers": len(results),
        "completion_tokens": tokens,
        "wall_s": round(wall, 2),
        "aggregate_tokens_per_s": round(tokens / wall, 1),
        "ttft_p50_s": round(statistics.median(ttfts), 3),
        "ttft_p95_s": round(ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))], 3),
    }


def measure(name: str, started: tuple, clients: list[int], requests: int, max_tokens: int) -> list[dict]:
    server, url = started
    try:
        load(url, 1, 1, 8)  # warm-up: first-call costs are not the load's
        rows = []
        for c in clients:
            rows.append({"engine": name, **load(url, c, requests, max_tokens)})
            print(json.dumps(rows[-1]), flush=True)
        return rows
    finally:
        stop(server)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", help="The base model's int4 export (edgeft export smollm2-135m --int4 --output DIR).")
    parser.add_argument("--gguf", help="The same base model as a Q4 GGUF, for llama.cpp's server.")
    parser.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER", "llama-server"))
    parser.add_argument("--slots", type=int, default=4, help="edgeft --parallel and llama.cpp -np.")
    parser.add_argument("--requests", type=int, default=4, help="Answers each client streams in turn.")
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()

    from edgeft.bench import machine
    from edgeft.cpu import usable_cpus
    from edgeft.runtime.batching import ROW_TOKENS

    clients = [1, args.slots]
    rows = measure(
        f"edgeft serve --parallel {args.slots}",
        start_server(args.export, "--parallel", str(args.slots)),
        clients,
        args.requests,
        args.max_tokens,
    )
    rows += measure("edgeft serve --parallel 1", start_server(args.export), clients[1:], args.requests, args.max_tokens)
    if args.gguf:
        started = start_llama_server(
            args.llama_server, args.gguf, slots=args.slots, slot_tokens=ROW_TOKENS, threads=usable_cpus()
        )
        rows += measure(f"llama.cpp llama-server -np {args.slots}", started, clients, args.requests, args.max_tokens)
    report = {
        "machine": machine(),
        "export": args.export,
        "gguf": args.gguf,
        "max_tokens": args.max_tokens,
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serve_load.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        (
            f"Machine: {report['machine']}. Streamed greedy answers of up to {args.max_tokens} tokens, "
            f"{args.requests} per client in turn; export {Path(args.export).name}, GGUF {Path(args.gguf or '-').name}."
        ),
        "",
        "| engine | clients | answers | tokens | aggregate tokens/s | TTFT p50 s | TTFT p95 s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['engine']} | {r['clients']} | {r['answers']} | {r['completion_tokens']} "
            f"| {r['aggregate_tokens_per_s']} | {r['ttft_p50_s']} | {r['ttft_p95_s']} |"
        )
    (RESULTS / "serve_load.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
