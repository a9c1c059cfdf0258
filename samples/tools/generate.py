"""Generate the smart-home tool-calling sample: pick the right function and fill in its arguments.

    python samples/tools/generate.py              # rewrites train.jsonl and test.jsonl beside this file

Task shape: function calling in OpenAI's chat fine-tuning format (a top-level "tools" list, assistant
"tool_calls" with JSON-string arguments, "tool" results). Metric of interest: exact match of the last
assistant message, the tool call(s) or the short text answer.

"Nook", the assistant of a fictional smart flat, has three tools: lights, heating and room sensors. Mix:
about 65% one call, 15% no tool needed (a fixed one-sentence reply), 10% two steps (read a sensor, get the
tool's JSON result, answer in one sentence built from it) and 10% two parallel calls in one turn. Call ids
count up inside each example ("call_1", "call_2") so they are predictable. test.jsonl is a hidden test set
for `edgeft eval` only: none of its user requests occurs in train.jsonl, its no-tool requests use held-back
phrasings, and its two-step examples end on the final text answer after the tool result.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SYSTEM = "You are Nook, a smart-home assistant. Use the tools to act."
ROOMS = ["kitchen", "bedroom", "lounge", "bathroom", "office"]


def tool(name: str, description: str, properties: dict, required: list[str]) -> dict:
    params = {"type": "object", "properties": properties, "required": required}
    return {"type": "function", "function": {"name": name, "description": description, "parameters": params}}


# Kept small on purpose: the tool list is repeated in every example and dominates its token count.
TOOLS = [
    tool(
        "set_light",
        "Switch or dim a room light.",
        {"room": {"type": "string", "enum": ROOMS}, "on": {"type": "boolean"}, "brightness": {"type": "integer"}},
        ["room", "on"],
    ),
    tool(
        "set_heating",
        "Set the target temperature.",
        {"celsius": {"type": "number"}, "mode": {"type": "string", "enum": ["heat", "eco"]}},
        ["celsius"],
    ),
    tool(
        "read_sensor",
        "Read a room sensor.",
        {"room": {"type": "string", "enum": ROOMS}, "kind": {"type": "string", "enum": ["temperature", "humidity"]}},
        ["room", "kind"],
    ),
]

# User phrasings per intent. Slots: {r} room, {r2} second room, {b} brightness, {t} celsius, {m} mode.
ASKS = {
    "on": ["turn on the {r} light", "lights on in the {r}", "can you switch the {r} light on", "{r} light on"],
    "off": ["turn off the {r} light", "switch the {r} lights off", "kill the light in the {r}", "{r} light off"],
    "dim": ["dim the {r} light to {b}%", "set the {r} lights to {b} percent", "{r} brightness {b}%", "{r} to {b}%"],
    "heat": ["set the heating to {t} degrees", "make it {t}°C in here", "heating to {t}", "I'd like {t} degrees"],
    "heat_mode": ["put the heating on {m} at {t} degrees", "heating {m} mode, {t}°C", "{m} heating, target {t}"],
    "temp": ["how warm is it in the {r}", "what's the temperature in the {r}", "is the {r} cold right now"],
    "hum": ["how humid is the {r}", "what's the humidity in the {r}", "check the {r} humidity"],
    "two_lights": ["turn {s} the {r} and {r2} lights", "switch {s} the lights in the {r} and the {r2}"],
    "light_heat": ["{r} light on and heating to {t}", "switch on the {r} light and set the heating to {t}"],
}
OPENERS = ["", "", "Nook, ", "Hey, ", "Ok, "]
CLOSERS = ["", ".", ", please.", " thanks", "!"]

# Requests that need no tool: phrasings (the last two are held back for the test set) -> the one fixed reply.
NO_TOOL = [
    (
        ["Thanks!", "Thank you, Nook.", "Cheers, that's all.", "Perfect, thanks a lot.", "Great, thank you!"],
        "You're welcome!",
    ),
    (
        ["Hi Nook", "Hello there", "Good morning, Nook!", "Hey, are you awake?", "Evening, Nook."],
        "Hi! What should I do?",
    ),
    (
        [
            "What can you do?",
            "What are you able to control?",
            "Help: what are your features?",
            "What do you do?",
            "Help",
        ],
        "I can switch and dim lights, set the heating, and read room sensors.",
    ),
    (
        [
            "Order me a {food}.",
            "Play some {music} music.",
            "What's the weather in {city} tomorrow?",
            "Unlock the {door} door.",
            "Book a table at {food} place tonight.",
            "Find me a flight to {city}.",
        ],
        "Sorry, I can only control the lights, heating and sensors in your flat.",
    ),
]
FILLERS = {
    "food": ["pizza", "curry", "sushi", "burger", "noodle", "taco"],
    "music": ["jazz", "rock", "piano", "folk", "disco"],
    "city": ["Lisbon", "Oslo", "Cairo", "Lima", "Perth", "Quebec"],
    "door": ["front", "back", "garage"],
}


def call(index: int, name: str, args: dict) -> dict:
    return {"id": f"call_{index}", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


def ask(rng: random.Random, intent: str, **slots: object) -> str:
    """A user request: a phrasing of the intent, with an optional opener and closer for variety."""
    text = rng.choice(OPENERS) + rng.choice(ASKS[intent]).format(**slots) + rng.choice(CLOSERS)
    return text[0].upper() + text[1:]


def single(rng: random.Random) -> tuple[str, list[dict]]:
    """One request and the single call it needs."""
    r, b = rng.choice(ROOMS), rng.choice(range(10, 95, 5))
    t, m = rng.choice([17, 18, 19, 19.5, 20, 20.5, 21, 21.5, 22, 23]), rng.choice(["heat", "eco"])
    intent = rng.choice(["on", "off", "dim", "dim", "heat", "heat_mode", "temp", "hum"])
    text = ask(rng, intent, r=r, b=b, t=t, m=m)
    if intent in ("on", "off"):
        return text, [call(1, "set_light", {"room": r, "on": intent == "on"})]
    if intent == "dim":
        return text, [call(1, "set_light", {"room": r, "on": True, "brightness": b})]
    if intent == "heat":
        return text, [call(1, "set_heating", {"celsius": t})]
    if intent == "heat_mode":
        return text, [call(1, "set_heating", {"celsius": t, "mode": m})]
    return text, [call(1, "read_sensor", {"room": r, "kind": "temperature" if intent == "temp" else "humidity"})]


def parallel(rng: random.Random) -> tuple[str, list[dict]]:
    """One request that needs two independent calls, in the order the user names them."""
    r, r2 = rng.sample(ROOMS, 2)
    if rng.random() < 0.6:
        s = rng.choice(["on", "off"])
        calls = [
            call(1, "set_light", {"room": r, "on": s == "on"}),
            call(2, "set_light", {"room": r2, "on": s == "on"}),
        ]
        return ask(rng, "two_lights", r=r, r2=r2, s=s), calls
    t = rng.choice([19, 20, 21, 22])
    calls = [call(1, "set_light", {"room": r, "on": True}), call(2, "set_heating", {"celsius": t})]
    return ask(rng, "light_heat", r=r, t=t), calls


def two_step(rng: random.Random) -> tuple[str, dict, str, str]:
    """A sensor question, its call, the tool's JSON result and the answer built from the result."""
    r = rng.choice(ROOMS)
    if rng.random() < 0.5:
        value = round(rng.uniform(15.0, 26.0), 1)
        text, kind, result = ask(rng, "temp", r=r), "temperature", {"room": r, "celsius": value}
        answer = f"It's {value} °C in the {r}."
    else:
        value = rng.randint(25, 75)
        text, kind, result = ask(rng, "hum", r=r), "humidity", {"room": r, "humidity_pct": value}
        answer = f"The {r} is at {value}% humidity."
    return text, call(1, "read_sensor", {"room": r, "kind": kind}), json.dumps(result), answer


