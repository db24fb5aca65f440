"""Word lists of the built-in review world, grouped by the role they play in the grammar.

Two kinds of lists live here:

* Neutral lists (names, title words, places, jobs, plots, film aspects, genres). The gold scorer
  (VADER) gives none of their words a valence -- they leave out "heart", "lost", "villain",
  "comedy", "horror" and the like -- so a title or a plot can never move a review's score by
  accident; only the sentiment lists below do. ``tests/builtin/test_corpus.py`` checks this
  against VADER's own lexicon.
* Sentiment lists: words VADER knows (every one has a lexicon valence of the stated sign), plus the
  intensifiers and dampeners VADER's booster rules react to. Negation and "but" live in the
  sentence templates of :mod:`rlhf_cli.builtin.corpus`.

Lists are written as whitespace-separated words (``_words``) or comma-separated phrases
(``_phrases``) to keep the file short; the grammar only ever picks whole entries.
"""

from __future__ import annotations


def _words(text: str) -> list[str]:
    return text.split()


def _phrases(text: str) -> list[str]:
    return [" ".join(p.split()) for p in text.split(",") if p.strip()]


# --- people ----------------------------------------------------------------------------------
FIRST_NAMES = _words("""
    Ada Alma Amara Anton Arlo Astrid Basil Bea Bram Bruno Calla Cecil Celeste Clara Cyrus Dalia
    Dario Delphine Desmond Dov Edda Elias Elio Elsa Emil Esme Ezra Fabian Felix Fenna Freya Gaspar
    Gideon Greta Hana Hollis Hugo Ida Imre Ines Ivo Jasper Jonas Jovan Juno Kaito Kasper Kira Lena
    Leona Linus Lior Lorenzo Lucia Magnus Mara Marek Maren Milo Mina Nadia Nico Nils Nora Odile
    Olek Orla Oren Otto Paloma Pavel Petra Priya Quentin Rafael Ravi Rhea Rosa Rufus Sanna Saoirse
    Selma Silas Soren Talia Tamsin Teo Thea Tobias Ula Valentin Vera Viggo Wanda Wren Yara Yusuf
    Zara Zeno Agnes Ambrose Anouk Bastian Benedek Birgit Caspian Cosima Dagny Emeric Enzo Faye
    Florin Gunnar Helka Ilse Isolde Jarek Kalani Lasse Leopold Malin Matteo Noor Oona Orsolya Pim
    Romilly Sabine Stellan Tove Ugo Vesna Wilhelmina Yannick Zofia
""")

SURNAMES = _words("""
    Abernathy Achterberg Adeyemi Alvarado Ashdown Balogun Bauer Bellweather Blackwood Brenner
    Calloway Carrow Castellano Costa Delacroix Devereaux Dimitrov Dunmore Ellery Engel Eriksen
    Fairbanks Falkner Ferreira Fitzroy Gallo Galloway Garrido Grunewald Halvorsen Hartigan
    Haverford Holm Imamura Ishikawa Iversen Jablonski Jansson Kavanagh Kessler Kowalczyk Lachance
    Larkin Lindqvist Loughlin Marchetti Mendel Moreau Moretti Nakamura Northcott Novak Nyberg Obi
    Okafor Orsini Oyelaran Pellegrini Penhaligon Quinlan Quist Radcliffe Ramaswamy Rasmussen
    Rourke Salonen Sandoval Sorensen Strand Szabo Takahashi Tanaka Tavares Thornbury Ulrich
    Underhill Valdez Vasquez Vogel Weatherby Wexler Whitlock Winterbottom Yilmaz Zielinski Aldana
    Bergstrom Cavendish Dragomir Eastwick Fontaine Gravelle Holloway Ingram Jaramillo Kimura Lindgren
    Maddox Nilsen Ostrowski Petrakis Quarles Rennick Sokolova Trelawney Varga Wainwright Yoshida Zamora
""")

RELATIVES = _words("""
    sister brother mother father cousin aunt uncle grandmother grandfather wife husband partner
    daughter son neighbour roommate colleague
""")

