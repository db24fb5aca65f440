"""A seeded grammar of English movie reviews: the text of the built-in offline world.

Why a grammar and not a fixed list of reviews: a small model must really learn language to
imitate this corpus (tens of thousands of distinct sentences over ~1,300 words), and a policy that
wants a higher gold score (VADER) has to make choices throughout a review -- adjectives,
intensifiers, negations ("isn't bad at all"), what follows a "but" -- not pick one magic token.

How it works: ``RULES`` maps a rule name to its alternatives. An alternative is text in which
``{name}`` expands another rule (or a fact about the film under review, such as ``{title}``) and
``(a|b|)`` picks one of inline choices. A review is an *opening* (a neutral lead-in, so that
prompts cut from it do not reveal the sentiment) finished by a *tail* of the review's target
polarity, then 1-5 body sentences drawn from a polarity mix and sometimes a closing verdict.
All randomness comes from the ``random.Random`` passed in, so a seed fixes every word.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from rlhf_cli.builtin import lexicon as lx

LABELS = ("positive", "negative", "neutral")

# The grammar is data: keep one alternative per phrase, several to a line (no reformatting).
# fmt: off
_TERMINALS: dict[str, list[str]] = {
    "first": lx.FIRST_NAMES, "surname": lx.SURNAMES, "relative": lx.RELATIVES,
    "title_adj": lx.TITLE_ADJECTIVES, "title_noun": lx.TITLE_NOUNS, "month": lx.MONTHS,
    "place": lx.PLACES, "setting": lx.SETTINGS, "venue": lx.VENUES, "language": lx.LANGUAGES,
    "occupation": lx.OCCUPATIONS, "job_mod": lx.OCCUPATION_MODIFIERS, "plot": lx.PLOT_ACTIONS,
    "aspect_sg": lx.ASPECTS_SINGULAR, "aspect_pl": lx.ASPECTS_PLURAL, "film_noun": lx.FILM_NOUNS,
    "duration": lx.DURATIONS, "number": lx.NUMBER_WORDS, "ordinal": lx.ORDINALS,
    "decade": lx.DECADES, "platform": lx.PLATFORMS, "when": lx.WHEN, "when_start": lx.WHEN_STARTS,
    "seen_in": lx.SEEN_IN, "released": lx.RELEASED, "neutral_adj": lx.NEUTRAL_ADJECTIVES,
    "high": lx.HIGH_SCORES, "middle": lx.MIDDLE_SCORES, "low": lx.LOW_SCORES,
    "pos_adj": lx.POSITIVE_ADJECTIVES, "mild_pos": lx.MILD_POSITIVE_ADJECTIVES,
    "neg_adj": lx.NEGATIVE_ADJECTIVES, "mild_neg": lx.MILD_NEGATIVE_ADJECTIVES,
    "pos_noun": lx.POSITIVE_NOUNS, "neg_noun": lx.NEGATIVE_NOUNS,
    "pos_verbed": lx.POSITIVE_VERBS_PAST, "pos_verb": lx.POSITIVE_VERBS,
    "neg_verbed": lx.NEGATIVE_VERBS_PAST, "pos_feeling": lx.POSITIVE_FEELINGS,
    "neg_feeling": lx.NEGATIVE_FEELINGS, "intensifier": lx.INTENSIFIERS, "dampener": lx.DAMPENERS,
}

_PHRASES: dict[str, list[str]] = {
    "person": ["{first} {surname}"],
    "title": [
        "The {title_adj} {title_noun}", "The {title_adj} {title_noun}", "{title_adj} {title_noun}",
        "The {title_noun} of {place}", "{first} and the {title_noun}", "{first}'s {title_noun}",
        "The {title_noun} and the {title_noun}", "Beyond the {title_noun}", "After the {title_noun}",
        "Under the {title_adj} {title_noun}", "{title_noun} in {month}", "Return to {place}",
        "The {title_noun} at {place}", "The {title_adj} {title_noun} of {first} {surname}",
    ],
    "deg": ["", "", "", "{intensifier}", "{intensifier}"],  # empty choices weight "no intensifier"
    "not_deg": ["", "", "very", "really", "particularly", "especially", "that"],  # reads well after "not"
    "verb_deg": ["", "", "really", "absolutely", "just", "genuinely"],
    "aspect": ["{aspect_sg}", "{aspect_pl}"],
    "aspect_is": ["{aspect_sg} is", "{aspect_sg} is", "{aspect_pl} are"],
    "aspect_isnt": ["{aspect_sg} (isn't|is not)", "{aspect_pl} (aren't|are not)"],
    "it": ["it", "it", "the film", "the movie", "{title}", "this {genre}"],
    "it_is": ["{it} is", "it's"],
    "actor": ["{lead}", "{lead}", "{costar}"],
    "role": ["the {occupation}", "the {job_mod} {occupation}", "a {occupation}", "the lead"],
    "saw": ["watched", "saw", "caught", "finally saw"],
    "rating_high": ["{high} out of ten.", "I give it {high} out of ten.", "My rating is {high} out of ten."],
    "rating_middle": [
        "{middle} out of ten.", "I give it {middle} out of ten.", "My rating is {middle} out of ten.",
    ],
    "rating_low": ["{low} out of ten.", "I give it {low} out of ten.", "My rating is {low} out of ten."],
}

# Openings are neutral, so a prompt cut from one does not give the sentiment away; the tail that
# finishes the first sentence carries the review's target polarity.
_OPENINGS: dict[str, list[str]] = {
    "opening": [
        "I {saw} {title} {when}", "{when_start} I {saw} {title}",
        "My {relative} and I went to see {title} {when}", "My {relative} took me to see {title} {when}",
        "{title} is the new {genre} from {director}", "{title} is {director}'s {ordinal} {genre}",
        "{director}'s new {genre} {title} came out {released}", "We caught {title} at {venue} {when}",
        "{title}, the {genre} starring {lead}, came out {released}",
        "Starring {lead} and {costar}, {title} is a {genre} set in {setting}",
        "This {genre} stars {lead} as a {job_mod} {occupation}", "{title} stars {lead} as a {occupation}",
        "I streamed {title} on {platform} {when}", "{director} made {title} after a long break",
        "{title} is a {genre} set in {setting}", "{title} follows a {occupation} who {plot}",
        "The latest {genre} from {director} is called {title}", "{title} runs {duration} and stars {lead}",
        "Set in {setting}, {title} follows a {occupation} who {plot}",
    ],
    "tail_positive": [
        ", and it is {deg} {pos_adj}.", ", and I {verb_deg} {pos_verbed} it.",
        ", and I {pos_verbed} every minute of it.", ", and it is a {deg} {pos_adj} {film_noun}.",
        ", and it is not {mild_neg} at all.", ", and it never feels {neg_adj}.",
        ", and what a {pos_noun} it is!", ", and it did not disappoint.",
        ", and I came out {deg} {pos_feeling}.",
    ],
    "tail_negative": [
        ", and it is {deg} {neg_adj}.", ", and I {verb_deg} {neg_verbed} it.",
        ", and I did not {pos_verb} it.",
        ", and it is not {not_deg} {pos_adj} at all.", ", and it is a {deg} {neg_adj} {film_noun}.",
        ", and what a {neg_noun} it is.", ", and I came out {deg} {neg_feeling}.",
        ", and frankly it is a {neg_noun}.",
    ],
    "tail_neutral": [
        ".", ".", ".", ", and I have mixed feelings about it.", ", and here is what I thought.",
        ", and it left me with a lot to think about.",
    ],
}

# Body sentences by polarity. Negation ("isn't weak", "never gets boring"), intensifiers and
# contrast ("X is weak, but Y is superb": VADER weighs the clause after "but" more) all appear.
_SENTENCES: dict[str, list[str]] = {
    "positive": [
        "{aspect_is} {deg} {pos_adj}.", "{aspect_is} {deg} {pos_adj}, and {aspect_is} {pos_adj} too.",
        "{aspect_isnt} {mild_neg} at all.", "{aspect_is} {mild_neg}, but {aspect_is} {deg} {pos_adj}.",
        "{aspect_is} a bit {mild_neg} at times, but {it_is} still {deg} {pos_adj}.",
        "I {verb_deg} {pos_verbed} {aspect}.", "{actor} is {deg} {pos_adj} as {role}.",
        "{actor} gives a {deg} {pos_adj} performance as {role}.",
        "{it_is} one of the best {genres} I have seen {seen_in}.", "{it_is} a {deg} {pos_adj} {film_noun}.",
        "What a {pos_adj} {film_noun}!", "{it_is} a real {pos_noun}.", "Nothing here feels {neg_adj}.",
        "I walked out of the (cinema|screening) {deg} {pos_feeling}.", "{it} never gets {neg_adj}.",
        "There is not a single {neg_adj} scene in it.", "{director} directs it with a {deg} {pos_adj} touch.",
        "{lead} and {costar} work {deg} well together.", "Every scene is {deg} {pos_adj}.",
        "It is easily the best {genre} of the year.", "{aspect_is} better than I expected.",
        "The way {director} handles {aspect} is {deg} {pos_adj}.", "Even {aspect_is} {pos_adj}.",
        "{aspect_is} so {pos_adj} that I want to see it again.", "It made me laugh more than once.",
        "I was {deg} (impressed|delighted|amused) by how {pos_adj} {aspect_is}.",
    ],
    "negative": [
        "{aspect_is} {deg} {neg_adj}.", "{aspect_is} {deg} {neg_adj}, and {aspect_is} {neg_adj} too.",
        "{aspect_isnt} {not_deg} {pos_adj}.", "{aspect_is} {mild_pos}, but {aspect_is} {deg} {neg_adj}.",
        "{aspect_is} {pos_adj} at times, but {it_is} still {deg} {neg_adj}.",
        "I {verb_deg} {neg_verbed} {aspect}.", "I did not {pos_verb} {aspect} at all.",
        "{actor} is {deg} {neg_adj} as {role}.", "{actor} gives a {deg} {neg_adj} performance as {role}.",
        "{it_is} one of the worst {genres} I have seen {seen_in}.", "{it_is} a {deg} {neg_adj} {film_noun}.",
        "What a {neg_noun}.", "{it_is} a (total|complete|real) {neg_noun}.", "Nothing here feels {pos_adj}.",
        "I walked out of the (cinema|screening) {deg} {neg_feeling}.", "{it} never gets {pos_adj}.",
        "There is not a single {pos_adj} scene in it.", "{actor} cannot save it.",
        "{director} directs it with a {deg} {neg_adj} touch.", "Every scene feels {deg} {neg_adj}.",
        "It is by far the worst {genre} of the year.", "{aspect_is} worse than I expected.",
        "The way {director} handles {aspect} is {deg} {neg_adj}.", "Even {aspect_is} {neg_adj}.",
        "{aspect_is} so {neg_adj} that I nearly walked out.", "It never made me laugh.",
        "I was {deg} (annoyed|irritated|disappointed|confused) by how {neg_adj} {aspect_is}.",
    ],
    "mixed": [
        "{aspect_is} {pos_adj}, but {aspect_is} {neg_adj}.",
        "{aspect_is} {neg_adj}, but {aspect_is} {pos_adj}.",
        "{aspect_is} {mild_pos}, if a little {mild_neg}.", "{it_is} a mixed bag.",
        "{aspect_is} {dampener} {neg_adj}, but {aspect_is} {mild_pos}.",
        "Some scenes are {pos_adj} and others are {neg_adj}.", "{aspect_is} {mild_pos}, nothing more.",
        "{actor} is {mild_pos}, but the material is {mild_neg}.", "Parts of it work and parts of it do not.",
        "{aspect_is} {pos_adj}, but {it} never quite comes together.", "I wanted to like it more than I did.",
        "It is not {mild_neg}, but it is not {pos_adj} either.",
        "{aspect_is} {mild_neg}, but {mild_pos} enough.",
    ],
    "neutral": [
        "I saw it {when} at {venue} with my {relative}.", "{it} runs {duration}.",
        "It was shot in {place} over (two|three|four|five|six|eight) months.",
        "The story follows a {job_mod} {occupation} who {plot}.",
        "{actor} is cast as a {occupation} who {plot}.", "{costar} is the {occupation}'s {relative}.",
        "Most of it takes place in {setting}.", "It is based on a book by {person}.",
        "It is a remake of a {genre} from the {decade}.", "It is {director}'s {ordinal} film.",
        "The music is by {person}.", "It is now streaming on {platform}.", "It opens in {place} in {month}.",
        "Much of the dialogue is in {language}.", "It premiered in {place} in {month}.",
        "My {relative} had already read the book.", "The trailer gives away most of the story.",
        "Parts of it were filmed in black and white.", "There is a long scene in {setting} near the end.",
        "{aspect_is} {neutral_adj}.", "{lead} and {costar} have worked together before.",
        "{director} also wrote the script.", "The screening I went to was (packed|half full|quiet).",
        "It is the kind of {genre} they used to make in the {decade}.",
        "It is set in {place} in the {decade}.",
        "{lead} is in almost every scene.", "I had not seen any of {director}'s earlier films.",
        "The first twenty minutes take place in {setting}.", "{lead} learned {language} for the part.",
        "It is the first film {director} has made in {place}.", "I watched it in {language} with subtitles.",
        "There is a scene with a (piano|ferry|bicycle|typewriter|kite) that people will talk about.",
        "It was made for about {number} million dollars.",
        "The book it is based on came out in the {decade}.",
    ],
    "closing_positive": [
        "I would (highly|really|definitely|) recommend it.",
        "I would recommend it to anyone who likes {genres}.",
        "{rating_high}", "Go and see it!", "I will happily watch it again.", "Highly recommended.",
        "You will not be disappointed.",
    ],
    "closing_negative": [
        "I cannot recommend it.", "I would not recommend it to anyone.", "{rating_low}", "Skip this one.",
        "Avoid it.", "What a waste of (time|an evening).",
    ],
    "closing_neutral": [
        "{rating_middle}", "Only for those who follow everything {actor} does.",
        "Wait for it to come to {platform}.",
        "Make up your own mind.",
    ],
}

# What a user asks for in the chat dataset; ``{count}`` is filled in by the caller.
_REQUESTS: dict[str, list[str]] = {
    "request_positive": [
        "Write a positive review of {title}.", "Write a glowing review of the {genre} {title}.",
        "Can you write an enthusiastic review of {title}?", "Write a review of {title} that recommends it.",
        "Review {title} by {director} and tell me what makes it work.",
        "I need a positive review of {director}'s {title}.",
    ],
    "request_negative": [
        "Write a negative review of {title}.", "Write a harsh review of the {genre} {title}.",
        "Can you write a critical review of {title}?", "Write a review of {title} that warns people off it.",
        "Review {title} by {director} and explain what goes wrong.",
        "I need a negative review of {director}'s {title}.",
    ],
    "request_neutral": [
        "Write a balanced review of {title}.", "Write a mixed review of the {genre} {title}.",
        "Can you write an even handed review of {title}?",
        "Review {title} by {director}, with its good and bad points.",
        "Write a review of {title} that weighs its strengths and weaknesses.",
        "I need a mixed review of {director}'s {title}.",
    ],
    "request_length": [
        "Keep it to {count} sentences.", "Use {count} sentences.", "Write exactly {count} sentences.",
    ],
}

# fmt: on

RULES: dict[str, list[str]] = {**_TERMINALS, **_PHRASES, **_OPENINGS, **_SENTENCES, **_REQUESTS}

_SLOT = re.compile(r"\{(\w+)\}|\(([^()]*)\)")
_WORD = re.compile(r"[a-z]+n't|[a-z]+|'[a-z]+")


def expand(template: str, rng: random.Random, context: dict[str, str] | None = None) -> str:
    """Expand ``{rule}`` and ``(a|b)`` in ``template``, left to right, drawing from ``rng``."""
    context = context or {}

    def replace(match: re.Match[str]) -> str:
        name, choices = match.groups()
        if name is not None:
            if name in context:
                return context[name]
            return expand(rng.choice(RULES[name]), rng, context)
        return expand(rng.choice(choices.split("|")), rng, context)

    return _SLOT.sub(replace, template)


def tidy(text: str) -> str:
    """Collapse spaces left by empty choices, fix "a"/"an" and capitalise the first letter."""
    text = " ".join(text.split())
    text = re.sub(r" ([,.!?])", r"\1", text)
    text = re.sub(r"\b([Aa]) (?=[aeiouAEIOU])", r"\1n ", text)
    return text[:1].upper() + text[1:]


def words_of(text: str) -> list[str]:
    """The lowercase words of ``text`` as the vocabulary counts them ("isn't" is one, "'s" one)."""
    return _WORD.findall(text.lower())


@dataclass(frozen=True)
class Film:
    """The invented film a review is about; its facts fill ``{title}``, ``{lead}``, ... slots."""

    title: str
    director: str
    lead: str
    costar: str
    genre: str
    genres: str
    duration: str

    def context(self) -> dict[str, str]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Review:
    """One generated review. ``opening`` is its neutral lead-in (a prefix of ``text``)."""

    text: str
    label: str
    film: Film
    opening: str


def random_film(rng: random.Random) -> Film:
    director, lead, costar = (expand("{person}", rng) for _ in range(3))
    while costar == lead:
        costar = expand("{person}", rng)
    genre, genres = rng.choice(lx.GENRES)
    title = tidy(expand("{title}", rng))
    return Film(title, director, lead, costar, genre, genres, duration=rng.choice(lx.DURATIONS))


def sentence(rng: random.Random, rule: str, film: Film, **extra: str) -> str:
    """One tidy sentence (or sentence part) expanded from ``rule`` about ``film``.

    ``extra`` binds further slots, such as ``count`` in the ``request_length`` rule.
    """
    return tidy(expand(f"{{{rule}}}", rng, film.context() | extra))


# Body sentence mix per target polarity: (rule, weight). Mixed-sentiment reviews are the norm.
_BODY_MIX = {
    "positive": (("positive", 55), ("neutral", 25), ("mixed", 10), ("negative", 10)),
    "negative": (("negative", 55), ("neutral", 25), ("mixed", 10), ("positive", 10)),
    "neutral": (("positive", 22), ("negative", 22), ("mixed", 34), ("neutral", 22)),
}
_TAIL_MIX = {
    "positive": (("tail_positive", 75), ("tail_neutral", 25)),
    "negative": (("tail_negative", 75), ("tail_neutral", 25)),
    "neutral": (("tail_neutral", 60), ("tail_positive", 20), ("tail_negative", 20)),
}


def _weighted(rng: random.Random, mix: tuple[tuple[str, int], ...]) -> str:
    names, weights = zip(*mix, strict=True)
    return rng.choices(names, weights=weights)[0]


def write_review(
    rng: random.Random,
    label: str | None = None,
    film: Film | None = None,
    opening: str | None = None,
    num_sentences: int | None = None,
) -> Review:
    """Write one review of 2-6 sentences with target polarity ``label``.

    Passing the ``film`` and ``opening`` of another review writes a different continuation of
    the same opening; that is how preference pairs get two answers to one prompt.
    """
    label = label or rng.choice(LABELS)
    if label not in LABELS:
        raise ValueError(f"unknown review label {label!r}; expected one of {LABELS}")
    film = film or random_film(rng)
    opening = opening or sentence(rng, "opening", film)
    n = num_sentences or rng.randint(2, 6)
    parts = [opening + sentence(rng, _weighted(rng, _TAIL_MIX[label]), film)]
    used: set[str] = set()  # templates already used: a review never repeats a sentence pattern
    for i in range(1, n):
        closing = i == n - 1 and n >= 3 and rng.random() < 0.5
        rule = f"closing_{label}" if closing else _weighted(rng, _BODY_MIX[label])
        template = rng.choice([t for t in RULES[rule] if t not in used] or RULES[rule])
        used.add(template)
        parts.append(tidy(expand(template, rng, film.context())))
    return Review(" ".join(parts), label, film, opening)


def generate_reviews(n: int, seed: int = 0) -> list[str]:
    """``n`` review texts, identical for the same ``seed``; target polarities drawn uniformly."""
    rng = random.Random(seed)
    return [write_review(rng).text for _ in range(n)]


def vocabulary() -> list[str]:
    """Every word the grammar can emit (lowercased, sorted); see :func:`words_of`."""
    words: set[str] = set()
    for alternatives in RULES.values():
        for alternative in alternatives:
            words.update(words_of(re.sub(r"\{\w+\}|[()|]", " ", alternative)))
    for pair in lx.GENRES:
        words.update(w for item in pair for w in words_of(item))
    words.update(words_of("an"))  # written by tidy() in place of "a"
    return sorted(words)


def training_text(seed: int = 0, num_reviews: int = 20_000) -> list[str]:
    """Text to train the built-in tokenizer on: reviews, chat requests and the whole vocabulary.

    The vocabulary lines (lowercase and Capitalised, since names and sentence starts are
    capitalised) make sure every word the grammar can emit is seen at least once.
    """
    rng = random.Random(f"training_text:{seed}")
    requests = [
        sentence(rng, f"request_{rng.choice(LABELS)}", random_film(rng)) for _ in range(num_reviews // 20)
    ]
    words = VOCABULARY
    lines = [" ".join(words[i : i + 40]) for i in range(0, len(words), 40)]
    lines += [" ".join(w.capitalize() for w in words[i : i + 40]) for i in range(0, len(words), 40)]
    return generate_reviews(num_reviews, seed) + requests + lines


VOCABULARY: list[str] = vocabulary()