def example(rng: random.Random, kind: str, test: bool) -> tuple[str, dict]:
    """(the user's request, the whole example) for one of the four example kinds."""
    messages = [{"role": "system", "content": SYSTEM}]
    row: dict = {"messages": messages}
    if kind == "none":
        phrasings, reply = rng.choice(NO_TOOL)
        template = rng.choice(phrasings[-2:] if test else phrasings[:-2])
        text = template.format(**{slot: rng.choice(values) for slot, values in FILLERS.items()})
        messages += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
    elif kind == "two_step":
        text, first, result, answer = two_step(rng)
        messages += [
            {"role": "user", "content": text},
            {"role": "assistant", "content": None, "tool_calls": [first]},
            {"role": "tool", "tool_call_id": first["id"], "content": result},
            {"role": "assistant", "content": answer},
        ]
    else:
        text, calls = parallel(rng) if kind == "parallel" else single(rng)
        messages += [{"role": "user", "content": text}, {"role": "assistant", "content": None, "tool_calls": calls}]
        if kind == "parallel":
            row["parallel_tool_calls"] = True
    row["tools"] = TOOLS
    return text, row


def kinds(rng: random.Random, n: int) -> list[str]:
    """The example kinds in the 65/15/10/10 mix, shuffled."""
    counts = {"none": round(n * 0.15), "two_step": round(n * 0.10), "parallel": round(n * 0.10)}
    mix = [kind for kind, count in counts.items() for _ in range(count)]
    mix += ["single"] * (n - len(mix))
    rng.shuffle(mix)
    return mix


def generate(n_train: int = 210, n_test: int = 100, seed: int = 11) -> tuple[list[dict], list[dict]]:
    """Train and test sets. Tool requests are unique across both; the short no-tool ones may repeat in train."""
    rng = random.Random(seed)
    seen: set[str] = set()
    splits = []
    for n, test in ((n_train, False), (n_test, True)):
        rows = []
        for kind in kinds(rng, n):
            text, row = example(rng, kind, test)
            while text in seen and (kind != "none" or test):
                text, row = example(rng, kind, test)
            seen.add(text)
            rows.append(row)
        splits.append(rows)
    return splits[0], splits[1]


def main() -> None:
    here = Path(__file__).parent
    train, test = generate()
    for name, rows in (("train.jsonl", train), ("test.jsonl", test)):
        with open(here / name, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        print(f"wrote {here / name} ({len(rows)} examples)")


if __name__ == "__main__":
    main()
