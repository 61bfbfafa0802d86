"""The character error rate, one definition for the tests, the quality command and the demo.

CER = edit distance between the OCR text and the transcript, both NFC-normalised with every
whitespace character removed, divided by the transcript's length. Whitespace is ignored
because Tibetan separates syllables with the tsheg, not spaces: where a line breaks, whether
a shad is followed by one space or two, and how lines are joined are layout, not reading.
"""
from __future__ import annotations

import unicodedata


def normalise(text: str) -> str:
    return "".join(unicodedata.normalize("NFC", text).split())


def errors(hypothesis: str, reference: str) -> tuple[int, int]:
    """(edit distance, transcript length) after normalisation: sums of these over pages give
    a corpus's CER weighted by length, not a mean of ratios."""
    from rapidfuzz.distance import Levenshtein

    hyp, ref = normalise(hypothesis), normalise(reference)
    return Levenshtein.distance(hyp, ref), len(ref)


def cer(hypothesis: str, reference: str) -> float:
    distance, length = errors(hypothesis, reference)
    return distance / length if length else float(distance > 0)
