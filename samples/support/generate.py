"""Generate the support-desk sample in Alpaca format: a reply style and tone to learn.

    python samples/support/generate.py            # rewrites train.jsonl and eval.jsonl beside this file

The assistant ("Ava" at the fictional Brightside Home store) always answers the same way: greets the
customer by name, acknowledges the problem in one sentence, gives the policy-correct next step with
the order number, and signs off. A base model answers in its own rambling style; a fine-tuned one
learns the house style, the policies, and to stop.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

INSTRUCTION = "Reply to the customer as Ava from Brightside Home support. Follow the store policy and keep it short."
NAMES = [
    "Maria",
    "James",
    "Aiko",
    "Omar",
    "Priya",
    "Lukas",
    "Chen",
    "Fatima",
    "Diego",
    "Grace",
    "Noah",
    "Sofia",
    "Kwame",
    "Elena",
    "Ravi",
    "Hannah",
    "Mateo",
    "Yuki",
    "Amara",
    "Jonas",
]
PRODUCTS = [
    "desk lamp",
    "bookshelf",
    "office chair",
    "duvet cover",
    "coffee table",
    "floor rug",
    "bedside table",
    "wall mirror",
    "kitchen stool",
    "curtain set",
    "storage bench",
    "ceramic vase",
]

ISSUES = {
    "late": (
        [
            "My {p} (order {o}) still hasn't arrived and it's been two weeks.",
            "Where is my order {o}? The {p} was due last Friday.",
            "Order {o} for a {p} is late. Can you check what is going on?",
        ],
        "I'm sorry your {p} is running late. I've asked the carrier to trace order {o} and you'll get an update by email within 24 hours.",
    ),
    "damaged": (
        [
            "The {p} from order {o} arrived with a cracked corner.",
            "My {p} came broken (order {o}). Very disappointed.",
            "Order {o}: the {p} was damaged in the box.",
        ],
        "I'm sorry your {p} arrived damaged. I've arranged a free replacement for order {o}; please keep the damaged item until the courier collects it.",
    ),
    "return": (
        [
            "Can I return the {p} from order {o}? It doesn't fit the room.",
            "I'd like to send back my {p}, order {o}.",
            "How do I return the {p} I bought (order {o})? Changed my mind.",
        ],
        "Of course: you can return the {p} within 30 days. I've emailed a prepaid return label for order {o}, and your refund follows once it reaches us.",
    ),
    "wrong": (
        [
            "I ordered a {p} but got something else entirely. Order {o}.",
            "Wrong item in order {o}: no {p} in the box.",
            "You sent me the wrong product instead of the {p} (order {o}).",
        ],
        "I'm sorry we sent the wrong item. I've shipped the correct {p} for order {o} today, and a return label for the wrong one is in your inbox.",
    ),
    "cancel": (
        [
            "Please cancel order {o}, I don't need the {p} anymore.",
            "Can I still cancel my {p}? Order number {o}.",
            "Cancel order {o} please (the {p}).",
        ],
        "No problem. Order {o} for the {p} is cancelled, and the full amount will be back on your card within 5 business days.",
    ),
}


def reply(name: str, template: str, product: str, order: str) -> str:
    return f"Hi {name},\n\n{template.format(p=product, o=order)}\n\nBest regards,\nAva, Brightside Home support"


def generate(n_train: int = 240, n_eval: int = 60, seed: int = 7) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n_train + n_eval:
        kind = rng.choice(sorted(ISSUES))
        asks, answer = ISSUES[kind]
        name, product, order = rng.choice(NAMES), rng.choice(PRODUCTS), f"#{rng.randint(10000, 99999)}"
        message = rng.choice(asks).format(p=product, o=order)
        if message in seen:
            continue
        seen.add(message)
        sign = rng.choice(["", f"\n{name}", f"\nThanks, {name}", f"\n- {name}"])
        rows.append(
            {
                "instruction": INSTRUCTION,
                "input": f"From: {name}\n{message}{sign}",
                "output": reply(name, answer, product, order),
            }
        )
    return rows[:n_train], rows[n_train:]


def main() -> None:
    here = Path(__file__).parent
    train, evaluation = generate()
    for name, rows in (("train.jsonl", train), ("eval.jsonl", evaluation)):
        with open(here / name, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        print(f"wrote {here / name} ({len(rows)} examples)")


if __name__ == "__main__":
    main()