# --- film titles -----------------------------------------------------------------------------
TITLE_ADJECTIVES = _words("""
    Silent Crimson Last Hidden Northern Golden Distant Hollow Endless Sleeping Secret Frozen
    Scarlet Silver Quiet Wandering Midnight Eastern Western Paper Iron Glass Velvet Electric
    Little Second Seventh Invisible Sunken Painted Borrowed Rising Sixth Open Narrow
    Crooked Faraway Winter Summer Autumn Stone Copper Amber Blue Green Black White Tall Long
    Final Burning Southern Hundredth Ninth Upper Outer Inner Marble Wooden
""")

TITLE_NOUNS = _words("""
    Harbor River Kingdom Night Lighthouse Garden Bridge Station Orchard Mountain Valley Island
    Crossing Letter Mirror Window Road Train Ferry Tide Horizon Lantern Compass Archive Forest
    Meadow Shore Canyon Frontier Signal Echo Shadow Season Circus Carnival Hotel Theatre Museum
    Observatory Cathedral Tower Castle Village Country City Street Avenue Bay Coast Desert Glacier
    Volcano Comet Planet Moon Sun Sky Clock Piano Violin Typewriter Telegram Postcard Map Key Door
    Staircase Attic Cellar Kitchen Balcony Rooftop Orchestra Parade Wedding Inheritance Voyage
    Expedition Passage Return Departure Arrival Harvest Frost Thaw Fog Rain Snow Wind Thunder
    Lightning Ember Smoke Dust Sand Ink Thread Needle Feather Wing Nest Fox Wolf Raven Whale
    Tiger Horse Stag Owl Sparrow Swan Moth Lake Canal Chapel Market Border Anchor Engine Kite Orchid
    Lagoon Quarry Pavilion Caravan Harpoon Glider Saxophone Accordion Chandelier Fountain Greenhouse
    Windmill Junction Monsoon Eclipse Atlas Citadel Carousel Ledger Satellite Tram
""")

MONTHS = _words("January February March April May June July August September October November December")

# --- places and settings ---------------------------------------------------------------------
PLACES = _phrases("""
    Lisbon, Iceland, Patagonia, Morocco, Quebec, Sicily, Norway, Tasmania, Mongolia, Scotland,
    Cornwall, Kyoto, Marseille, Naples, Montana, Alaska, Nevada, Vienna, Prague, Budapest, Tangier,
    Havana, Cairo, Istanbul, Trieste, Bergen, Galway, Porto, Seville, Krakow, Riga, Tbilisi, Oaxaca,
    Valparaiso, Hokkaido, Brittany, Sardinia, Lapland, Anatolia, Manitoba, Marlow, Vellmar,
    Oskarsby, Lindenfeld, Port Alder, Reykjavik, Zanzibar, Tallinn, Lyon, Bologna, Ghent, Antwerp,
    Gdansk, Asturias, Yukon, Lofoten, Kerala, Sapporo, Hobart, Dunedin, Marrakesh
""")

SETTINGS = _phrases("""
    a small fishing town, a crowded apartment building, a remote research station, a travelling circus,
    a seaside hotel, a mountain village, a busy newsroom, a boarding school, a late night diner,
    a vineyard, a space station, a lighthouse, a river barge, a department store, a country estate,
    an island ferry, a desert motel, a city hospital, a jazz club, a train across Europe,
    a flower market, a sleepy suburb, a fashion house, an old bookshop, a radio station,
    a cattle ranch, a mining town, a summer camp, a theatre company, a bakery, a ski resort,
    a canal boat, a rooftop garden, a night train, an observatory, a ceramics studio, a village school,
    an oyster farm, a recording studio, a small airport
""")

VENUES = _phrases("""
    the cinema, a packed cinema, a half full cinema, the local cinema, a film club,
    a drive in, home, my flat, the art house down the road, an open air screening,
    a preview screening, the multiplex
""")

LANGUAGES = _words("""
    Portuguese Finnish Japanese Italian Polish Spanish French German Greek Turkish Korean Swedish
    Hungarian Dutch Icelandic Arabic
""")

# --- story material (all neutral) -------------------------------------------------------------
OCCUPATIONS = _phrases("""
    teacher, pilot, night nurse, detective, lighthouse keeper, baker, journalist, photographer,
    architect, fisherman, violinist, chess player, taxi driver, postman, librarian, painter, chef,
    tailor, engineer, astronaut, mechanic, farmer, surgeon, lawyer, botanist, sailor, widower,
    magician, translator, boxer, dancer, singer, novelist, archaeologist, pianist, gardener,
    shopkeeper, courier, radio host, beekeeper, cartographer, clockmaker, film student, bus driver,
    night watchman, ferry captain, geologist, diplomat, locksmith, puppeteer, florist, carpenter,
    crossword setter, tour guide, zookeeper, stage manager, glassblower, bookbinder, ballet teacher,
    lorry driver, interpreter, watchmaker, saxophonist, park ranger
""")

