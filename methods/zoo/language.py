"""A small synthetic language: its lexicon and a seeded sentence generator.

Everything is drawn from ``random.Random(seed)``, whose integer-seeded stream is stable across
platforms and Python 3 releases, so the same seed gives the same bytes everywhere.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy"]
NOUNS = ["cat", "dog", "bird", "fox", "teacher", "farmer", "student", "robot", "tree", "garden",
         "river", "city", "horse", "baker", "pilot", "sailor"]
REVIEW_NOUNS = ["movie", "book", "song", "meal", "show", "game", "hotel", "play"]
# (third person singular, plural / base form)
TRANSITIVE = [("sees", "see"), ("likes", "like"), ("finds", "find"), ("follows", "follow"),
              ("helps", "help"), ("watches", "watch"), ("chases", "chase"), ("visits", "visit")]
INTRANSITIVE = [("runs", "run"), ("sleeps", "sleep"), ("sings", "sing"), ("jumps", "jump"),
                ("waits", "wait"), ("swims", "swim")]
NEUTRAL_ADJ = ["red", "blue", "green", "small", "big", "old", "young", "quiet"]
POSITIVE_ADJ = ["good", "great", "wonderful", "excellent", "lovely", "brilliant", "fun",
                "pleasant", "delightful", "superb"]
NEGATIVE_ADJ = ["bad", "awful", "terrible", "boring", "dull", "poor", "horrible", "weak",
                "ugly", "sad"]
INTENSIFIERS = ["very", "really", "quite"]
PREPOSITIONS = ["near", "under", "behind", "with"]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
           "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
           "eighteen", "nineteen", "twenty"]
FUNCTION_WORDS = ["the", "a", "is", "are", "was", "were", "not", "and", "but", "plus", "minus",
                  "what", "question", "answer", "review", "sentiment", "positive", "negative",
                  "count", "then", "it"]
PUNCTUATION = [".", "?", ":", ","]

MAX_NUMBER = len(NUMBERS) - 1


def vocabulary() -> list[str]:
    """Every word of the language, in a fixed order (token ids follow this order)."""
    words: list[str] = []
    for group in (NAMES, NOUNS, [n + "s" for n in NOUNS], REVIEW_NOUNS,
                  [v for pair in TRANSITIVE for v in pair], [v for pair in INTRANSITIVE for v in pair],
                  NEUTRAL_ADJ, POSITIVE_ADJ, NEGATIVE_ADJ, INTENSIFIERS, PREPOSITIONS, NUMBERS,
                  FUNCTION_WORDS, PUNCTUATION):
        for word in group:
            if word not in words:
                words.append(word)
    return words


@dataclass(frozen=True)
class Clause:
    """One review clause, e.g. 'the movie was not very good'."""

    words: tuple[str, ...]
    polarity: int  # +1, -1, or 0 for a neutral clause


class Generator:
    """Seeded generator of sentences of the language."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    # -- noun phrases and declaratives -------------------------------------------------------
    def noun_phrase(self) -> tuple[list[str], bool]:
        """A subject/object phrase and whether it is plural."""
        r = self.rng
        if r.random() < 0.25:
            return [r.choice(NAMES)], False
        plural = r.random() < 0.4
        noun = r.choice(NOUNS) + ("s" if plural else "")
        det = "the" if plural or r.random() < 0.6 else "a"
        words = [det]
        if r.random() < 0.5:
            words.append(r.choice(NEUTRAL_ADJ))
        words.append(noun)
        return words, plural

    def declarative(self) -> list[str]:
        """'the small cat sees a dog near the river .' with subject-verb agreement."""
        r = self.rng
        subject, plural = self.noun_phrase()
        words = list(subject)
        if r.random() < 0.6:
            verb = r.choice(TRANSITIVE)[1 if plural else 0]
            obj, _ = self.noun_phrase()
            words += [verb] + obj
        else:
            words.append(r.choice(INTRANSITIVE)[1 if plural else 0])
        if r.random() < 0.4:
            place, _ = self.noun_phrase()
            words += [r.choice(PREPOSITIONS)] + place
        return words + ["."]

    # -- reviews -----------------------------------------------------------------------------
    def review_clause(self, neutral: bool = False) -> Clause:
        r = self.rng
        noun = r.choice(REVIEW_NOUNS)
        copula = r.choice(["is", "was"])
        words = ["the", noun, copula]
        if neutral:
            return Clause(tuple(words + [r.choice(NEUTRAL_ADJ)]), 0)
        polarity = 1 if r.random() < 0.5 else -1
        adjective = r.choice(POSITIVE_ADJ if polarity > 0 else NEGATIVE_ADJ)
        negated = r.random() < 0.3
        if negated:
            words.append("not")
        if r.random() < 0.3:
            words.append(r.choice(INTENSIFIERS))
        words.append(adjective)
        return Clause(tuple(words), -polarity if negated else polarity)

    def review(self) -> tuple[list[str], int]:
        """A review of one or three polar clauses (so the majority is never tied) plus optional
        neutral clauses; returns the words and the label (1 = positive)."""
        r = self.rng
        clauses = [self.review_clause() for _ in range(r.choice([1, 1, 3]))]
        for _ in range(r.choice([0, 0, 1])):
            clauses.insert(r.randrange(len(clauses) + 1), self.review_clause(neutral=True))
        words: list[str] = []
        for i, clause in enumerate(clauses):
            if i:
                words.append(r.choice(["and", "but"]))
            words += clause.words
        label = 1 if sum(c.polarity for c in clauses) > 0 else 0
        return words + ["."], label

    # -- numbers -----------------------------------------------------------------------------
    def counting(self) -> list[str]:
        r = self.rng
        length = r.randint(3, 6)
        start = r.randint(0, MAX_NUMBER - length + 1)
        return ["count", ":"] + NUMBERS[start:start + length] + ["."]

    def arithmetic_fact(self) -> list[str]:
        a, op, b, result = self.arithmetic_problem()
        return [NUMBERS[a], op, NUMBERS[b], "is", NUMBERS[result], "."]

    def arithmetic_problem(self) -> tuple[int, str, int, int]:
        r = self.rng
        if r.random() < 0.5:
            a = r.randint(0, MAX_NUMBER)
            b = r.randint(0, MAX_NUMBER - a)
            return a, "plus", b, a + b
        a = r.randint(0, MAX_NUMBER)
        b = r.randint(0, a)
        return a, "minus", b, a - b


def all_arithmetic_problems() -> list[tuple[int, str, int, int]]:
    """Every problem the language can state: a + b <= 20 and a - b >= 0 over 0..20."""
    problems = [(a, "plus", b, a + b) for a in range(MAX_NUMBER + 1) for b in range(MAX_NUMBER + 1 - a)]
    problems += [(a, "minus", b, a - b) for a in range(MAX_NUMBER + 1) for b in range(a + 1)]
    return problems
