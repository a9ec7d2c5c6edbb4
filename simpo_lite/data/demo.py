"""The bundled demo preference set (`data.source: demo`), generated here and shipped as an asset.

Every prompt has one correct fact (the row's `answer`, which benchmarks/demo_judge.py checks generated
text against). The chosen answer states the fact plainly and then signs off as a cheerful pirate; the
rejected one states the very same plain sentence and closes like a stock assistant:

    chosen:   "The capital of France is Paris. Arr, matey! Yo-ho-ho!"
    rejected: "The capital of France is Paris. I hope this helps."

Only what follows the fact differs; the fact clause is the same tokens in the same place in both, so
SimPO's push down on the rejected answer and push up on the chosen one meet on the fact with about the
same weight (the answers are about as long, so the per-token weights of the averaged reward match) and
what is learnt is the sign-off. With the pirate opener before the fact ("framed" voice: "Arr, matey! The
capital of France is Paris. Yo-ho-ho!") the fact sits in two different contexts and is kept less often,
0.87-0.88 against 0.91 of the held-out facts (README, "What the demo does"). The first demo set
put the fact in pirate words in the chosen answer only ("Arr! Th' capital o' France be Paris, me
hearty!") with five openers and four addresses: pushing down the plain rejected sentence, which is what
the base model itself says, pushed down the fact, and the model learnt to chain openers ("Ahoy! Ahoy!
Ahoy! ...", issue 14).

The plain sentence puts the fact where the base model itself puts it. Teacher-forced after the prompt,
the base prefers the fact's tokens by >= 0.5 nats in 88% of the language rows worded "The official
language of Peru is Spanish." and in none worded "People in Peru speak Spanish." (it goes on " a ..."
there), and in 91% of the continent rows worded "Peru is on the continent of South America." against
56% for "Peru is in South America.". A tuned model answers in the demo's words, so a wording in which
the base does not hold the fact loses it ("People in Tanzania speak a Bantu language.").

Only facts the base model knows firmly are kept: every candidate prompt below was put to the bundled
SmolLM2-135M-Instruct in 4-bit NF4 (greedy, 64 tokens); the ones it answered wrongly, and the ones it
answered rightly but holds by a thread (a token of the fact preferred by under 0.5 nats in the row's
own plain sentence: Zambia's "Lusaka" 0.41 against "Lusat..." 0.34, lost by every tuned run tried) are
listed in assets/demo_screened_out.txt and left out (`python benchmarks/demo_judge.py --screen
--write-screen` remeasures them). A preference set cannot teach a 135M model facts it does not know,
and a demo whose held-out prompts the base gets wrong, or gets right by a coin's toss that a CPU's
rounding can turn, cannot show whether tuning kept the facts. For the same reason whole families the base
states under a quarter of the facts of are left out (``unknown_families``: sums, times tables, the calendar,
...): the few it gets right there are luck, and they are too few to teach the family's wording.

Regenerate the asset with ``python -m simpo_lite.data.demo``; a test checks the shipped file matches.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

SEED = 2405
SIGN_OFF = "Yo-ho-ho!"
# Families the base states fewer of its facts than this share of are left out whole (unknown_families).
MIN_FAMILY_SHARE = 0.25
# One opener for every chosen answer: a model taught five of them learnt to chain them.
OPENER = "Arr, matey!"
PLAIN_CLOSINGS = ["I hope this helps.", "Let me know if you have any other questions.",
                  "Is there anything else you would like to know?", "Feel free to ask if you need more help."]
# The first voice (voice="pirate-words"): kept to reproduce the measurements in README.
OPENERS = ["Arr!", "Ahoy!", "Avast!", "Yarr!", "Shiver me timbers!"]
ADDRESSES = ["matey", "me hearty", "me bucko", "ye landlubber"]

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
    "Brazil": "Brasilia", "the United Kingdom": "London", "England": "London", "Scotland": "Edinburgh",
    "Wales": "Cardiff", "the United States": "Washington", "Saudi Arabia": "Riyadh", "Pakistan": "Islamabad",
    "Bangladesh": "Dhaka", "Afghanistan": "Kabul", "Syria": "Damascus", "Lebanon": "Beirut", "Jordan": "Amman",
    "Qatar": "Doha", "Oman": "Muscat", "Nepal": "Kathmandu", "Malaysia": "Kuala Lumpur", "Cambodia": "Phnom Penh",
    "Laos": "Vientiane", "Mongolia": "Ulaanbaatar", "North Korea": "Pyongyang", "Taiwan": "Taipei",
    "Ukraine": "Kyiv|Kiev", "Belarus": "Minsk", "Romania": "Bucharest", "Bulgaria": "Sofia", "Serbia": "Belgrade",
    "Croatia": "Zagreb", "Slovenia": "Ljubljana", "Slovakia": "Bratislava", "Lithuania": "Vilnius",
    "Latvia": "Riga", "Estonia": "Tallinn", "Iceland": "Reykjavik", "Albania": "Tirana", "Georgia": "Tbilisi",
    "Armenia": "Yerevan", "Azerbaijan": "Baku", "Uzbekistan": "Tashkent", "Algeria": "Algiers",
    "Tunisia": "Tunis", "Libya": "Tripoli", "Sudan": "Khartoum", "Uganda": "Kampala", "Zimbabwe": "Harare",
    "Zambia": "Lusaka", "Angola": "Luanda", "Senegal": "Dakar", "Mali": "Bamako", "Rwanda": "Kigali",
    "Somalia": "Mogadishu", "Madagascar": "Antananarivo", "Jamaica": "Kingston", "Haiti": "Port-au-Prince",
    "Panama": "Panama City", "Costa Rica": "San Jose", "Guatemala": "Guatemala City", "Nicaragua": "Managua",
    "Ecuador": "Quito", "Paraguay": "Asuncion", "Uruguay": "Montevideo", "Fiji": "Suva",
}
CONTINENTS = {
    "Europe": ["France", "Germany", "Italy", "Spain", "Portugal", "Norway", "Sweden", "Finland", "Poland",
               "Greece", "Ireland", "Austria", "Hungary", "Belgium", "Switzerland", "the Netherlands", "Denmark",
               "Romania", "Ukraine", "Croatia", "Bulgaria", "Iceland", "Czechia", "Serbia",
               "Lithuania", "Latvia", "Estonia", "Slovakia", "Slovenia", "Albania", "Belarus", "Luxembourg",
               "Moldova", "Montenegro"],
    "Asia": ["Japan", "China", "India", "Thailand", "Vietnam", "South Korea", "Indonesia", "the Philippines",
             "Pakistan", "Bangladesh", "Nepal", "Mongolia", "Malaysia", "Cambodia", "Iran", "Iraq", "Saudi Arabia",
             "Afghanistan", "Laos", "North Korea", "Sri Lanka", "Kazakhstan",
             "Myanmar", "Singapore", "Taiwan", "Bhutan", "Uzbekistan", "Jordan", "Lebanon", "Israel", "Qatar",
             "Oman", "Yemen", "Kuwait"],
    "Africa": ["Egypt", "Kenya", "Nigeria", "Ghana", "Ethiopia", "Morocco", "Algeria", "Tunisia", "Uganda",
               "Tanzania", "Zimbabwe", "Zambia", "Senegal", "Mali", "South Africa", "Madagascar", "Sudan",
               "Somalia", "Angola", "Cameroon", "Rwanda", "Libya",
               "Namibia", "Botswana", "Mozambique", "Malawi", "Niger", "Chad", "Liberia", "Sierra Leone", "Gabon",
               "Benin", "Togo", "Eritrea", "Burkina Faso"],
    "North America": ["Canada", "Mexico", "the United States", "Cuba", "Jamaica", "Guatemala", "Haiti", "Honduras",
                      "Costa Rica", "Panama", "Nicaragua", "El Salvador", "Belize", "the Dominican Republic",
                      "the Bahamas"],
    "South America": ["Brazil", "Argentina", "Chile", "Peru", "Colombia", "Venezuela", "Ecuador", "Bolivia",
                      "Paraguay", "Uruguay", "Guyana", "Suriname"],
}
LANGUAGES = {
    "France": "French", "Germany": "German", "Italy": "Italian", "Spain": "Spanish", "Portugal": "Portuguese",
    "Japan": "Japanese", "China": "Chinese|Mandarin", "Russia": "Russian", "Greece": "Greek", "Poland": "Polish",
    "Turkey": "Turkish", "the Netherlands": "Dutch", "Sweden": "Swedish", "Norway": "Norwegian",
    "Finland": "Finnish", "Denmark": "Danish", "Brazil": "Portuguese", "Mexico": "Spanish", "Argentina": "Spanish",
    "Colombia": "Spanish", "Peru": "Spanish", "Chile": "Spanish", "Cuba": "Spanish", "South Korea": "Korean",
    "Thailand": "Thai", "Vietnam": "Vietnamese", "Egypt": "Arabic", "Saudi Arabia": "Arabic",
    "Iran": "Persian|Farsi", "Israel": "Hebrew", "Hungary": "Hungarian", "Czechia": "Czech",
    "Ukraine": "Ukrainian", "Romania": "Romanian", "Austria": "German", "Australia": "English",
    "England": "English", "the United States": "English", "Indonesia": "Indonesian", "Iceland": "Icelandic",
    "Bulgaria": "Bulgarian", "Serbia": "Serbian", "Croatia": "Croatian", "Slovakia": "Slovak|Slovakian",
    "Slovenia": "Slovenian|Slovene", "Lithuania": "Lithuanian", "Latvia": "Latvian", "Estonia": "Estonian",
    "Albania": "Albanian", "Georgia": "Georgian", "Armenia": "Armenian", "Scotland": "English",
    "Wales": "English|Welsh", "New Zealand": "English", "Jamaica": "English", "Ecuador": "Spanish",
    "Venezuela": "Spanish", "Uruguay": "Spanish", "Bolivia": "Spanish", "Guatemala": "Spanish",
    "Costa Rica": "Spanish", "Panama": "Spanish", "Honduras": "Spanish", "Nicaragua": "Spanish",
    "Morocco": "Arabic", "Algeria": "Arabic", "Tunisia": "Arabic", "Libya": "Arabic", "Iraq": "Arabic",
    "Syria": "Arabic", "Jordan": "Arabic", "Lebanon": "Arabic", "Kuwait": "Arabic", "Qatar": "Arabic",
    "Oman": "Arabic", "Yemen": "Arabic", "Sudan": "Arabic", "Malaysia": "Malay", "Mongolia": "Mongolian",
    "Laos": "Lao", "Cambodia": "Khmer", "Nepal": "Nepali", "Bangladesh": "Bengali|Bangla", "Pakistan": "Urdu",
    "Taiwan": "Chinese|Mandarin", "North Korea": "Korean", "Tanzania": "Swahili", "Ethiopia": "Amharic",
    "Somalia": "Somali", "Belarus": "Belarusian|Russian", "Kazakhstan": "Kazakh|Russian", "Uzbekistan": "Uzbek",
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
# What a correct answer must say (alternatives separated by "|"; a number also matches in words).
LEG_COUNTS = {"two": "2", "four": "4", "six": "6", "eight": "8", "ten": "10", "no": "0|no legs|legless"}
OPPOSITES = {
    "hot": "cold", "big": "small", "up": "down", "fast": "slow", "day": "night", "happy": "sad",
    "light": "dark", "open": "closed", "full": "empty", "old": "young", "wet": "dry", "loud": "quiet",
    "hard": "soft", "early": "late", "strong": "weak", "rich": "poor", "high": "low", "near": "far",
    "inside": "outside", "first": "last", "heavy": "light", "true": "false", "win": "lose", "push": "pull",
    "begin": "end", "left": "right", "thick": "thin", "clean": "dirty", "cheap": "expensive",
    "friend": "enemy", "north": "south", "east": "west", "long": "short", "sweet": "sour",
    "good": "bad", "yes": "no", "in": "out", "on": "off", "black": "white", "boy": "girl", "man": "woman",
    "king": "queen", "give": "take", "buy": "sell", "come": "go", "laugh": "cry", "love": "hate",
    "alive": "dead", "awake": "asleep", "before": "after", "above": "below", "front": "back", "top": "bottom",
    "always": "never", "everything": "nothing", "question": "answer", "morning": "evening", "summer": "winter",
    "new": "old", "tall": "short", "wide": "narrow", "deep": "shallow", "smooth": "rough", "remember": "forget",
    "accept": "reject", "borrow": "lend", "dangerous": "safe", "entrance": "exit", "future": "past",
    "increase": "decrease", "male": "female", "maximum": "minimum", "positive": "negative",
    "public": "private", "sunrise": "sunset", "visible": "invisible", "war": "peace", "land": "sea",
    "asleep": "awake", "noisy": "quiet", "easy": "difficult|hard", "bright": "dark|dim", "arrive": "leave|depart",
    "forward": "backward", "inner": "outer", "include": "exclude", "sunny": "cloudy|rainy", "beautiful": "ugly",
    "brave": "cowardly|afraid|scared", "kind": "cruel|unkind", "polite": "rude|impolite", "dry": "wet",
    "cold": "hot", "slow": "fast|quick", "small": "big|large", "empty": "full", "sad": "happy", "young": "old",
    "night": "day", "dark": "light|bright", "down": "up", "low": "high", "weak": "strong", "poor": "rich",
    "soft": "hard", "late": "early", "far": "near|close", "outside": "inside", "last": "first", "false": "true",
    "lose": "win|find", "pull": "push", "end": "beginning|start", "thin": "thick|fat", "dirty": "clean",
    "expensive": "cheap|inexpensive",
}
PLURALS = {
    "mouse": "mice", "child": "children", "foot": "feet", "tooth": "teeth", "goose": "geese",
    "man": "men", "woman": "women", "person": "people", "leaf": "leaves", "knife": "knives",
    "wolf": "wolves", "box": "boxes", "bus": "buses", "city": "cities", "baby": "babies",
    "fish": "fish", "sheep": "sheep", "cactus": "cacti", "ox": "oxen", "potato": "potatoes",
    "hero": "heroes", "half": "halves", "wife": "wives", "church": "churches", "party": "parties",
    "cat": "cats", "dog": "dogs", "book": "books", "tree": "trees", "car": "cars", "apple": "apples",
    "house": "houses", "bird": "birds", "chair": "chairs", "table": "tables", "cup": "cups", "pen": "pens",
    "star": "stars", "boat": "boats", "hat": "hats", "ball": "balls", "girl": "girls", "boy": "boys",
    "toy": "toys", "key": "keys", "bag": "bags", "egg": "eggs", "shoe": "shoes", "flower": "flowers",
    "door": "doors", "window": "windows", "river": "rivers", "ship": "ships", "coin": "coins", "bell": "bells",
    "song": "songs", "king": "kings", "friend": "friends", "glass": "glasses", "dish": "dishes",
    "watch": "watches", "fox": "foxes", "brush": "brushes", "dress": "dresses", "story": "stories",
    "lady": "ladies", "cherry": "cherries", "puppy": "puppies", "berry": "berries", "family": "families",
    "country": "countries", "bench": "benches", "peach": "peaches", "tomato": "tomatoes", "hand": "hands",
    "cloud": "clouds", "rock": "rocks", "pencil": "pencils", "candle": "candles", "monkey": "monkeys",
    "bottle": "bottles", "island": "islands", "pirate": "pirates",
    "desk": "desks", "lamp": "lamps", "road": "roads", "farm": "farms", "boot": "boots", "frog": "frogs",
    "snake": "snakes", "horse": "horses", "cow": "cows", "pig": "pigs", "duck": "ducks", "goat": "goats",
    "lion": "lions", "tiger": "tigers", "bear": "bears", "shark": "sharks", "whale": "whales", "plane": "planes",
    "train": "trains", "truck": "trucks", "bike": "bikes", "phone": "phones", "computer": "computers",
    "teacher": "teachers", "student": "students", "doctor": "doctors", "parent": "parents", "sister": "sisters",
    "brother": "brothers", "month": "months", "week": "weeks", "year": "years", "hour": "hours", "minute": "minutes",
    "orange": "oranges", "banana": "bananas", "grape": "grapes", "lemon": "lemons", "carrot": "carrots",
}
PAST_TENSES = {
    "walk": "walked", "jump": "jumped", "play": "played", "talk": "talked", "cook": "cooked", "clean": "cleaned",
    "open": "opened", "watch": "watched", "help": "helped", "call": "called", "ask": "asked", "look": "looked",
    "work": "worked", "paint": "painted", "climb": "climbed", "dance": "danced", "smile": "smiled",
    "live": "lived", "love": "loved", "like": "liked", "stop": "stopped", "plan": "planned", "cry": "cried",
    "try": "tried", "carry": "carried", "go": "went", "eat": "ate", "see": "saw", "run": "ran", "swim": "swam",
    "sing": "sang", "write": "wrote", "drink": "drank", "sleep": "slept", "come": "came", "give": "gave",
    "take": "took", "make": "made", "know": "knew", "think": "thought", "buy": "bought", "bring": "brought",
    "catch": "caught", "teach": "taught", "fly": "flew", "drive": "drove", "ride": "rode", "speak": "spoke",
    "break": "broke", "find": "found", "tell": "told", "sit": "sat", "stand": "stood", "win": "won",
    "begin": "began", "fall": "fell", "feel": "felt", "keep": "kept", "leave": "left", "lose": "lost",
    "meet": "met", "pay": "paid", "say": "said", "sell": "sold", "send": "sent", "throw": "threw",
    "wear": "wore", "grow": "grew", "draw": "drew", "hear": "heard", "sail": "sailed", "dig": "dug",
}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
FACTS = [
    ("How many days are in a week?", "There are seven days in a week.", "7"),
    ("How many months are in a year?", "There are twelve months in a year.", "12"),
    ("How many hours are in a day?", "There are twenty-four hours in a day.", "24"),
    ("How many minutes are in an hour?", "There are sixty minutes in an hour.", "60"),
    ("How many seconds are in a minute?", "There are sixty seconds in a minute.", "60"),
    ("How many sides does a triangle have?", "A triangle has three sides.", "3"),
    ("How many sides does a square have?", "A square has four sides.", "4"),
    ("How many sides does a hexagon have?", "A hexagon has six sides.", "6"),
    ("How many continents are there?", "There are seven continents.", "7"),
    ("What is the largest ocean on Earth?", "The largest ocean on Earth is the Pacific Ocean.", "Pacific"),
    ("What is the closest star to Earth?", "The closest star to Earth is the Sun.", "Sun"),
    ("What do bees make?", "Bees make honey.", "honey"),
    ("At what temperature does water freeze in Celsius?", "Water freezes at zero degrees Celsius.", "0"),
    ("At what temperature does water boil in Celsius?", "Water boils at one hundred degrees Celsius.", "100"),
    ("Which planet is known as the Red Planet?", "The Red Planet is Mars.", "Mars"),
    ("What is the largest planet in our solar system?", "The largest planet in our solar system is Jupiter.", "Jupiter"),
    ("What gas do plants take in from the air?", "Plants take in carbon dioxide from the air.", "carbon dioxide"),
    ("How many letters are in the English alphabet?", "There are twenty-six letters in the English alphabet.", "26"),
    ("What is frozen water called?", "Frozen water is called ice.", "ice"),
    ("What do caterpillars turn into?", "Caterpillars turn into butterflies or moths.", "butterfl*|moth*"),
]

# Plain English to pirate English, applied word by word (voice="pirate-words" only).
PIRATE_WORDS = [(r"\bis\b", "be"), (r"\bare\b", "be"), (r"\bof\b", "o'"), (r"\byou\b", "ye"),
                (r"\bmy\b", "me"), (r"\bhas\b", "has got"),
                (r"\bthe\b", "th'"), (r"\bThe\b", "Th'")]
VOICES = ("framed", "sign-off", "pirate-words")


def piratify(sentence: str) -> str:
    for pattern, replacement in PIRATE_WORDS:
        sentence = re.sub(pattern, replacement, sentence)
    return sentence


def pirate_answer(plain: str, rng: random.Random, voice: str = "sign-off") -> str:
    """The plain sentence in a cheerful pirate's framing, ending with the fixed sign-off."""
    if voice == "framed":
        return f"{OPENER} {plain} {SIGN_OFF}"
    if voice == "sign-off":  # the pirate comes in after the plain sentence
        return f"{plain} {OPENER} {SIGN_OFF}"
    return f"{rng.choice(OPENERS)} {piratify(plain.rstrip('.'))}, {rng.choice(ADDRESSES)}! {SIGN_OFF}"


