"""The text `tiny-lm` learns from: fables, arithmetic and letters written by a small seeded grammar.

Why generated: the corpus must ship with the client (no download at run time) and carry no licence
question, and a grammar gives a char-level model structure it can pick up within minutes on a CPU (spelling,
agreement, sums that are right). The shipped file `data/tiny_corpus.txt` is exactly `generate()`'s output;
a test checks that, and `python -m hivewire.recipes.corpus > data/tiny_corpus.txt` rewrites it.
"""

from __future__ import annotations

import random
import sys

SEED = 20261124
SIZE_BYTES = 320_000

_ANIMALS = ["fox", "hare", "owl", "crow", "badger", "mouse", "wolf", "heron", "otter", "lark", "toad", "goat"]
_PEOPLE = ["miller", "weaver", "shepherd", "smith", "baker", "fisher", "potter", "queen", "king", "tinker"]
_ADJECTIVES = ["old", "young", "clever", "quiet", "proud", "hungry", "kind", "lazy", "brave", "tired", "small"]
_PLACES = ["the river", "the hill", "the mill", "the wood", "the market", "the well", "the barn", "the bridge"]
_THINGS = ["a loaf", "a coin", "a lantern", "a basket", "a key", "a feather", "a rope", "a cup", "a stone"]
_VERBS = ["found", "carried", "lost", "hid", "sold"]
_DEADLINES = ["the new moon", "the first frost", "market day", "the wedding", "next week"]
_TIMES = ["One morning", "At dusk", "In the spring", "Long ago", "On a cold night", "After the harvest"]
_MORALS = [
    "Slow and steady wins the race.",
    "A friend in need is a friend indeed.",
    "Look before you leap.",
    "Pride goes before a fall.",
    "Many hands make light work.",
    "Do not count your eggs before they hatch.",
    "Little by little, the cup is filled.",
]
_NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def _character(rng: random.Random) -> str:
    return f"the {rng.choice(_ADJECTIVES)} {rng.choice(_ANIMALS + _PEOPLE)}"


def _fable(rng: random.Random) -> str:
    hero, other = _character(rng), _character(rng)
    past = rng.choice(_VERBS)
    thing, place = rng.choice(_THINGS), rng.choice(_PLACES)
    count = rng.randint(2, 9)
    lines = [
        f"{rng.choice(_TIMES)}, {hero} {past} {thing} near {place}.",
        f'{other.capitalize()} saw it and said, "Give it to me, and I will give you {_NUMBERS[count]} apples."',
        rng.choice(
            [
                f"But {hero} kept {thing} and walked on to {rng.choice(_PLACES)}.",
                f"So {hero} gave {thing} away, and {other} ate {_NUMBERS[count - 1]} of the apples at once.",
                f"{hero.capitalize()} laughed, and they went to {rng.choice(_PLACES)} together.",
            ]
        ),
        f"Moral: {rng.choice(_MORALS)}",
    ]
    return " ".join(lines)


def _arithmetic(rng: random.Random) -> str:
    a, b = rng.randint(0, 50), rng.randint(0, 50)
    if rng.random() < 0.5:
        return f"{a} plus {b} is {a + b}. {a + b} minus {b} is {a}."
    small = rng.randint(0, 10)
    return f"{_NUMBERS[small].capitalize()} times {b} is {small * b}."


def _letter(rng: random.Random) -> str:
    sender, receiver = rng.choice(_PEOPLE), rng.choice(_PEOPLE)
    return (
        f"Dear {receiver}, I am sending you {rng.choice(_THINGS)} by way of {rng.choice(_PLACES)}. "
        f"Please return {rng.choice(_THINGS)} before {rng.choice(_DEADLINES)}. Yours, the {sender}."
    )


def generate(seed: int = SEED, size_bytes: int = SIZE_BYTES) -> str:
    """Paragraphs until `size_bytes` is reached; the same arguments give the same text on every platform."""
    rng = random.Random(seed)  # noqa: S311 (text, not secrets: seeded for reproducibility)
    paragraphs: list[str] = []
    length = 0
    while length < size_bytes:
        kind = rng.random()
        paragraph = _fable(rng) if kind < 0.6 else _arithmetic(rng) if kind < 0.85 else _letter(rng)
        paragraphs.append(paragraph)
        length += len(paragraph) + 1
    return "\n".join(paragraphs) + "\n"


if __name__ == "__main__":
    sys.stdout.write(generate())
