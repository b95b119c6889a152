"""Slice lists as users type and read them: one syntax for every command and the napari widget.

A slice list is a comma-separated list of parts, each one of

* ``N`` — one slice;
* ``A-B`` — A to B **inclusive** (``20-24`` is 20, 21, 22, 23, 24), as a person counts;
* ``A:B`` — A up to B **exclusive**, as in Python (``20:25`` is the same five slices); ``A:`` runs to
  the last slice and ``:B`` starts at 0.

Parts may mix and overlap (``0:40,80:128``, ``10, 12, 20-24``); the result is sorted and unique.
Indices count canonical slices from 0; negative (from-the-end) indices are not accepted, because
``-3`` next to ``A-B`` would be ambiguous. Every mistake raises :class:`SliceSpecError` naming the
part and the flag. :data:`SLICE_SYNTAX` is the sentence every help text and tooltip uses.

Imports nothing heavy: the plugin reads it on the GUI thread.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from .errors import SliceSpecError

__all__ = ["SLICE_SYNTAX", "SliceSpec", "SliceSpecError", "parse_slice_spec", "parse_slices", "parse_slice_list",
           "slice_indices", "slice_list_text"]

#: How slice lists are written: the same words in every help text, tooltip and error message.
SLICE_SYNTAX = ("N, A-B (inclusive: 20-24 is 20 to 24) or A:B (half-open, as in Python: 20:25 is 20 to 24), "
                "comma-separated, e.g. '10, 12, 20-24' or '0:40,80:128'")

_SINGLE = re.compile(r"^(\d+)$")
_INCLUSIVE = re.compile(r"^(\d+)\s*-\s*(\d+)$")
_HALF_OPEN = re.compile(r"^(\d*)\s*:\s*(\d*)$")


@dataclass(frozen=True)
class SliceSpec:
    """A parsed slice list: half-open ``(start, stop)`` ranges, ``stop`` None meaning "to the last slice"."""

    text: str
    ranges: tuple[tuple[int, Optional[int]], ...]
    what: str = "slices"

    def indices(self, n_slices: Optional[int] = None, where: str = "the scan") -> list[int]:
        """The sorted, unique slice indices; with ``n_slices``, every one must lie in ``[0, n_slices)``."""
        return slice_indices(self.ranges, n_slices, where=where, what=self.what, text=self.text)


def parse_slice_spec(text: str, what: str = "slices") -> SliceSpec:
    """Read ``text`` (see the module docstring); ``what`` names the flag or field in error messages."""
    ranges: list[tuple[int, Optional[int]]] = []
    for raw in str(text).replace(";", ",").split(","):
        part = raw.strip().replace("–", "-").replace("—", "-")
        if not part:
            continue
        ranges.append(_parse_part(part, text, what))
    return SliceSpec(str(text), tuple(ranges), what)


def _parse_part(part: str, text: str, what: str) -> tuple[int, Optional[int]]:
    if match := _SINGLE.match(part):
        index = int(match[1])
        return index, index + 1
    if match := _INCLUSIVE.match(part):
        low, high = int(match[1]), int(match[2])
        if low > high:
            raise SliceSpecError(f"{what} {text!r}: {part!r} is empty (A-B needs A <= B); write {SLICE_SYNTAX}")
        return low, high + 1
    if match := _HALF_OPEN.match(part):
        start = int(match[1]) if match[1] else 0
        stop = int(match[2]) if match[2] else None
        if stop is not None and start >= stop:
            raise SliceSpecError(f"{what} {text!r}: {part!r} is empty (A:B stops before B, so it needs A < B); "
                                 f"write {SLICE_SYNTAX}")
        return start, stop
    hint = " (slice indices count from 0; negative indices are not accepted)" if part.startswith("-") else ""
    raise SliceSpecError(f"{what} {text!r}: cannot read {part!r}{hint}; write {SLICE_SYNTAX}")


def slice_indices(ranges: Sequence[tuple[int, Optional[int]]], n_slices: Optional[int] = None, *,
                  where: str = "the scan", what: str = "slices", text: Optional[str] = None) -> list[int]:
    """Sorted, unique indices of half-open ``ranges``; with ``n_slices`` they must lie in ``[0, n_slices)``."""
    shown = text if text is not None else ",".join(f"{a}:{'' if b is None else b}" for a, b in ranges)
    indices: set[int] = set()
    outside: list[tuple[int, int]] = []      # [low, high) beyond the scan: named, never expanded (40:1000000000)
    for start, stop in ranges:
        if stop is None:
            if n_slices is None:
                raise SliceSpecError(f"{what} {shown!r}: an open range ({start}:) needs the scan's slice count; "
                                     "write its last slice")
            stop = n_slices
        if start < 0:
            raise SliceSpecError(f"{what} {shown!r}: slice indices count from 0, got {start}")
        if n_slices is not None and stop > n_slices:
            outside.append((max(int(start), n_slices), int(stop)))
            stop = n_slices
        indices.update(range(int(start), int(stop)))
    if outside:
        merged: list[list[int]] = []
        for low, high in sorted(outside):
            if merged and low <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], high)
            else:
                merged.append([low, high])
        named = ", ".join(str(low) if high == low + 1 else f"{low}–{high - 1}" for low, high in merged)
        raise SliceSpecError(f"{what} {shown!r}: slice(s) {named} are outside the {n_slices} slices of {where} "
                             f"(0 to {n_slices - 1})")
    return sorted(indices)


def parse_slices(text: Optional[str], n_slices: Optional[int] = None, *, what: str = "slices",
                 where: str = "the scan") -> Optional[list[int]]:
    """``text`` → sorted unique slice indices, checked against ``n_slices`` when given.

    None or blank text → None ("all slices": the caller decides what that means); a list naming no
    slice (``","``) is a :class:`SliceSpecError`.
    """
    if text is None or not str(text).strip():
        return None
    spec = parse_slice_spec(text, what)
    indices = spec.indices(n_slices, where)
    if not indices:
        raise SliceSpecError(f"{what} {text!r} names no slice; write {SLICE_SYNTAX}")
    return indices


def parse_slice_list(text: str) -> list[int]:
    """``"10, 12, 20-24"`` → ``[10, 12, 20, 21, 22, 23, 24]``; blank text → ``[]``.

    The widget's entry point; the same parser as every command (``"20:25"`` works too).
    """
    return parse_slices(text) or []


def slice_list_text(slices: Iterable[int], limit: int = 12) -> str:
    """``[3, 4, 5, 9]`` → ``"3–5, 9"`` (long lists are cut with "…")."""
    ordered = sorted(int(s) for s in slices)
    parts: list[str] = []
    start = previous = None
    for s in ordered + [None]:
        if start is not None and (s is None or s != previous + 1):
            parts.append(str(start) if start == previous else f"{start}–{previous}")
            start = None
        if s is not None and start is None:
            start = s
        previous = s
    return ", ".join(parts[:limit]) + (", …" if len(parts) > limit else "")
