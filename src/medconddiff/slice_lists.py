"""Slice lists as users type and read them: ``"10, 12, 20-24"``.

Used by ``medconddiff finetune --slices`` and the napari widget's fine-tune section; imports nothing
heavy (the plugin reads it on the GUI thread).
"""

from __future__ import annotations

from typing import Sequence


def slice_list_text(slices: Sequence[int], limit: int = 12) -> str:
    """``[3, 4, 5, 9]`` → ``"3–5, 9"`` (long lists are cut with "…")."""
    slices = sorted(int(s) for s in slices)
    parts: list[str] = []
    start = previous = None
    for s in slices + [None]:
        if start is not None and (s is None or s != previous + 1):
            parts.append(str(start) if start == previous else f"{start}–{previous}")
            start = None
        if s is not None and start is None:
            start = s
        previous = s
    return ", ".join(parts[:limit]) + (", …" if len(parts) > limit else "")


def parse_slice_list(text: str) -> list[int]:
    """``"10, 12, 20-24"`` → ``[10, 12, 20, 21, 22, 23, 24]``; a clear ValueError otherwise."""
    out: set[int] = set()
    for part in text.replace(";", ",").split(","):
        part = part.strip().replace("–", "-")
        if not part:
            continue
        try:
            if "-" in part:
                low, high = (int(x) for x in part.split("-", 1))
                if low > high:
                    raise ValueError
                out.update(range(low, high + 1))
            else:
                out.add(int(part))
        except ValueError:
            raise ValueError(f"slices must look like '10, 12, 20-24', got {part!r}") from None
    return sorted(out)
