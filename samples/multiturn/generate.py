"""Generate the café-order sample: a multi-turn chat whose last answer depends on the earlier turns.

    python samples/multiturn/generate.py          # rewrites train.jsonl and test.jsonl beside this file

Task shape: multi-turn chat (2-4 user turns); every assistant turn is trained. Metric of interest: exact
match of the final assistant answer.

The assistant takes pickup orders at the fictional Juniper Café. Over one to three turns the customer
gives their name, one or two menu items (with a size for drinks) and a pickup time, in any grouping;
the assistant acknowledges each fact in a fixed way. The last user turn asks something only the earlier
turns can answer: the order total (priced from the menu in the system prompt), the order read back in a
fixed format, the item count, the name or the pickup time, or a size change followed by the new total.
test.jsonl is a hidden test set for `edgeft eval` only (no conversation in it occurs in train.jsonl);
its last message is that dependent final answer.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DRINKS = {"latte": (4.0, 5.0), "mocha": (4.5, 5.5), "chai": (3.5, 4.5), "cold brew": (4.0, 4.5)}  # small, large
FOOD = {"croissant": 3.0, "bagel": 2.5, "muffin": 3.5, "scone": 2.0}
SYSTEM = (
    "You take pickup orders for Juniper Café. Drinks, small/large: "
    + ", ".join(f"{d} ${s:.2f}/${lg:.2f}" for d, (s, lg) in DRINKS.items())
    + ". Food: "
    + ", ".join(f"{f} ${p:.2f}" for f, p in FOOD.items())
    + ". Keep replies short."
)
NAMES = ["Priya", "Tom", "Aiko", "Omar", "Lena", "Diego", "Grace", "Kofi", "Mira", "Jonas", "Sana", "Felix"]
NAMES += ["Ines", "Ravi", "Hana", "Luca", "Nadia", "Owen", "Yara", "Theo", "Zoe", "Amir", "Elsa", "Noor"]
TIMES = [f"{h}:{m:02d}" for h in range(7, 12) for m in (0, 15, 30, 45)]
COUNT_WORDS = {1: ["a", "one", "1"], 2: ["two", "2"]}

# What the customer says for each kind of fact; {x} is the fact's text.
SAY_NAME = ["Hi, this is {x}.", "Hey, it's {x}.", "Name's {x}.", "Hi! Order for {x}, please.", "{x} here."]
SAY_FIRST_ITEM = ["Can I get {x}?", "I'd like {x}.", "{x}, please.", "I'll have {x}.", "Could I order {x}?"]
SAY_MORE_ITEM = ["And {x}.", "Also {x}, please.", "Add {x} too.", "Plus {x}.", "And can I get {x} as well?"]
SAY_TIME = ["I'll pick it up at {x}.", "Pickup at {x}.", "Ready by {x}, please.", "I'll come by at {x}.", "For {x}."]

# The last user turn: question kinds and their phrasings.
ASK = {
    "total": ["What's my total?", "How much is that?", "So what do I owe you?", "What does that come to?"],
    "repeat": [
        "Can you repeat my order?",
        "Read my order back, please.",
        "What did I order again?",
        "Confirm my order?",
    ],
    "count": ["How many items is that?", "How many things did I order?", "Item count?"],
    "name": ["What name is the order under?", "Which name did you put it under?", "Whose name is on it?"],
    "time": ["When is my pickup?", "What time did I say again?", "When should I come?"],
    "change": ["Actually, make the {d} {s}. What's the total now?", "Can the {d} be {s} instead? New total?"],
}
ASK_WEIGHTS = {"total": 3, "repeat": 3, "count": 1, "name": 1, "time": 1, "change": 2}


def price(line: dict) -> float:
    if line["item"] in DRINKS:
        return line["qty"] * DRINKS[line["item"]][line["size"] == "large"]
    return line["qty"] * FOOD[line["item"]]


def label(line: dict, qty_text: str | None = None) -> str:
    """'1 large latte', '2 croissants'; qty_text replaces the digit in what the customer says ('a', 'two')."""
    name = line["item"] + ("s" if line["qty"] > 1 else "")
    size = f"{line['size']} " if "size" in line else ""
    return f"{qty_text or line['qty']} {size}{name}"


def money(amount: float) -> str:
    return f"${amount:.2f}"


def random_order(rng: random.Random) -> list[dict]:
    """One or two distinct item lines; drinks carry a size."""
    lines = []
    for item in rng.sample(sorted(DRINKS) + sorted(FOOD), rng.choice([1, 2, 2])):
        line = {"item": item, "qty": rng.choice([1, 1, 2])}
        if item in DRINKS:
            line["size"] = rng.choice(["small", "large"])
        lines.append(line)
    return lines


def fact_turns(rng: random.Random, name: str, lines: list[dict], time: str) -> list[tuple[str, str]]:
    """The facts spread over 1-3 user turns, each with the assistant's fixed acknowledgement."""
    facts = [("name", name)] + [("item", line) for line in lines] + [("time", time)]
    n_turns = rng.randint(1, min(3, len(facts)))
    cuts = sorted(rng.sample(range(1, len(facts)), n_turns - 1))
    turns, has_items = [], False
    for start, end in zip([0, *cuts], [*cuts, len(facts)]):
        said, acks = [], []
        for kind, value in facts[start:end]:
            if kind == "name":
                said.append(rng.choice(SAY_NAME).format(x=value))
                acks.append(f"Hi {value}!")
            elif kind == "item":
                first = value is lines[0]
                spoken = label(value, rng.choice(COUNT_WORDS[value["qty"]]))
                said.append(rng.choice(SAY_FIRST_ITEM if first else SAY_MORE_ITEM).format(x=spoken))
                acks.append(f"Added {label(value)}.")
                has_items = True
            else:
                said.append(rng.choice(SAY_TIME).format(x=value))
                acks.append(f"Pickup at {value}.")
        # The prompt for more depends on whether anything was ordered yet.
        acks.append("Anything else?" if has_items else "What can I get you?")
        turns.append((" ".join(s[0].upper() + s[1:] for s in said), " ".join(acks)))
    return turns


