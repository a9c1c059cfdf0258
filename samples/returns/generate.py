"""Generate the returns-desk preference sample: supervised data with the desk's old mistakes, then
preference pairs that correct them (DPO).

    python samples/returns/generate.py      # rewrites train.jsonl, preferences.jsonl and test.jsonl beside this file

Task shape: a policy the history does not keep. Customers of the fictional Brightside Home ask for a
refund; the order line names the item and marks final-sale items. The policy: final-sale items are
not refunded, everything else is. Metric of interest: exact match with the policy's answer, and how
often the model scores the policy's answer above the other.

- train.jsonl (chat, 300): the desk's past replies. Half the requests are for final-sale items, and
  on 60% of those the desk refunded anyway: supervised fine-tuning learns the habit with the policy.
- preferences.jsonl (OpenAI's preference format, 160): a reviewer's corrections. For a request the
  policy's reply is preferred and the other not: 110 final-sale requests (decline preferred over
  refund) and 50 others (refund preferred over decline, so the lesson is the policy, not "decline").
- test.jsonl (OpenAI's preference format, 100, half final sale): a hidden test set for `edgeft eval`
  only; items and customers drawn from halves the other files never use.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SYSTEM = (
    "You are the Brightside Home returns desk. Policy: items marked FINAL SALE are not refunded; every "
    "other item is refunded. Reply in one sentence."
)
ITEMS = [
    "floor rug", "bedside table", "desk lamp", "bath towel set", "wall mirror", "office chair", "curtain pair",
    "coffee table", "bookshelf", "duvet cover", "kitchen scale", "plant pot", "throw blanket", "shoe rack",
    "picture frame", "table runner", "storage basket", "floor cushion", "mantel clock", "serving tray",
]  # fmt: skip
NAMES = ["Amara", "Omar", "Priya", "Lukas", "Mei", "Tomas", "Fatima", "Jonah", "Ines", "Kwame", "Sofia", "Ravi"]
ASKS = [
    "I'd like a refund for my {item}.",
    "Please refund the {item}, it isn't what I expected.",
    "Can I get my money back for the {item}?",
    "The {item} doesn't fit our room. Refund please.",
    "I want to return the {item} for a refund.",
    "Changed my mind about the {item}, can you refund it?",
]
SALE_RATE = 0.5  # of requests: for a final-sale item
HABIT = 0.6  # of the desk's past final-sale replies: refunded anyway


def request(rng: random.Random, test: bool, final_sale: bool) -> tuple[list[dict], str, str]:
    """(the prompt's messages, the policy's reply, the other reply) for one refund request."""
    item = rng.choice(ITEMS[int(test) :: 2])  # the test set's items and names: the other half
    name = rng.choice(NAMES[int(test) :: 2])
    order = str(rng.randint(10000, 99999))
    line = f"Order #{order}: {item}" + (" (FINAL SALE)" if final_sale else "")
    user = f"From: {name}\n{line}\n{rng.choice(ASKS).format(item=item)}"
    refund = f"Hi {name}, your refund for the {item} (order #{order}) is approved."
    decline = f"Hi {name}, the {item} (order #{order}) was a final-sale item, so it cannot be refunded."
    prompt = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
    return (prompt, decline, refund) if final_sale else (prompt, refund, decline)


def pair(prompt: list[dict], preferred: str, other: str) -> dict:
    return {
        "input": {"messages": prompt},
        "preferred_output": [{"role": "assistant", "content": preferred}],
        "non_preferred_output": [{"role": "assistant", "content": other}],
    }


def generate(seed: int = 7) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    train = []
    for i in range(300):
        final_sale = i % 2 == 0
        prompt, right, wrong = request(rng, False, final_sale)
        answer = wrong if final_sale and rng.random() < HABIT else right
        train.append({"messages": [*prompt, {"role": "assistant", "content": answer}]})
    preferences = [pair(*request(rng, False, i < 110)) for i in range(160)]
    test = [pair(*request(rng, True, i % 2 == 0)) for i in range(100)]
    for rows in (train, preferences, test):
        rng.shuffle(rows)
    return {"train.jsonl": train, "preferences.jsonl": preferences, "test.jsonl": test}


def main() -> None:
    here = Path(__file__).parent
    for name, rows in generate().items():
        with open(here / name, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        print(f"wrote {here / name} ({len(rows)} examples)")


if __name__ == "__main__":
    main()
