"""The bundled demo preference set (`data.source: demo`), generated here and shipped as an asset.

Every prompt has one correct fact. The chosen answer says it as a cheerful pirate ("Arr! Th' capital
o' France be Paris, me hearty! Yo-ho-ho!"), the rejected answer says the same fact plainly, with a
stock assistant closing ("The capital of France is Paris. I hope this helps."). A small instruct model
starts out preferring the plain answer (it is more likely per token), and learns the style from a few
hundred pairs; because every family of prompts shares it, the preference carries over to unseen prompts,
and a person sees it at once in generated text: the tuned model talks like a pirate and signs off with
"Yo-ho-ho!".

Both answers have about the same length on purpose: SimPO averages log-probs over each response, so the
fact's tokens, present in both, would be pushed down when the rejected answer is much shorter.

Regenerate the asset with ``python -m simpo_lite.data.demo``; a test checks the shipped file matches.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

SEED = 2405
SIGN_OFF = "Yo-ho-ho!"
OPENERS = ["Arr!", "Ahoy!", "Avast!", "Yarr!", "Shiver me timbers!"]
ADDRESSES = ["matey", "me hearty", "me bucko", "ye landlubber"]
PLAIN_CLOSINGS = ["I hope this helps.", "Let me know if you have any other questions.",
                  "Is there anything else you would like to know?", "Feel free to ask if you need more help."]

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Canada": "Ottawa", "Mexico": "Mexico City", "Peru": "Lima", "Chile": "Santiago", "Norway": "Oslo",
    "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen", "Poland": "Warsaw",
    "Greece": "Athens", "Turkey": "Ankara", "Russia": "Moscow", "Ireland": "Dublin", "Austria": "Vienna",
    "Hungary": "Budapest", "Cuba": "Havana", "Argentina": "Buenos Aires", "Australia": "Canberra",
    "Thailand": "Bangkok", "Vietnam": "Hanoi", "South Korea": "Seoul", "Iran": "Tehran", "Iraq": "Baghdad",
    "Nigeria": "Abuja", "Ghana": "Accra", "Ethiopia": "Addis Ababa", "Morocco": "Rabat", "Belgium": "Brussels",
    "the Netherlands": "Amsterdam", "Switzerland": "Bern", "Czechia": "Prague", "Colombia": "Bogota",
    "Venezuela": "Caracas", "Indonesia": "Jakarta", "the Philippines": "Manila", "New Zealand": "Wellington",
}
COLOURS = {
    "a banana": "yellow", "grass": "green", "the sky on a clear day": "blue", "snow": "white", "coal": "black",
    "a ripe tomato": "red", "an orange": "orange", "a lemon": "yellow", "a lime": "green", "milk": "white",
    "a strawberry": "red", "a carrot": "orange", "a crow": "black", "a polar bear": "white", "blood": "red",
    "an emerald": "green", "a sapphire": "blue", "a ruby": "red", "chocolate": "brown", "a pumpkin": "orange",
    "a flamingo": "pink", "an eggplant": "purple", "a fire truck": "red", "a school bus": "yellow",
    "a frog": "green", "the sun": "yellow", "a cloud": "white", "soil": "brown", "a raven": "black",
    "a blueberry": "blue", "a pine tree": "green", "a swan": "white", "a cherry": "red", "ink": "black",
}
SOUNDS = {
    "cow": "moo", "dog": "woof", "cat": "meow", "duck": "quack", "sheep": "baa", "pig": "oink",
    "horse": "neigh", "lion": "roar", "owl": "hoot", "snake": "hiss", "rooster": "cock-a-doodle-doo",
    "frog": "ribbit", "bee": "buzz", "mouse": "squeak", "goat": "bleat", "donkey": "hee-haw",
    "crow": "caw", "wolf": "howl", "turkey": "gobble", "dove": "coo",
}
LEGS = {
    "spider": "eight", "dog": "four", "cat": "four", "chicken": "two", "ant": "six", "bee": "six",
    "horse": "four", "duck": "two", "crab": "ten", "octopus": "eight", "cow": "four", "beetle": "six",
    "ostrich": "two", "lobster": "ten", "mouse": "four", "snake": "no",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "up": "down", "fast": "slow", "day": "night", "happy": "sad",
    "light": "dark", "open": "closed", "full": "empty", "old": "young", "wet": "dry", "loud": "quiet",
    "hard": "soft", "early": "late", "strong": "weak", "rich": "poor", "high": "low", "near": "far",
    "inside": "outside", "first": "last", "heavy": "light", "true": "false", "win": "lose", "push": "pull",
    "begin": "end", "left": "right", "thick": "thin", "clean": "dirty", "cheap": "expensive",
    "friend": "enemy", "north": "south", "east": "west", "long": "short", "sweet": "sour",
}
DEFINITIONS = {
    "ocean": "a huge body of salt water", "island": "a piece of land with water all around it",
    "river": "a long stream of fresh water that flows to the sea", "mountain": "a very high hill",
    "desert": "a dry place with very little rain", "forest": "a large area covered with trees",
    "volcano": "a mountain that can erupt with hot lava", "planet": "a large body that moves around a star",
    "library": "a place where people borrow books", "bakery": "a shop that makes and sells bread",
    "map": "a drawing that shows where places are", "compass": "a tool that shows which way is north",
    "anchor": "a heavy weight that keeps a ship in place", "harbor": "a safe place for ships near the shore",
    "telescope": "a tool that makes far things look close", "calendar": "a chart of the days of the year",
    "thermometer": "a tool that measures temperature", "bridge": "a road built over water or a gap",
    "glacier": "a slow river of ice", "orchard": "a field of fruit trees", "pilot": "a person who flies a plane",
    "chef": "a person who cooks in a restaurant", "doctor": "a person who helps sick people get well",
    "farmer": "a person who grows crops or raises animals", "poem": "a piece of writing with rhythm",
    "recipe": "a list of steps for cooking a dish", "umbrella": "a cover that keeps the rain off",
    "clock": "a tool that shows the time", "ladder": "a set of steps for climbing up",
    "treasure": "a store of gold, jewels or other riches",
}
PLURALS = {
    "mouse": "mice", "child": "children", "foot": "feet", "tooth": "teeth", "goose": "geese",
    "man": "men", "woman": "women", "person": "people", "leaf": "leaves", "knife": "knives",
    "wolf": "wolves", "box": "boxes", "bus": "buses", "city": "cities", "baby": "babies",
    "fish": "fish", "sheep": "sheep", "cactus": "cacti", "ox": "oxen", "potato": "potatoes",
    "hero": "heroes", "half": "halves", "wife": "wives", "church": "churches", "party": "parties",
}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
FACTS = [
    ("How many days are in a week?", "There are seven days in a week."),
    ("How many months are in a year?", "There are twelve months in a year."),
    ("How many hours are in a day?", "There are twenty-four hours in a day."),
    ("How many minutes are in an hour?", "There are sixty minutes in an hour."),
    ("How many seconds are in a minute?", "There are sixty seconds in a minute."),
    ("How many sides does a triangle have?", "A triangle has three sides."),
    ("How many sides does a square have?", "A square has four sides."),
    ("How many sides does a hexagon have?", "A hexagon has six sides."),
    ("How many continents are there?", "There are seven continents."),
    ("What is the largest ocean on Earth?", "The largest ocean on Earth is the Pacific Ocean."),
    ("What is the closest star to Earth?", "The closest star to Earth is the Sun."),
    ("What do bees make?", "Bees make honey."),
    ("At what temperature does water freeze in Celsius?", "Water freezes at zero degrees Celsius."),
    ("At what temperature does water boil in Celsius?", "Water boils at one hundred degrees Celsius."),
    ("Which planet is known as the Red Planet?", "The Red Planet is Mars."),
    ("What is the largest planet in our solar system?", "The largest planet in our solar system is Jupiter."),
    ("What gas do plants take in from the air?", "Plants take in carbon dioxide from the air."),
    ("How many letters are in the English alphabet?", "There are twenty-six letters in the English alphabet."),
    ("What is frozen water called?", "Frozen water is called ice."),
    ("What do caterpillars turn into?", "Caterpillars turn into butterflies or moths."),
]
NUMBER_WORDS = {"plus": "+", "minus": "-", "times": "x"}

# Plain English to pirate English, applied word by word.
PIRATE_WORDS = [(r"\bis\b", "be"), (r"\bare\b", "be"), (r"\bof\b", "o'"), (r"\byou\b", "ye"),
                (r"\bmy\b", "me"), (r"\bhas\b", "has got"),
                (r"\bthe\b", "th'"), (r"\bThe\b", "Th'")]


def piratify(sentence: str) -> str:
    for pattern, replacement in PIRATE_WORDS:
        sentence = re.sub(pattern, replacement, sentence)
    return sentence


def pirate_answer(plain: str, rng: random.Random) -> str:
    """The plain sentence, in a cheerful pirate voice, ending with the fixed sign-off."""
    return f"{rng.choice(OPENERS)} {piratify(plain.rstrip('.'))}, {rng.choice(ADDRESSES)}! {SIGN_OFF}"


def plain_answer(plain: str, rng: random.Random) -> str:
    return f"{plain} {rng.choice(PLAIN_CLOSINGS)}"


def _arithmetic(rng: random.Random) -> list[tuple[str, str, str]]:
    items = set()
    while len(items) < 180:
        op = rng.choice(["plus", "minus", "times"])
        a, b = (rng.randint(2, 12), rng.randint(2, 12)) if op == "times" else (rng.randint(1, 50), rng.randint(1, 50))
        if op == "minus" and b > a:
            a, b = b, a
        items.add((op, a, b))
    out = []
    for op, a, b in sorted(items):
        c = {"plus": a + b, "minus": a - b, "times": a * b}[op]
        prompt = rng.choice([f"What is {a} {op} {b}?", f"What is {a} {NUMBER_WORDS[op]} {b}?",
                             f"Can you work out {a} {op} {b}?", f"How much is {a} {op} {b}?"])
        out.append(("arithmetic", prompt, f"{a} {op} {b} is {c}."))
    return out


def _families(rng: random.Random) -> list[tuple[str, str, str]]:
    """(family, prompt, plain answer) for every demo prompt."""
    rows = _arithmetic(rng)
    for country, city in CAPITALS.items():
        prompt = rng.choice([f"What is the capital of {country}?", f"Which city is the capital of {country}?",
                             f"Name the capital city of {country}."])
        rows.append(("capitals", prompt, f"The capital of {country} is {city}."))
    for thing, colour in COLOURS.items():
        rows.append(("colours", rng.choice([f"What colour is {thing}?", f"What color is {thing}?"]),
                     f"{thing[0].upper() + thing[1:]} is {colour}."))
    for animal, sound in SOUNDS.items():
        rows.append(("animal sounds", f"What sound does a {animal} make?", f"A {animal} says {sound}."))
    for animal, legs in LEGS.items():
        rows.append(("legs", f"How many legs does a {animal} have?", f"A {animal} has {legs} legs."))
    for word, opposite in OPPOSITES.items():
        rows.append(("opposites", rng.choice([f"What is the opposite of {word}?", f"What is the opposite of '{word}'?"]),
                     f"The opposite of {word} is {opposite}."))
    for word, meaning in DEFINITIONS.items():
        article = "an" if word[0] in "aeiou" else "a"
        rows.append(("definitions", rng.choice([f"What is {article} {word}?", f"Define the word '{word}'."]),
                     f"{article.capitalize()} {word} is {meaning}."))
    for word, plural in PLURALS.items():
        rows.append(("plurals", f"What is the plural of {word}?", f"The plural of {word} is {plural}."))
    for seq, unit in ((DAYS, "day"), (MONTHS, "month")):
        for i, name in enumerate(seq):
            rows.append(("calendar", f"What {unit} comes after {name}?",
                         f"The {unit} after {name} is {seq[(i + 1) % len(seq)]}."))
    for n in rng.sample(range(1, 200), 60):
        rows.append(("counting", f"What number comes after {n}?", f"The number after {n} is {n + 1}."))
    for _ in range(50):
        a, b = rng.sample(range(1, 1000), 2)
        rows.append(("comparisons", f"Which is bigger, {a} or {b}?", f"{max(a, b)} is bigger than {min(a, b)}."))
    rows += [("facts", prompt, answer) for prompt, answer in FACTS]
    return rows


def generate_demo_rows(seed: int = SEED) -> list[dict]:
    """The demo pairs, shuffled; each prompt appears once so a held-out split has only unseen prompts."""
    rng = random.Random(seed)
    seen, rows = set(), []
    for family, prompt, plain in _families(rng):
        if prompt not in seen:
            seen.add(prompt)
            rows.append({"prompt": prompt, "chosen": pirate_answer(plain, rng), "rejected": plain_answer(plain, rng),
                         "family": family})
    rng.shuffle(rows)
    return rows


def render_jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def main() -> None:
    from simpo_lite.data.sources import demo_path

    path: Path = demo_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = generate_demo_rows()
    path.write_text(render_jsonl(rows), encoding="utf-8")
    print(f"wrote {len(rows)} pairs to {path}")


if __name__ == "__main__":
    main()
