"""Tibetan text for generated pages: syllables from Debian's hunspell-bo word list.

hunspell-bo lists Tibetan *syllable stems* with affix flags (vowels, final letters,
grammatical particles), so expanding its ``.dic`` by the ``SFX`` rules of its ``.aff``
gives a few thousand valid syllables with real stacks (prefixes, superscripts,
subscripts) and vowel signs: exactly what decides a Tibetan line's silhouette. Text
is then strung together the way printed texts punctuate it: syllables joined by tsheg,
phrases closed by a shad and a space, verse feet separated by ``། །``, a pecha's first
line opened by the yig mgo ``༄༅། །``. Nothing here tries to make sense: line detection
only needs the shapes, widths and gaps of real writing.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

__all__ = ["DICTIONARY", "syllables", "Writer", "tibetan_number", "MissingText"]

DICTIONARY = Path("/usr/share/hunspell/bo.dic")
TSHEG, SHAD = "\u0f0b", "\u0f0d"
YIG_MGO = "\u0f04\u0f05"
TIBETAN_DIGITS = "\u0f20\u0f21\u0f22\u0f23\u0f24\u0f25\u0f26\u0f27\u0f28\u0f29"
#: Grammatical particles and the commonest short syllables: real text is about one
#: third of these, and their small, stack-free shapes matter for a line's look.
PARTICLES = ("པ", "བ", "པོ", "བོ", "མ", "ནི", "ནས", "དང", "གི", "ཀྱི", "གྱི", "འི", "ཡི",
             "གིས", "ཀྱིས", "གྱིས", "ལ", "ན", "སུ", "ཏུ", "དུ", "རུ", "ར", "ཏེ", "དེ", "སྟེ",
             "ཅིང", "ཞིང", "ཤིང", "ཀྱང", "ཡང", "འང", "མི", "མེད", "ཡིན", "ཡོད", "ལས",
             "སོ", "ཏོ", "དོ", "ངོ", "རོ", "ལོ", "ཅེས", "ཞེས", "དེ", "འདི", "རྣམས", "ཐམས",
             "ཅད", "བྱ", "བ", "ཆེན", "རྒྱལ", "ཆོས", "སངས", "རྒྱས", "བྱང", "ཆུབ", "སེམས",
             "དཔའ", "ཤེས", "རབ", "ཀྱི", "ཕ", "རོལ", "ཏུ", "ཕྱིན", "གསུངས")


class MissingText(RuntimeError):
    """The word list is not installed (Debian package ``hunspell-bo``)."""


def _parse_aff(text: str) -> dict[str, list[tuple[str, str, str]]]:
    """SFX rules: flag → [(strip, add, continuation flags)]. Conditions are all ``.``."""
    rules: dict[str, list[tuple[str, str, str]]] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 5 or parts[0] != "SFX":
            continue
        flag, strip, add = parts[1], parts[2], parts[3]
        add, _, cont = add.partition("/")
        rules.setdefault(flag, []).append(("" if strip == "0" else strip,
                                           "" if add == "0" else add, cont))
    return rules


def _expand(word: str, flags: str, rules: dict[str, list[tuple[str, str, str]]],
            out: set[str], depth: int = 0) -> None:
    if "N" not in flags and word:
        out.add(word)
    if depth > 3:
        return
    for flag in flags:
        for strip, add, cont in rules.get(flag, ()):
            stem = word[:-len(strip)] if strip and word.endswith(strip) else word
            _expand(stem + add, cont, rules, out, depth + 1)


@functools.lru_cache(maxsize=1)
def syllables(dictionary: Path = DICTIONARY) -> tuple[str, ...]:
    """Every syllable the hunspell-bo word list accepts, sorted (a few thousand)."""
    aff = dictionary.with_suffix(".aff")
    try:
        dic_lines = dictionary.read_text(encoding="utf-8").splitlines()
        rules = _parse_aff(aff.read_text(encoding="utf-8"))
    except OSError as exc:
        raise MissingText(f"the Tibetan word list {dictionary} is missing "
                          f"(apt-get install hunspell-bo): {exc.strerror or exc}") from None
    out: set[str] = set()
    for line in dic_lines[1:]:
        word, _, flags = line.strip().partition("/")
        if word:
            _expand(word, flags, rules, out)
    return tuple(sorted(out))


def tibetan_number(n: int, digits: bool = True) -> str:
    """``n`` in Tibetan digits (folio numbers, table-of-contents pages)."""
    text = str(int(n))
    return "".join(TIBETAN_DIGITS[int(c)] for c in text) if digits else text


class Writer:
    """A stream of punctuated Tibetan text drawn from one ``rng``.

    ``chunks`` hands out text in *chunks*: runs of syllables with their tsheg and shad,
    split where a space would be. Layout code fills a line chunk by chunk, so a line
    never breaks inside a syllable, and the spaces after shads are where justified
    lines stretch.
    """

    def __init__(self, rng: np.random.Generator, verse: bool = False) -> None:
        self.rng = rng
        self.verse = verse
        self.words = syllables()
        self._foot = 0

    def syllable(self) -> str:
        rng = self.rng
        if rng.random() < 0.35:
            return PARTICLES[int(rng.integers(len(PARTICLES)))]
        return self.words[int(rng.integers(len(self.words)))]

    def phrase(self, lo: int = 2, hi: int = 10) -> str:
        """Syllables joined by tsheg, closed by a shad (``ང`` keeps its tsheg before it)."""
        n = int(self.rng.integers(lo, hi + 1))
        body = TSHEG.join(self.syllable() for _ in range(n))
        end = TSHEG + SHAD if body.endswith("ང") else SHAD
        if self.rng.random() < 0.04:
            end += SHAD                                   # double shad at a section end
        return body + end

    def chunk(self) -> str:
        """One run up to the next space: a phrase, opened by a shad after a verse foot."""
        if self.verse:
            self._foot += 1
            return (SHAD if self._foot > 1 else "") + self.phrase(3, 5)
        text = self.phrase()
        if self.rng.random() < 0.25:
            text = SHAD + text                            # "། །" between verses/clauses
        return text

    def opening(self) -> str:
        """The yig mgo that opens a pecha's first line."""
        return YIG_MGO + SHAD + (SHAD if self.rng.random() < 0.5 else "")

    def words_only(self, n: int) -> str:
        """``n`` syllables without a closing shad (titles, captions, table entries)."""
        return TSHEG.join(self.syllable() for _ in range(max(1, n)))
