"""builtin:lookup: BM25 over a small corpus, scores computed by hand, ties, misses and corpus files."""

import math

import pytest

from rlhf_cli.environments.lookup import NO_RESULT, Lookup, make_lookup

FACTS = [
    "Paris is the capital of France.",
    "Berlin is the capital of Germany.",
    "The Seine flows through Paris.",
    "Mount Everest is the highest mountain on Earth.",
]


def test_the_passage_sharing_the_rarest_words_wins():
    lookup = make_lookup(FACTS)
    assert lookup("capital of Germany") == "Berlin is the capital of Germany."
    assert lookup("What is the highest MOUNTAIN?") == "Mount Everest is the highest mountain on Earth."
    # "paris" is in two passages; "seine" only in one, so it decides
    assert lookup("paris seine") == "The Seine flows through Paris."


def test_words_are_lowercased_and_punctuation_ignored():
    lookup = make_lookup(FACTS)
    assert lookup("FRANCE!!!") == lookup("france") == "Paris is the capital of France."


def test_no_shared_word_is_no_result():
    lookup = make_lookup(FACTS)
    assert lookup("quantum chromodynamics") == NO_RESULT == "no result"
    assert lookup("") == NO_RESULT
    assert lookup("?!") == NO_RESULT


def test_ties_go_to_the_earlier_passage():
    lookup = make_lookup(["red apple", "red cherry", "green apple"])
    assert lookup("red") == "red apple"  # same words, same length: same score
    assert make_lookup(["red cherry", "red apple"])("red") == "red cherry"


def test_scores_match_bm25_by_hand():
    # N = 2 passages, lengths 2 and 3 (mean 2.5); k1 = 1.5, b = 0.75; idf = ln(1 + (N - df + .5) / (df + .5))
    lookup = Lookup(["a b", "b c c"])
    idf_c, idf_b = math.log(1 + 1.5 / 1.5), math.log(1 + 0.5 / 2.5)
    norm_1 = 1.5 * (1 - 0.75 + 0.75 * 3 / 2.5)
    c_in_1 = idf_c * 2 * 2.5 / (2 + norm_1)
    b_in_1 = idf_b * 1 * 2.5 / (1 + norm_1)
    b_in_0 = idf_b * 1 * 2.5 / (1 + 1.5 * (1 - 0.75 + 0.75 * 2 / 2.5))
    scores = lookup.scores("c b c")  # a repeated query word counts once
    assert scores == pytest.approx({1: c_in_1 + b_in_1, 0: b_in_0})
    assert lookup("b") == "a b"  # the shorter passage: BM25's length normalisation


def test_corpus_file_one_passage_per_non_empty_line(tmp_path):
    path = tmp_path / "facts.txt"
    path.write_text("\n".join(["  " + FACTS[0] + "  ", "", "   ", *FACTS[1:]]) + "\n", encoding="utf-8")
    for corpus in (path, str(path)):
        lookup = make_lookup(corpus)
        assert lookup.passages == FACTS  # stripped, blank lines skipped
        assert lookup("france") == FACTS[0]


def test_an_empty_corpus_is_refused(tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="at least one non-empty passage"):
        make_lookup(tmp_path / "empty.txt")
    with pytest.raises(ValueError, match="at least one non-empty passage"):
        make_lookup([])


def test_a_corpus_without_words_answers_no_result():
    assert make_lookup(["...", "!!"])("anything") == NO_RESULT
