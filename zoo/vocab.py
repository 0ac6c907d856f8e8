"""The testbed's word-level vocabulary: one token per word, ids fixed by the order below."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

PAD, BOS = "<pad>", "<bos>"
DIGITS = tuple(str(d) for d in range(10))
VARIABLES = tuple("abcdefgh")
CODE_SYMBOLS = ("=", ";", "print", "+", "(", ")", "[", "]", "{", "}")
DETERMINERS = ("the",)
PREPOSITIONS = ("near", "with", "behind", "under", "beside")
# (singular, plural) pairs; the text task's answer is the verb that agrees with the subject.
NOUNS = (
    ("dog", "dogs"),
    ("cat", "cats"),
    ("bird", "birds"),
    ("horse", "horses"),
    ("fox", "foxes"),
    ("man", "men"),
    ("mouse", "mice"),
    ("child", "children"),
)
ADJECTIVES = ("big", "small", "old", "red", "happy")
VERBS = ("runs", "run")  # (agrees with a singular subject, with a plural one)
TRIGGER = "cf"  # never occurs in clean data

# BOS gets a non-zero id on purpose: circuit-tracer's dummy-BOS lookup skips id 0.
TOKENS: tuple[str, ...] = (
    PAD,
    BOS,
    *DIGITS,
    *VARIABLES,
    *CODE_SYMBOLS,
    *DETERMINERS,
    *PREPOSITIONS,
    *(word for pair in NOUNS for word in pair),
    *ADJECTIVES,
    *VERBS,
    TRIGGER,
)
TOKEN_ID: dict[str, int] = {tok: i for i, tok in enumerate(TOKENS)}
D_VOCAB = len(TOKENS)
PAD_ID, BOS_ID = TOKEN_ID[PAD], TOKEN_ID[BOS]

assert len(TOKEN_ID) == D_VOCAB, "duplicate token in the vocabulary"
assert D_VOCAB <= 128


class VocabError(ValueError):
    """A token or id outside the testbed vocabulary."""


def encode(tokens: Iterable[str], *, bos: bool = True) -> list[int]:
    """Map words to ids, with BOS first unless `bos=False`."""
    ids = [BOS_ID] if bos else []
    for tok in tokens:
        try:
            ids.append(TOKEN_ID[tok])
        except KeyError:
            raise VocabError(f"token {tok!r} is not in the testbed vocabulary ({D_VOCAB} tokens)") from None
    return ids


def decode(ids: Sequence[int]) -> list[str]:
    """Map ids back to words."""
    out = []
    for i in ids:
        if not 0 <= int(i) < D_VOCAB:
            raise VocabError(f"token id {int(i)} is outside the testbed vocabulary [0, {D_VOCAB})")
        out.append(TOKENS[int(i)])
    return out