OCCUPATION_MODIFIERS = _phrases(
    "retired, young, former, elderly, teenage, small town, veteran, newly married"
)

PLOT_ACTIONS = _phrases("""
    moves to {setting}, inherits an old house in {place}, takes a job at {setting},
    discovers a box of old letters, offers to teach a stranger to drive,
    tries to finish a book before the summer ends, spends one summer at {setting},
    starts a band with three neighbours, searches for a rare bird, plans a wedding in {place},
    has to deliver a package across {place}, trains for a marathon, opens a small restaurant,
    builds a boat in the back garden, meets an old classmate in {place}, takes part in a baking contest,
    follows a map drawn by a grandfather, learns to sail, looks after a neighbour's dog,
    records the sounds of the city, repairs an old cinema, organises a village dance,
    swaps houses with a stranger from {place}, drives across the country with a teenage son,
    writes letters to a pen pal in {place}, joins an expedition to {place},
    returns home after twenty years away, looks for an estranged brother,
    gets a ticket to {place}, keeps a secret from the whole family, paints every house on one street,
    teaches a parrot to sing, sells umbrellas in {place}, walks all the way across {place},
    repairs clocks for the whole village, photographs every bridge in {place},
    runs a night school for taxi drivers, rebuilds a piano from spare parts
""")

# --- the film and its parts -------------------------------------------------------------------
ASPECTS_SINGULAR = _phrases("""
    the plot, the story, the script, the screenplay, the dialogue, the acting, the cast,
    the direction, the cinematography, the camera work, the editing, the pacing, the ending,
    the opening, the first hour, the second half, the third act, the soundtrack, the score,
    the music, the sound design, the lighting, the production design, the set design,
    the costume design, the climax, the final scene, the opening scene, the premise, the tone,
    the chemistry between the leads, the world building, the visual style, the lead performance,
    the rest of the cast, the main character, the twist, the script's structure, the middle section
""")

ASPECTS_PLURAL = _phrases("""
    the performances, the characters, the action scenes, the visual effects, the digital effects,
    the songs, the costumes, the sets, the locations, the sword scenes, the flashbacks,
    the side characters, the landscapes, the dialogue scenes, the chase scenes, the musical numbers,
    the smaller roles, the camera movements, the close ups, the car chases
""")

# (singular, plural): genres whose names VADER reads as neutral ("comedy" and "horror" are not).
GENRES = [
    tuple(p.split("/"))
    for p in _phrases("""
    drama/dramas, western/westerns, musical/musicals, mystery/mysteries, documentary/documentaries,
    biopic/biopics, heist movie/heist movies, noir/noirs, satire/satires, spy film/spy films,
    fantasy film/fantasy films, science fiction film/science fiction films, family film/family films,
    animated film/animated films, road movie/road movies, period drama/period dramas,
    courtroom drama/courtroom dramas, coming of age story/coming of age stories,
    detective story/detective stories, sports drama/sports dramas, monster movie/monster movies,
    costume drama/costume dramas, chamber piece/chamber pieces, space western/space westerns
""")
]

FILM_NOUNS = _words("film movie picture debut adaptation watch ride experience effort")

DURATIONS = _phrases("""
    just under two hours, about ninety minutes, nearly three hours, a little over two hours,
    exactly two hours, about two and a half hours, barely eighty minutes, close to three hours
""")

NUMBER_WORDS = _words("one two three four five six seven eight nine ten")
ORDINALS = _words("first second third fourth fifth sixth seventh eighth")
DECADES = _words("fifties sixties seventies eighties nineties")
PLATFORMS = _words("Cinevault Reelbox Flickstream Kinoteka Screenhouse")

