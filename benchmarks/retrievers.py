"""Which retriever for `edgeft eval --rag`: BM25 (bm25s) or the base model's own embeddings?

    python benchmarks/retrievers.py runs/quickstart/base-onnx-int4 --limit 100

The same base export answers the same held-out prompts with K retrieved training examples in its
prompt, once per retriever; the better retriever is the one whose prompts get better answers.
Embeddings: SmolLM2's last hidden state, mean-pooled over the user message's tokens, cosine
similarity (no extra model to download). Also reported: how often the retrieved examples share
the prompt's answer words (the recipes' ingredients), a direct measure of retrieval. Results go
to benchmarks/results/retrievers.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def embedding_retrieve(model_dir: Path, pool, samples, k: int):
    """The k pool examples whose user message's mean-pooled hidden state is closest (cosine)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()

    def question(s) -> str:
        return next((m["content"] for m in reversed(s.messages) if m["role"] == "user"), "")

    @torch.no_grad()
    def embed(items) -> torch.Tensor:
        rows = []
        for s in items:
            ids = tokenizer(question(s), return_tensors="pt", truncation=True, max_length=256)
            hidden = model(**ids).last_hidden_state[0]
            rows.append(torch.nn.functional.normalize(hidden.mean(0), dim=0))
        return torch.stack(rows)

    scores = embed(samples) @ embed(pool).T
    top = scores.topk(min(k, len(pool)), dim=1).indices
    return [[pool[int(i)] for i in reversed(row.tolist())] for row in top]


def overlap(samples, found) -> float:
    """Mean share of a reference's answer words that the retrieved examples' answers contain."""
    from edgeft.evaluate import _words

    shares = []
    for sample, examples in zip(samples, found):
        want = set(_words(sample.reference))
        have = {w for e in examples for w in _words(e.reference)}
        shares.append(len(want & have) / len(want) if want else 0.0)
    return 100 * sum(shares) / len(shares)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", help="The base model's ONNX export (runs/quickstart/base-onnx-int4).")
    parser.add_argument("--data", default=str(ROOT / "samples" / "recipes" / "eval.jsonl"))
    parser.add_argument("--train", default=str(ROOT / "samples" / "recipes" / "train.jsonl"))
    parser.add_argument("--model", default="smollm2-135m", help="The base model whose embeddings retrieve.")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("-k", type=int, default=3)
    args = parser.parse_args()

    from edgeft import models
    from edgeft.bench import machine
    from edgeft.evaluate import Candidate, evaluate_one, load_samples, retrieve, with_shots

    samples, pool = load_samples(args.data, args.limit), load_samples(args.train)
    max_tokens = 0  # evaluate_one's own answer room: the longest reference in the model's tokens + a margin
    rows = {}
    for name in ("bm25", "embeddings"):
        start = time.perf_counter()
        if name == "bm25":
            found = retrieve(pool, samples, args.k)
        else:
            found = embedding_retrieve(models.resolve_model(args.model).path, pool, samples, args.k)
        seconds = time.perf_counter() - start
        candidate = Candidate(label=f"base + {args.k} retrieved ({name})", path=Path(args.export), backend="onnx")
        prompts = [with_shots(s, f) for s, f in zip(samples, found)]
        row = evaluate_one(candidate, samples, prompts, max_tokens, 1)
        rows[name] = {
            "retrieval_seconds": round(seconds, 1),
            "answer_words_in_examples_pct": round(overlap(samples, found), 1),
            "exact_match_pct": row.exact_match,
            "token_f1_pct": row.token_f1,
            "perplexity": row.perplexity,
        }
        print(name, rows[name], flush=True)
    result = {"machine": machine(), "prompts": len(samples), "k": args.k, "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "retrievers.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        (
            f"Machine: {result['machine']}; {len(samples)} prompts of {Path(args.data).name}, {args.k} retrieved "
            f"examples from {Path(args.train).name}, greedy, {args.export}"
        ),
        "",
        "| retriever | answer words found in the examples % | exact match % | token F1 % | reference perplexity | retrieval time |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['answer_words_in_examples_pct']:.1f} | {r['exact_match_pct']:.1f} | {r['token_f1_pct']:.1f} | "
            f"{r['perplexity']:.3f} | {r['retrieval_seconds']:.1f} s |"
        )
    (RESULTS / "retrievers.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
