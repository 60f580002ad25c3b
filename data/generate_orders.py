"""Regenerate data/orders.jsonl, the embedded default's task: extract an order's fields as JSON.

Deterministic (seeded), so the shipped file can be checked: `python data/generate_orders.py`.
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


if __name__ == "__main__":
    out = Path(__file__).with_name("orders.jsonl")
    out.write_text("".join(json.dumps(r) + "\n" for r in make_rows(3000)))
    print(f"wrote {out}")
