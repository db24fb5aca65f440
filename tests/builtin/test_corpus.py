"""The review grammar: determinism, size and variety, and sentiment that VADER reads as intended."""

import random
import re

import pytest
from vaderSentiment.vaderSentiment import NEGATE

from rlhf_cli.builtin import corpus, lexicon
from rlhf_cli.builtin.sentiment import _analyzer, sentiment_scores

SENTENCE_END = re.compile(r"(?<=[.!?]) ")


@pytest.fixture(scope="module")
def reviews():
    return corpus.generate_reviews(20_000, seed=0)


def test_same_seed_same_reviews_other_seed_other_reviews():
    assert corpus.generate_reviews(50, seed=3) == corpus.generate_reviews(50, seed=3)
    assert corpus.generate_reviews(50, seed=3) != corpus.generate_reviews(50, seed=4)


def test_vocabulary_has_one_to_three_thousand_words():
    assert 1_000 <= len(corpus.VOCABULARY) <= 3_000
    assert corpus.VOCABULARY == sorted(set(corpus.VOCABULARY)) == corpus.vocabulary()


def test_every_emitted_word_is_in_the_vocabulary(reviews):
    emitted = {word for text in reviews[:3_000] for word in corpus.words_of(text)}
    assert emitted <= set(corpus.VOCABULARY)


def test_twenty_thousand_reviews_hold_tens_of_thousands_of_distinct_sentences(reviews):
    sentences = [s for text in reviews for s in SENTENCE_END.split(text)]
    assert len(set(sentences)) >= 30_000
    assert len(set(reviews)) == len(reviews)


def test_reviews_have_two_to_six_sentences(reviews):
    counts = {len(SENTENCE_END.split(text)) for text in reviews[:2_000]}
    assert min(counts) == 2 and max(counts) == 6


def test_vader_scores_spread_over_positive_negative_and_neutral(reviews):
    scores = sentiment_scores(reviews[:3_000])
    share = lambda keep: sum(map(keep, scores)) / len(scores)  # noqa: E731
    assert share(lambda s: s > 0.5) > 0.2
    assert share(lambda s: s < -0.5) > 0.2
    assert share(lambda s: abs(s) < 0.5) > 0.2


def test_target_polarity_steers_the_gold_score():
    rng = random.Random(0)
    for label, sign in [("positive", 1), ("negative", -1)]:
        scores = sentiment_scores([corpus.write_review(rng, label).text for _ in range(300)])
        assert sum(sign * s > 0.05 for s in scores) / len(scores) > 0.8


def test_neutral_word_lists_carry_no_vader_sentiment():
    """Names, titles, places and plots must never move the gold score by accident."""
    lexicon_words = _analyzer().lexicon
    for name, entries in lexicon.NEUTRAL_LISTS.items():
        words = {w for entry in entries for w in corpus.words_of(entry)}
        assert not words & lexicon_words.keys(), name
        assert not words & set(NEGATE), name


@pytest.mark.parametrize(
    ("words", "sign"),
    [
        (lexicon.POSITIVE_ADJECTIVES + lexicon.MILD_POSITIVE_ADJECTIVES + lexicon.POSITIVE_NOUNS, 1),
        (lexicon.POSITIVE_VERBS + lexicon.POSITIVE_VERBS_PAST + lexicon.POSITIVE_FEELINGS, 1),
        (lexicon.NEGATIVE_ADJECTIVES + lexicon.MILD_NEGATIVE_ADJECTIVES, -1),
        (lexicon.NEGATIVE_VERBS_PAST + lexicon.NEGATIVE_FEELINGS + ["mess", "disaster", "waste"], -1),
    ],
)
def test_sentiment_words_are_known_to_vader_with_their_sign(words, sign):
    valence = _analyzer().lexicon
    assert all(sign * valence.get(word, 0) > 0 for word in words), [
        w for w in words if sign * valence.get(w, 0) <= 0
    ]


def test_no_word_list_repeats_an_entry():
    lists = {**lexicon.NEUTRAL_LISTS, "POSITIVE_ADJECTIVES": lexicon.POSITIVE_ADJECTIVES}
    lists |= {"NEGATIVE_ADJECTIVES": lexicon.NEGATIVE_ADJECTIVES}
    for name, entries in lists.items():
        assert len(entries) == len(set(entries)), name


# Every template of a polarity rule must score with that sign (neutral ones exactly zero), so a
# review's target polarity means what it says. Closings that VADER cannot read ("Skip this one.",
# "Two out of ten.") are allowed to score zero.
SIGNED_RULES = {
    "positive": 1, "tail_positive": 1, "closing_positive": 1,
    "negative": -1, "tail_negative": -1, "closing_negative": -1,
    "neutral": 0, "tail_neutral": 0, "opening": 0,
}  # fmt: skip


@pytest.mark.parametrize("rule", sorted(SIGNED_RULES))
def test_every_template_scores_with_the_sign_of_its_rule(rule):
    rng, sign = random.Random(rule), SIGNED_RULES[rule]
    for template in corpus.RULES[rule]:
        texts = []
        for _ in range(15):
            film = corpus.random_film(rng)
            texts.append(corpus.tidy(corpus.expand(template, rng, film.context())))
        for text, score in zip(texts, sentiment_scores(texts), strict=True):
            if sign == 0:
                assert score == 0, (template, text)
            elif rule.startswith("closing"):
                assert sign * score >= 0, (template, text)
            else:
                assert sign * score > 0, (template, text)


@pytest.mark.parametrize(
    ("template", "sign"),
    [
        ("{aspect_isnt} {mild_neg} at all.", 1),  # "the plot isn't weak at all"
        ("{it} never gets {neg_adj}.", 1),  # "it never gets boring"
        ("{aspect_isnt} {not_deg} {pos_adj}.", -1),  # "the acting is not very good"
        ("I did not {pos_verb} {aspect} at all.", -1),
        ("{aspect_is} {mild_neg}, but {aspect_is} {deg} {pos_adj}.", 1),  # the clause after "but" wins
        ("{aspect_is} {mild_pos}, but {aspect_is} {deg} {neg_adj}.", -1),
    ],
)
def test_negation_and_contrast_flip_the_score_as_intended(template, sign):
    rng = random.Random(template)
    film = corpus.random_film(rng)
    texts = [corpus.tidy(corpus.expand(template, rng, film.context())) for _ in range(40)]
    assert any(w in NEGATE or w == "but" for w in corpus.words_of(texts[0]))
    assert all(sign * score > 0 for score in sentiment_scores(texts)), texts


def test_intensifiers_raise_the_score():
    plain, boosted = sentiment_scores(["The script is clever.", "The script is extremely clever."])
    assert boosted > plain > 0


def test_preference_style_continuations_share_the_opening():
    rng = random.Random(1)
    first = corpus.write_review(rng, "positive")
    second = corpus.write_review(rng, "negative", first.film, first.opening)
    assert first.text.startswith(first.opening) and second.text.startswith(first.opening)
    assert first.text != second.text


def test_training_text_is_deterministic_and_covers_the_vocabulary():
    text = corpus.training_text(seed=0, num_reviews=200)
    assert text == corpus.training_text(seed=0, num_reviews=200)
    assert {w for line in text for w in corpus.words_of(line)} >= set(corpus.VOCABULARY)
    assert len(corpus.training_text(num_reviews=2_000)) > 2_000
