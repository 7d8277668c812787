"""Answer normalization of the official VQA evaluation (VQAv2, OK-VQA; GQA in LAVIS).

The rules, as the official scorer applies them to an answer string:

1. Punctuation. For each mark in `PUNCTUATION` (note: neither the period, the apostrophe nor the
   colon is in it): if the *original* text has the mark next to a space (`"p "` or `" p"`), or the
   original text holds a digit-comma-digit group anywhere (`"1,000"`), the mark is deleted; otherwise
   it becomes a space (`"t-shirt"` -> `"t shirt"`, `"yes, it is"` -> `"yes it is"`).
2. Periods. Every period not directly followed by a digit is deleted (`"3.5"` keeps its period,
   `"yes."` and `"st. louis"` lose theirs). The official pattern meant "not between digits" but its
   look-behind is written as a look-ahead, so only the following character counts; it also passes a
   flag where the replacement count goes, so at most 32 periods are deleted. Both quirks are kept.
3. Words. The text is lowercased and split on whitespace; number words zero to ten (and "none") become
   digits, the articles "a", "an" and "the" are dropped, and apostrophe-less contractions are given
   their apostrophe back (`"dont"` -> `"don't"`), then the words are joined with single spaces.

Written from the description of the official script (`vqaEval.py`, GT-Vision-Lab/VQA, as vendored by
LAVIS), not copied from it.
"""

from __future__ import annotations

import re

# marks handled by rule 1 (the period has its own rule)
PUNCTUATION: tuple[str, ...] = tuple(';/[]"{}()=+\\_-><@`,?!')

# digit, comma, digit: its presence anywhere makes every mark a deletion rather than a space
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# a period not followed by a digit (the official look-behind typo reads as this look-ahead)
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_MAX_PERIODS = 32  # re.UNICODE (== 32) passed as the count of `sub` by the official script

NUMBER_WORDS: dict[str, str] = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}

ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})

# The official contractions table, one "written form: restored form" pair per entry. It keeps the
# official entries verbatim, quirks included: capitalized keys ("Im") never match the lowercased
# words, and "somebody'd" maps to "somebodyd".
_CONTRACTION_PAIRS = """
aint:ain't arent:aren't cant:can't couldve:could've couldnt:couldn't couldn'tve:couldn't've
couldnt've:couldn't've didnt:didn't doesnt:doesn't dont:don't hadnt:hadn't hadnt've:hadn't've
hadn'tve:hadn't've hasnt:hasn't havent:haven't hed:he'd hed've:he'd've he'dve:he'd've hes:he's
howd:how'd howll:how'll hows:how's Id've:I'd've I'dve:I'd've Im:I'm Ive:I've isnt:isn't itd:it'd
itd've:it'd've it'dve:it'd've itll:it'll let's:let's maam:ma'am mightnt:mightn't
mightnt've:mightn't've mightn'tve:mightn't've mightve:might've mustnt:mustn't mustve:must've
neednt:needn't notve:not've oclock:o'clock oughtnt:oughtn't ow's'at:'ow's'at 'ows'at:'ow's'at
'ow'sat:'ow's'at shant:shan't shed've:she'd've she'dve:she'd've she's:she's shouldve:should've
shouldnt:shouldn't shouldnt've:shouldn't've shouldn'tve:shouldn't've somebody'd:somebodyd
somebodyd've:somebody'd've somebody'dve:somebody'd've somebodyll:somebody'll somebodys:somebody's
someoned:someone'd someoned've:someone'd've someone'dve:someone'd've someonell:someone'll
someones:someone's somethingd:something'd somethingd've:something'd've
something'dve:something'd've somethingll:something'll thats:that's thered:there'd
thered've:there'd've there'dve:there'd've therere:there're theres:there's theyd:they'd
theyd've:they'd've they'dve:they'd've theyll:they'll theyre:they're theyve:they've twas:'twas
wasnt:wasn't wed've:we'd've we'dve:we'd've weve:we've werent:weren't whatll:what'll whatre:what're
whats:what's whatve:what've whens:when's whered:where'd wheres:where's whereve:where've whod:who'd
whod've:who'd've who'dve:who'd've wholl:who'll whos:who's whove:who've whyll:why'll whyre:why're
whys:why's wont:won't wouldve:would've wouldnt:wouldn't wouldnt've:wouldn't've
wouldn'tve:wouldn't've yall:y'all yall'll:y'all'll y'allll:y'all'll yall'd've:y'all'd've
y'alld've:y'all'd've y'all'dve:y'all'd've youd:you'd youd've:you'd've you'dve:you'd've
youll:you'll youre:you're youve:you've
"""
CONTRACTIONS: dict[str, str] = dict(pair.split(":", 1) for pair in _CONTRACTION_PAIRS.split())


def normalize_punctuation(text: str) -> str:
    """Rules 1 and 2: punctuation marks deleted or turned into spaces, stray periods deleted."""
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        if delete_all or f"{mark} " in text or f" {mark}" in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out, count=_MAX_PERIODS)


def normalize_words(text: str) -> str:
    """Rule 3: lowercase, number words to digits, articles dropped, contractions restored."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(text: str) -> str:
    """The full official normalization of one answer (rules 1-3), after whitespace cleanup."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return normalize_words(normalize_punctuation(text))