# --- small neutral phrases ---------------------------------------------------------------------
WHEN = _phrases("""
    last night, last weekend, on Sunday, yesterday, this afternoon, on a foggy Tuesday,
    on opening night, on a wet Thursday, on a quiet evening, a few days ago, in {month}
""")
WHEN_STARTS = _phrases("Last night, Over the weekend, On Sunday, Yesterday, This week, In {month}")
RELEASED = _phrases("last week, this month, in {month}, last spring, over the summer, a few weeks ago")
SEEN_IN = _phrases("in years, this year, in a long time, in ages, in the last decade")
NEUTRAL_ADJECTIVES = _phrases("""
    slow, quiet, loud, long, short, simple, familiar, old fashioned, understated, unusual,
    restrained, talky, dark, bleak, very European
""")
# Scores out of ten by target polarity: VADER ignores them, a learned reward model need not.
HIGH_SCORES = _phrases("eight, nine, ten, eight and a half, nine and a half")
MIDDLE_SCORES = _phrases("five, six, seven, five and a half, six and a half")
LOW_SCORES = _phrases("one, two, three, four, two and a half")

# --- sentiment (every word here has a VADER valence of the named sign) -------------------------
POSITIVE_ADJECTIVES = _words("""
    great wonderful brilliant excellent superb beautiful charming delightful fantastic gorgeous
    clever impressive lovely stunning terrific amazing perfect enjoyable entertaining thrilling
    exciting funny elegant magnificent outstanding marvelous inspired heartfelt lively pleasant
    smart powerful fresh engaging sweet graceful confident bold hilarious inspiring remarkable
    satisfying brave fabulous awesome splendid compelling
""")
MILD_POSITIVE_ADJECTIVES = _words("good nice fine solid fair competent okay pleasant")

NEGATIVE_ADJECTIVES = _words("""
    bad terrible awful boring dull weak horrible painful ugly stupid lazy confusing messy
    disappointing annoying dreadful lame irritating frustrating poor pathetic ridiculous
    unpleasant embarrassing depressing exhausting dumb worthless useless hopeless lousy crappy
    flawed
""")
MILD_NEGATIVE_ADJECTIVES = _words("weak confusing awkward flawed messy dull")

POSITIVE_NOUNS = _words("masterpiece triumph joy delight treat pleasure success winner gift")
NEGATIVE_NOUNS = _phrases("mess, disaster, failure, waste of time, bore, disappointment, embarrassment")

POSITIVE_VERBS_PAST = _words("loved enjoyed adored admired liked appreciated")
POSITIVE_VERBS = _words("love enjoy adore admire like appreciate")
NEGATIVE_VERBS_PAST = _words("hated disliked despised")

POSITIVE_FEELINGS = _words("happy thrilled glad satisfied excited inspired delighted cheerful amused")
NEGATIVE_FEELINGS = _words("bored confused annoyed angry sad disappointed tired frustrated cheated irritated")

# VADER boosts the next sentiment word after these (and damps it after the dampeners).
INTENSIFIERS = _words("""
    really very extremely incredibly remarkably absolutely thoroughly totally utterly deeply
    particularly exceptionally quite so especially unbelievably tremendously enormously
""")
DAMPENERS = _phrases("somewhat, slightly, kind of, sort of, a little, marginally, partly")

# Lists that must stay neutral to VADER (checked by the tests).
NEUTRAL_LISTS = {
    "FIRST_NAMES": FIRST_NAMES,
    "SURNAMES": SURNAMES,
    "RELATIVES": RELATIVES,
    "TITLE_ADJECTIVES": TITLE_ADJECTIVES,
    "TITLE_NOUNS": TITLE_NOUNS,
    "PLACES": PLACES,
    "SETTINGS": SETTINGS,
    "VENUES": VENUES,
    "LANGUAGES": LANGUAGES,
    "OCCUPATIONS": OCCUPATIONS,
    "OCCUPATION_MODIFIERS": OCCUPATION_MODIFIERS,
    "PLOT_ACTIONS": PLOT_ACTIONS,
    "ASPECTS_SINGULAR": ASPECTS_SINGULAR,
    "ASPECTS_PLURAL": ASPECTS_PLURAL,
    "GENRES": [word for pair in GENRES for word in pair],
    "FILM_NOUNS": FILM_NOUNS,
    "DURATIONS": DURATIONS,
    "PLATFORMS": PLATFORMS,
    "WHEN": WHEN,
    "WHEN_STARTS": WHEN_STARTS,
    "SEEN_IN": SEEN_IN,
    "RELEASED": RELEASED,
    "NEUTRAL_ADJECTIVES": NEUTRAL_ADJECTIVES,
}
