"""Parsing of volume lists for ``bec queue enqueue``.

Format: one volume per line, ``W_ID,I_ID`` or ``W_ID I_ID``; ``#`` starts a comment;
blank lines are ignored. The whole input is validated before anything is sent: a bad
line is named by its number and the command sends nothing.
"""
from __future__ import annotations

import re
from typing import Iterable

from bec.errors import BadInput
from bec.control.ids import check_i_id, check_w_id

_SEPARATOR = re.compile(r"[,\s]+")


def parse_volume(text: str, where: str) -> tuple[str, str]:
    parts = [p for p in _SEPARATOR.split(text.strip()) if p]
    if len(parts) != 2:
        raise BadInput(f"{where}: expected 'W_ID,I_ID' or 'W_ID I_ID', got {text.strip()[:60]!r}")
    try:
        return check_w_id(parts[0]), check_i_id(parts[1])
    except BadInput as exc:
        raise BadInput(f"{where}: {exc}") from None


def parse_lines(lines: Iterable[str], source: str) -> list[tuple[str, str]]:
    volumes = []
    for number, raw in enumerate(lines, start=1):
        if number == 1:
            raw = raw.removeprefix("\ufeff")  # the byte-order mark Windows editors write
        line = raw.split("#", 1)[0].strip()
        if line:
            volumes.append(parse_volume(line, f"{source} line {number}"))
    return volumes


def dedupe(volumes: Iterable[tuple[str, str]]) -> tuple[list[tuple[str, str]], int]:
    """Order-preserving de-duplication; returns the unique volumes and how many were dropped."""
    seen: set[tuple[str, str]] = set()
    unique = []
    dropped = 0
    for vol in volumes:
        if vol in seen:
            dropped += 1
        else:
            seen.add(vol)
            unique.append(vol)
    return unique, dropped