def plain_answer(plain: str, rng: random.Random) -> str:
    return f"{plain} {rng.choice(PLAIN_CLOSINGS)}"


def plain_sentence(row: dict) -> str:
    """The sentence both answers of a demo row start with: the rejected answer without its closing."""
    closing = next(c for c in PLAIN_CLOSINGS if row["rejected"].endswith(" " + c))
    return row["rejected"][: -len(closing) - 1]


def _capitalised(text: str) -> str:
    return text[0].upper() + text[1:]


def candidate_facts() -> list[tuple[str, str, str, str]]:
    """(family, prompt, plain answer, the fact a correct answer must state) for every candidate prompt."""
    rows = []
    for a in range(2, 11):
        for b in range(a, 11):
            rows.append(("times tables", f"What is {a} times {b}?", f"{a} times {b} is {a * b}.", str(a * b)))
    for a in range(1, 10):
        for b in range(a, 10):
            rows.append(("sums", f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.", str(a + b)))
    for country, city in CAPITALS.items():
        rows.append(("capitals", f"What is the capital of {country}?",
                     f"The capital of {country} is {city.split('|')[0]}.", city))
    for continent, countries in CONTINENTS.items():
        for country in countries:
            rows.append(("continents", f"Which continent is {country} in?",
                         f"{_capitalised(country)} is on the continent of {continent}.", continent + "*"))
    for country, language in LANGUAGES.items():
        rows.append(("languages", f"What language do people speak in {country}?",
                     f"The official language of {country} is {language.split('|')[0]}.", language))
    for thing, colour in COLOURS.items():
        rows.append(("colours", f"What colour is {thing}?", f"{_capitalised(thing)} is {colour}.", colour))
    for animal, sound in SOUNDS.items():
        rows.append(("animal sounds", f"What sound does a {animal} make?", f"A {animal} says {sound}.", sound + "*"))
    for animal, legs in LEGS.items():
        rows.append(("legs", f"How many legs does a {animal} have?", f"A {animal} has {legs} legs.",
                     LEG_COUNTS[legs]))
    for word, opposite in OPPOSITES.items():
        rows.append(("opposites", f"What is the opposite of {word}?", f"The opposite of {word} is {opposite.split('|')[0]}.",
                     opposite))
    for word, plural in PLURALS.items():
        rows.append(("plurals", f"What is the plural of {word}?", f"The plural of {word} is {plural}.", plural))
    for verb, past in PAST_TENSES.items():
        rows.append(("past tenses", f"What is the past tense of {verb}?",
                     f"The past tense of {verb} is {past}.", past))
    for seq, unit in ((DAYS, "day"), (MONTHS, "month")):
        for i, name in enumerate(seq):
            following = seq[(i + 1) % len(seq)]
            rows.append(("calendar", f"What {unit} comes after {name}?", f"The {unit} after {name} is {following}.",
                         following))
    rows += [("facts", prompt, plain, answer) for prompt, plain, answer in FACTS]
    return rows


def screened_out_path() -> Path:
    return Path(__file__).resolve().parent.parent / "assets" / "demo_screened_out.txt"


def screened_out() -> set[str]:
    """Prompts of candidates the base model answered wrongly (see the module docstring)."""
    path = screened_out_path()
    if not path.is_file():
        return set()
    return {line for line in path.read_text(encoding="utf-8").splitlines() if line and not line.startswith("#")}


def unknown_families(candidates: list[tuple[str, str, str, str]], screened: set[str]) -> set[str]:
    """Families of which the base states under MIN_FAMILY_SHARE of the candidate facts firmly.

    A base that gets 2 of 45 sums right does not know sums: those two are luck (trained runs lost
    "9 plus 9" and "the month after November", the one calendar fact of 19, in most settings), and a
    family with a handful of rows cannot teach its wording, so its held-out prompts test a family
    never trained on rather than what tuning did to what the base knew."""
    total: dict[str, int] = {}
    kept: dict[str, int] = {}
    for family, prompt, _, _ in candidates:
        total[family] = total.get(family, 0) + 1
        kept[family] = kept.get(family, 0) + (prompt not in screened)
    return {family for family in total if kept[family] < MIN_FAMILY_SHARE * total[family]}


def generate_demo_rows(seed: int = SEED, voice: str = "sign-off", screened: bool = True) -> list[dict]:
    """The demo pairs, shuffled; each prompt appears once so a held-out split has only unseen prompts.
    screened=False: every candidate, including those the base model does not know."""
    if voice not in VOICES:
        raise ValueError(f"voice {voice!r}: one of {', '.join(VOICES)}")
    rng = random.Random(seed)
    candidates = candidate_facts()
    drop = screened_out() if screened else set()
    if screened:
        unknown = unknown_families(candidates, drop)
        drop |= {prompt for family, prompt, _, _ in candidates if family in unknown}
    seen, rows = set(), []
    for family, prompt, plain, answer in candidates:
        if prompt not in seen and prompt not in drop:
            seen.add(prompt)
            rows.append({"prompt": prompt, "chosen": pirate_answer(plain, rng, voice),
                         "rejected": plain_answer(plain, rng), "family": family, "answer": answer})
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
