"""Generate the reading-comprehension sample: answer a question about a short passage in one sentence.

    python samples/freetext/generate.py           # rewrites train.jsonl and test.jsonl beside this file

Task shape: free-text answers. Metric of interest: token F1 (SQuAD-style word overlap); exact match is
reported too but is harsh here, since a correct answer can be worded in more than one way.

The user pastes a 2-4 sentence passage about something made up (a festival, a gadget, a small town or an
animal species) and asks one question about it. The answer is one short sentence that takes its facts
from the passage; each question kind has one answer pattern, so the reference is deterministic, but the
fact has to be found in the passage: names, numbers and places are random, sentences come in two wordings
and in shuffled order, and the passage holds facts the question does not ask about. test.jsonl is a
hidden test set for `edgeft eval` only; its passages never occur in train.jsonl.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SYSTEM = "Answer the question using only the passage. Reply with one short sentence."
HEADS = ["Bram", "Cal", "Dun", "Elm", "Fen", "Gor", "Hal", "Kes", "Lor", "Mar", "Nor", "Pem", "Ros", "Tarn", "Vel"]
TAILS = ["ford", "by", "wick", "mere", "ton", "holt", "stead", "vale", "combe", "ness"]
PEOPLE = ["Ada Linwood", "Tomas Reyk", "Mina Okafor", "Jules Amberly", "Sora Kent", "Piet Vallen", "Rosa Ibarra"]
PEOPLE += ["Hugo Marsh", "Lena Dorsey", "Kai Brennan", "Nell Hartigan", "Omar Sefu", "Ivy Castell", "Bo Lindqvist"]
MONTHS = ["March", "April", "May", "June", "July", "August", "September", "October"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
COLORS = ["black", "white", "grey", "navy", "red", "green", "orange", "sand", "teal", "yellow"]


def place(rng: random.Random) -> str:
    return rng.choice(HEADS) + rng.choice(TAILS)


# Each kind: random facts, an intro sentence and other sentences (two wordings each), and questions as
# (phrasings, answer pattern, the key of the sentence that states the fact; None: the intro states it).
def festival(rng: random.Random) -> dict:
    return {
        "facts": {
            "name": f"{rng.choice(['Lantern', 'Kite', 'Salt', 'Ember', 'Apple', 'Reed', 'Cloud'])} "
            f"{rng.choice(['Festival', 'Fair', 'Gala', 'Night'])}",
            "town": place(rng),
            "month": rng.choice(MONTHS),
            "year": rng.randint(1890, 2015),
            "founder": rng.choice(PEOPLE),
            "job": rng.choice(["baker", "teacher", "fisherman", "librarian", "carpenter", "nurse"]),
            "n": f"{rng.randint(2, 60) * 500:,}",
            "highlight": rng.choice(
                ["a parade of paper boats", "a night-time choir", "a pie-eating contest", "a giant bonfire"]
            ),
        },
        "intro": ["The {name} is held every {month} in {town}.", "Every {month}, {town} hosts the {name}."],
        "sentences": {
            "founder": [
                "It was started in {year} by {founder}, a local {job}.",
                "{founder}, a {job}, founded it in {year}.",
            ],
            "n": ["Last year about {n} people attended.", "Around {n} visitors came last year."],
            "highlight": ["Its best-known event is {highlight}.", "Most visitors come for {highlight}."],
        },
        "questions": {
            "town": (["Where is the {name} held?", "Which town hosts the {name}?"], "It is held in {town}.", None),
            "month": (
                ["When does the {name} take place?", "In which month is the {name}?"],
                "It takes place every {month}.",
                None,
            ),
            "founder": (
                ["Who started the {name}?", "Who founded the {name}?"],
                "It was started by {founder}, a local {job}.",
                "founder",
            ),
            "year": (
                ["When was the {name} founded?", "In what year did the {name} begin?"],
                "It began in {year}.",
                "founder",
            ),
            "n": (
                ["How many people came last year?", "How big was the crowd last year?"],
                "About {n} people came last year.",
                "n",
            ),
            "highlight": (
                ["What do visitors come for?", "What is the {name} best known for?"],
                "It is best known for {highlight}.",
                "highlight",
            ),
        },
    }


def gadget(rng: random.Random) -> dict:
    return {
        "facts": {
            "name": f"{rng.choice(['Tallow', 'Quill', 'Arbor', 'Nimbus', 'Pebble', 'Vanta'])} "
            f"{rng.choice(['Mk2', 'One', 'Go', 'S', 'Pro', 'Lite'])}",
            "type": rng.choice(["head torch", "bike lamp", "pair of earbuds", "desk fan", "pocket radio"]),
            "company": rng.choice(["Holloway Labs", "Brightfern", "Okapi Works", "Strand & Lowe", "Minnow Audio"]),
            "city": place(rng),
            "w": rng.randint(6, 90) * 5,
            "c1": (colors := rng.sample(COLORS, 2))[0],
            "c2": colors[1],
            "h": rng.randint(4, 40),
            "price": f"${rng.randint(12, 180)}",
        },
        "intro": [
            "The {name} is a {type} made by {company} in {city}.",
            "{company}, based in {city}, makes the {name}, a {type}.",
        ],
        "sentences": {
            "w": [
                "It weighs {w} grams and comes in {c1} and {c2}.",
                "Available in {c1} and {c2}, it weighs {w} grams.",
            ],
            "h": ["Its battery lasts {h} hours on one charge.", "One charge gives {h} hours of use."],
            "price": ["It sells for {price}.", "The {name} costs {price} in shops."],
        },
        "questions": {
            "company": (
                ["Who makes the {name}?", "Which company produces the {name}?"],
                "It is made by {company} in {city}.",
                None,
            ),
            "type": (["What kind of product is the {name}?", "What is the {name}?"], "It is a {type}.", None),
            "w": (["How much does the {name} weigh?", "How heavy is it?"], "It weighs {w} grams.", "w"),
            "c1": (
                ["What colours does it come in?", "Which colours is the {name} sold in?"],
                "It comes in {c1} and {c2}.",
                "w",
            ),
            "h": (
                ["How long does the battery last?", "How many hours does one charge give?"],
                "The battery lasts {h} hours.",
                "h",
            ),
            "price": (["How much does the {name} cost?", "What is its price?"], "It costs {price}.", "price"),
        },
    }


def town(rng: random.Random) -> dict:
    return {
        "facts": {
            "name": place(rng),
            "river": rng.choice(["Wend", "Astle", "Morrow", "Tey", "Carrow", "Lune", "Sabbin"]),
            "pop": f"{rng.randint(8, 190) * 100:,}",
            "landmark": rng.choice(["Old Mill", "Clock House", "Guild Hall", "Corn Exchange", "Bell Tower"]),
            "year": rng.randint(1420, 1905),
            "industry": rng.choice(["fishing", "glassmaking", "wool weaving", "cheese making", "boat building"]),
            "day": rng.choice(DAYS),
        },
        "intro": [
            "{name} is a small town on the {river} River.",
            "The small town of {name} lies on the {river} River.",
        ],
        "sentences": {
            "pop": ["About {pop} people live there.", "It has roughly {pop} residents."],
            "landmark": [
                "Its best-known building is the {landmark}, built in {year}.",
                "The {landmark} there dates from {year}.",
            ],
            "industry": ["Most people in {name} work in {industry}.", "The main trade in {name} is {industry}."],
            "day": ["A market is held every {day}.", "Every {day} the square fills with market stalls."],
        },
        "questions": {
            "river": (
                ["Which river is {name} on?", "What river runs through {name}?"],
                "It lies on the {river} River.",
                None,
            ),
            "pop": (
                ["How many people live in {name}?", "What is the population of {name}?"],
                "About {pop} people live there.",
                "pop",
            ),
            "landmark": (
                ["What is the best-known building in {name}?", "Which landmark does {name} have?"],
                "Its best-known building is the {landmark}.",
                "landmark",
            ),
            "year": (
                ["When was the {landmark} built?", "How old is the {landmark}?"],
                "The {landmark} was built in {year}.",
                "landmark",
            ),
            "industry": (
                ["What do most people in {name} do for work?", "What is the main trade in {name}?"],
                "Most people there work in {industry}.",
                "industry",
            ),
            "day": (
                ["When is the market in {name}?", "On which day is the market held?"],
                "The market is held every {day}.",
                "day",
            ),
        },
    }


def animal(rng: random.Random) -> dict:
    return {
        "facts": {
            "name": f"{rng.choice(['striped', 'lesser', 'velvet', 'marsh', 'crested', 'pale'])} "
            f"{rng.choice(['dormle', 'quonk', 'brisket owl', 'fenwhistle', 'mooch', 'tarrow'])}",
            "kind": rng.choice(["rodent", "bird", "lizard", "frog", "beetle"]),
            "hills": place(rng),
            "food": rng.choice(["moss", "wild berries", "snails", "pine seeds", "beetle larvae", "clover"]),
            "time": rng.choice(["dawn", "dusk", "night", "midday"]),
            "size": rng.randint(3, 45),
            "color": rng.choice(["rust-brown", "silver-grey", "olive green", "pale yellow", "blue-black"]),
        },
        "intro": [
            "The {name} is a small {kind} found only in the {hills} hills.",
            "Found only in the {hills} hills, the {name} is a small {kind}.",
        ],
        "sentences": {
            "food": ["It feeds mainly on {food}.", "Its diet is mostly {food}."],
            "time": ["It is most active at {time}.", "It comes out mainly at {time}."],
            "size": [
                "Adults grow to about {size} centimetres long and are {color}.",
                "A grown {name} is {color} and about {size} centimetres long.",
            ],
        },
        "questions": {
            "hills": (
                ["Where does the {name} live?", "Where is the {name} found?"],
                "It is found only in the {hills} hills.",
                None,
            ),
            "kind": (["What kind of animal is the {name}?", "What is the {name}?"], "It is a small {kind}.", None),
            "food": (["What does the {name} eat?", "What is its main food?"], "It feeds mainly on {food}.", "food"),
            "time": (
                ["When is the {name} most active?", "At what time does it come out?"],
                "It is most active at {time}.",
                "time",
            ),
            "size": (
                ["How long do adults grow?", "How big is an adult {name}?"],
                "Adults grow to about {size} centimetres long.",
                "size",
            ),
            "color": (["What colour is the {name}?", "What colour are adults?"], "Adults are {color}.", "size"),
        },
    }


KINDS = [festival, gadget, town, animal]


def example(rng: random.Random) -> tuple[str, dict]:
    """(the passage, the whole example)."""
    spec = rng.choice(KINDS)(rng)
    facts = spec["facts"]
    phrasings, answer, needed = spec["questions"][rng.choice(sorted(spec["questions"]))]
    # Always the sentence with the answer, plus 0-2 others as distractors, in shuffled order.
    others = [key for key in spec["sentences"] if key != needed]
    chosen = rng.sample(others, rng.randint(1 if needed is None else 0, min(2, len(others))))
    chosen += [needed] if needed else []
    rng.shuffle(chosen)
    body = [rng.choice(spec["intro"])] + [rng.choice(spec["sentences"][key]) for key in chosen]
    passage = " ".join(s.format(**facts) for s in body)
    passage = passage[0].upper() + passage[1:]
    question = rng.choice(phrasings).format(**facts)
    user = rng.choice(["{p}\n\nQuestion: {q}", "Passage: {p}\nQuestion: {q}", "{p}\n\n{q}"]).format(
        p=passage, q=question
    )
    answer = answer.format(**facts)
    return passage, {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": user},
            {"role": "assistant", "content": answer[0].upper() + answer[1:]},
        ]
    }


def generate(n_train: int = 450, n_test: int = 100, seed: int = 17) -> tuple[list[dict], list[dict]]:
    """Train and test sets; no passage occurs in both."""
    rng = random.Random(seed)
    seen: set[str] = set()
    rows = []
    while len(rows) < n_train + n_test:
        passage, row = example(rng)
        if passage not in seen:
            seen.add(passage)
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
