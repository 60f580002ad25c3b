"""Regenerate data/orders.jsonl, the embedded default's task: extract an order's fields as JSON, and
data/orders-preference.jsonl, preference pairs for the same task (prompt, chosen = the right JSON,
rejected = a near miss: one wrong field, a missing field, or JSON that does not parse).

Deterministic (seeded), so the shipped files can be checked: `python data/generate_orders.py`.
Scored by exact match of the JSON and by field-level accuracy.
"""
import json
import random
from pathlib import Path

NAMES = ["Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Irene", "Jack",
         "Karen", "Liam", "Maria", "Noah", "Olivia", "Peter", "Quinn", "Rosa", "Sam", "Tara",
         "Umar", "Vera", "Walter", "Xenia", "Yusuf", "Zoe", "Hugo", "Nina", "Oscar", "Lena"]
CITIES = ["Paris", "Berlin", "Madrid", "Rome", "Vienna", "Oslo", "Dublin", "Lisbon", "Prague",
          "Warsaw", "Athens", "Boston", "Denver", "Austin", "Seattle", "Chicago", "Toronto",
          "Lima", "Cairo", "Delhi", "Tokyo", "Seoul", "Sydney", "Quebec"]
ITEMS = ["apples", "books", "chairs", "lamps", "pencils", "shirts", "tickets", "cables", "plates",
         "candles", "bottles", "gloves", "maps", "boxes", "tables", "clocks", "cups", "bags"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
TEMPLATES = [
    "{name} from {city} ordered {qty} {item} on {day}.",
    "On {day}, {name} bought {qty} {item} in {city}.",
    "{qty} {item} were ordered by {name} ({city}) on {day}.",
    "Please send {qty} {item} to {name} in {city} by {day}.",
    "{name} in {city} wants {qty} {item}, delivered {day}.",
    "Order for {name}: {qty} {item}, city {city}, day {day}.",
]
INSTRUCTION = "Extract name, city, item, qty and day as JSON."


def make_rows(n: int, seed: int = 1234) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        f = {"name": rng.choice(NAMES), "city": rng.choice(CITIES), "item": rng.choice(ITEMS),
             "qty": rng.randint(1, 99), "day": rng.choice(DAYS)}
        sentence = rng.choice(TEMPLATES).format(**f)
        rows.append({"prompt": f"{INSTRUCTION}\n{sentence}", "completion": json.dumps(f)})
    return rows


def near_miss(fields: dict, rng: random.Random) -> str:
    """An answer a model could plausibly give that is wrong: one field changed, one dropped, or broken JSON."""
    kind = rng.choice(["wrong-field", "wrong-field", "missing-field", "invalid-json"])
    wrong = dict(fields)
    if kind == "wrong-field":
        key = rng.choice(list(fields))
        pool = {"name": NAMES, "city": CITIES, "item": ITEMS, "day": DAYS}.get(key)
        wrong[key] = rng.choice([v for v in pool if v != fields[key]]) if pool else fields[key] + rng.choice([-1, 1, 10])
        return json.dumps(wrong)
    if kind == "missing-field":
        del wrong[rng.choice(list(fields))]
        return json.dumps(wrong)
    text = json.dumps(fields)
    return rng.choice([text[:-1], text.replace('"', "'"), text.replace(", ", " ", 1)])


def make_pairs(n: int, seed: int = 5678) -> list[dict]:
    rng = random.Random(seed)
    pairs = []
    for row in make_rows(n, seed):
        fields = json.loads(row["completion"])
        pairs.append({"prompt": row["prompt"], "chosen": row["completion"], "rejected": near_miss(fields, rng)})
    return pairs


if __name__ == "__main__":
    for name, records in (("orders.jsonl", make_rows(3000)), ("orders-preference.jsonl", make_pairs(600))):
        out = Path(__file__).with_name(name)
        out.write_text("".join(json.dumps(r) + "\n" for r in records))
        print(f"wrote {out}")