def final_turn(rng: random.Random, name: str, lines: list[dict], time: str) -> tuple[str, str]:
    """The last question and the answer computed from the facts given earlier."""
    drinks = [line for line in lines if "size" in line]
    kinds = [k for k in ASK_WEIGHTS if k != "change" or drinks]
    kind = rng.choices(kinds, weights=[ASK_WEIGHTS[k] for k in kinds])[0]
    total = sum(price(line) for line in lines)
    if kind == "total":
        return rng.choice(ASK["total"]), f"Your total is {money(total)}."
    if kind == "repeat":
        items = ", ".join(label(line) for line in lines)
        return rng.choice(ASK["repeat"]), f"Order for {name}: {items}. Pickup at {time}. Total {money(total)}."
    if kind == "count":
        count = sum(line["qty"] for line in lines)
        return rng.choice(ASK["count"]), f"That's {count} item{'s' if count > 1 else ''}."
    if kind == "name":
        return rng.choice(ASK["name"]), f"It's under {name}."
    if kind == "time":
        return rng.choice(ASK["time"]), f"Your pickup is at {time}, {name}."
    # A size change: the new total needs the earlier items and the new size.
    drink = rng.choice(drinks)
    new_size = "small" if drink["size"] == "large" else "large"
    changed = [dict(line, size=new_size) if line is drink else line for line in lines]
    question = rng.choice(ASK["change"]).format(d=drink["item"], s=new_size)
    return (
        question,
        f"Done, the {drink['item']} is now {new_size}. Your new total is {money(sum(map(price, changed)))}.",
    )


def example(rng: random.Random) -> dict:
    name, lines, time = rng.choice(NAMES), random_order(rng), rng.choice(TIMES)
    messages = [{"role": "system", "content": SYSTEM}]
    for user, assistant in [*fact_turns(rng, name, lines, time), final_turn(rng, name, lines, time)]:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return {"messages": messages}


def generate(n_train: int = 380, n_test: int = 100, seed: int = 5) -> tuple[list[dict], list[dict]]:
    """Train and test sets; no conversation occurs twice."""
    rng = random.Random(seed)
    seen: set[str] = set()
    rows = []
    while len(rows) < n_train + n_test:
        row = example(rng)
        key = json.dumps(row["messages"][1:])
        if key not in seen:
            seen.add(key)
            rows.append(row)
    return rows[:n_train], rows[n_train:]


def main() -> None:
    here = Path(__file__).parent
    train, test = generate()
    for name, rows in (("train.jsonl", train), ("test.jsonl", test)):
        with open(here / name, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        print(f"wrote {here / name} ({len(rows)} examples)")


if __name__ == "__main__":
    main()
