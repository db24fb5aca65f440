"""builtin:lookup — the passage of a local text corpus that best matches a query, by BM25 keyword score.

A corpus is a text file with one passage per non-empty line (surrounding spaces stripped), or a list of
strings; lines rather than paragraphs, so that a file of facts, one per line, needs no blank lines
between them. Words are runs of letters and digits, lowercased, so "Paris," matches "paris".

The score is Okapi BM25 (k1 = 1.5, b = 0.75, the non-negative idf Lucene uses), computed in a few lines
of plain Python: no index library, no randomness, the same answer on every machine. The best-scoring
passage wins and ties go to the earlier one; a query that shares no word with any passage gets
NO_RESULT. Everything is built once when the tool is made; a query costs one pass over the postings
of its words. ``lookup_tool`` wraps a Lookup as ``lookup(query: str) -> str`` with an ``Args:`` docstring,
the typed callable the chat protocol describes to a model as a JSON schema.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

NO_RESULT = "no result"
K1, B = 1.5, 0.75
WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def read_passages(path: str | Path) -> list[str]:
    """The non-empty lines of a UTF-8 text file, stripped."""
    return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


class Lookup:
    """Look up a query in the corpus and return the passage that best matches its words, or "no result"."""

    def __init__(self, passages: Sequence[str]):
        self.passages = [p.strip() for p in passages if p.strip()]
        if not self.passages:
            raise ValueError("a lookup corpus needs at least one non-empty passage")
        counts = [Counter(words(p)) for p in self.passages]
        self.lengths = [sum(c.values()) for c in counts]
        # `or 1.0`: a corpus of punctuation only has no words, and must not divide by zero
        self.mean_length = sum(self.lengths) / len(counts) or 1.0
        # word -> [(passage index, count)], in passage order
        self.postings: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for index, passage_counts in enumerate(counts):
            for word, count in passage_counts.items():
                self.postings[word].append((index, count))
        n = len(counts)
        self.idf = {w: math.log(1 + (n - len(p) + 0.5) / (len(p) + 0.5)) for w, p in self.postings.items()}

    def scores(self, query: str) -> dict[int, float]:
        """BM25 score of every passage that shares a word with `query` (each distinct word counted once)."""
        scores: dict[int, float] = defaultdict(float)
        for word in dict.fromkeys(words(query)):  # distinct, in query order: a fixed order of float sums
            for index, count in self.postings.get(word, ()):
                norm = K1 * (1 - B + B * self.lengths[index] / self.mean_length)
                scores[index] += self.idf[word] * count * (K1 + 1) / (count + norm)
        return scores

    def __call__(self, query: str) -> str:
        scores = self.scores(query)
        if not scores:
            return NO_RESULT
        best = min(scores, key=lambda index: (-scores[index], index))
        return self.passages[best]


def make_lookup(corpus: str | Path | Sequence[str]) -> Lookup:
    """A lookup tool over `corpus`: a path to a text file (one passage per line) or a list of passages."""
    passages = read_passages(corpus) if isinstance(corpus, str | Path) else corpus
    return Lookup(passages)


def lookup_tool(corpus: str | Path | Sequence[str]) -> Callable[[str], str]:
    """`make_lookup(corpus)` as a plain typed function, for `builtin:lookup`."""
    index = make_lookup(corpus)

    def lookup(query: str) -> str:
        """Look up a query in the corpus and return the passage that best matches its words, or "no result".

        Args:
            query: the words to look for
        """
        return index(query)

    return lookup
