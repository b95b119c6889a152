"""What makes two class names one class, and label files put on a model's or a set's classes by it.

Label files come from many tools: a SEG's segment labels, an RT structure set's ROI names, a
dataset.json, the plugin's own exports. They spell one class in several ways and number classes as
they please. :func:`class_key` says what two spellings of one class share (case, surrounding space,
the separator used, British and American spelling: ``Liver`` = ``liver``, ``left_kidney`` = ``Left
Kidney``, ``tumor`` = ``tumour``); every place that joins class lists uses it (a training set's
merge, a fine-tune's class list and replay, the weight transfer), so corrections from several tools
add up to one class instead of two competing ones.

For scoring, :func:`match_classes` builds the lookup reference value → model class from

* the user's explicit pairs (``--class-map GTV=tumour 5=liver``: a reference name or label value, then a
  model class name), then
* the names both sides give, by :func:`class_key`.

Once anything is matched, a reference class that matches no model class counts as background (an
External contour holds every organ) and a note says so; a model class that the reference does not
name is scored against an empty reference (a note says that too). Where nothing matches and no pair
is given, the labels are compared by number, as they are written, with a warning.

For learning, :func:`keep_classes` takes only the classes a user names from a label file (a planning
structure set's target, not its External or organs at risk), the others as background.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import numpy as np

from .errors import ConfigError

_SPELLINGS = {"tumor": "tumour", "tumors": "tumours", "edema": "oedema", "hemorrhage": "haemorrhage",
              "esophagus": "oesophagus"}


def class_key(name: str) -> str:
    """What two spellings of one class share: ``Liver``, ``liver`` and `` LIVER `` are one class, as are
    ``left_kidney`` and ``Left Kidney``, ``tumor`` and ``tumour``."""
    words = re.split(r"[\s_\-]+", str(name).strip().casefold())
    return " ".join(_SPELLINGS.get(word, word) for word in words if word)


def class_index(names: Sequence[str], name: str) -> Optional[int]:
    """The index of the foreground class of ``names`` (background first) that ``name`` is (by
    :func:`class_key`); None if none is."""
    key = class_key(name)
    return next((index for index, other in enumerate(names) if index and class_key(other) == key), None)


def one_class_each(names: Sequence[str]) -> bool:
    """Whether no two of ``names`` name one class (by :func:`class_key`: ``liver`` and ``Liver`` do)."""
    keys = [class_key(name) for name in names]
    return len(set(keys)) == len(keys)


def same_classes(first: Sequence[str], second: Sequence[str]) -> bool:
    """Whether two class lists (background first) name the same classes in the same order."""
    return [class_key(n) for n in first[1:]] == [class_key(n) for n in second[1:]]


#: What planning systems call the patient's outline (in :func:`class_key` form): a class on every slice.
BODY_OUTLINES = frozenset({"external", "body", "skin", "body outline", "outline", "patient outline"})


def body_outline_classes(names: Sequence[str]) -> list[int]:
    """The foreground classes of ``names`` (background first) that a structure set's body outline is called."""
    return [index for index, name in enumerate(names) if index and class_key(name) in BODY_OUTLINES]


def checked_class_names(names: Sequence[str]) -> tuple[str, ...]:
    """``names`` stripped of surrounding space; a ConfigError where one is empty or two name one class."""
    names = tuple(str(name).strip() for name in names)
    if any(not name for name in names) or not one_class_each(names):
        raise ConfigError("every class needs a name, and names must differ (case and tumour/tumor spelling aside: "
                          f"{', '.join(repr(n) for n in names)})")
    return names


def spelled_as(names: Sequence[str], known: Sequence[str]) -> tuple[str, ...]:
    """``names`` (background first) with each class that ``known`` has spelled as ``known`` spells it."""
    return tuple(str(name) if index == 0 or class_index(known, name) is None else str(known[class_index(known, name)])
                 for index, name in enumerate(names))


def merge_class_lists(*lists: Sequence[str]) -> tuple[str, ...]:
    """Class lists (background first) joined by class, in order of first appearance, each class spelled
    as it first appeared; background once, first, named as the first non-empty list names it."""
    names = ["background"]
    for class_list in lists:
        if class_list and names == ["background"]:
            names[0] = str(class_list[0])
        names += [str(n) for n in list(class_list)[1:] if class_index(names, n) is None]
    return tuple(names)


@dataclass(frozen=True)
class ClassMatch:
    """How reference label values become model class indices (see the module doc)."""

    lookup: Optional[np.ndarray]        # reference value -> model class; None: compared by number
    how: str                            # "number", "name" or "map" (explicit pairs, names for the rest)
    pairs: dict[str, str] = field(default_factory=dict)   # reference class -> model class, for the record
    notes: tuple[str, ...] = ()
    warning: Optional[str] = None       # compared by number although both sides name their classes

    @property
    def is_identity(self) -> bool:
        return self.lookup is None or bool(np.array_equal(self.lookup, np.arange(self.lookup.size)))

    def apply(self, labels: np.ndarray, ignore_value: Optional[int] = None) -> np.ndarray:
        """``labels`` with each value replaced by its model class; ``ignore_value`` is kept as it is, and a
        value beyond the reference's classes is left for the caller's range check."""
        if self.lookup is None or self.is_identity:
            return labels
        labels = np.asarray(labels)
        values = labels.astype(np.int64, copy=False)
        inside = (values >= 0) & (values < self.lookup.size)
        if ignore_value is not None:
            inside &= values != ignore_value
        out = values.copy()
        out[inside] = self.lookup[values[inside]]
        return out.astype(labels.dtype, copy=False)

    def messages(self) -> list[tuple[str, str]]:
        """(kind, text) to tell the user: the warning, then the notes."""
        return ([("warning", self.warning)] if self.warning else []) + [("note", text) for text in self.notes]

    def record(self) -> dict:
        """What a report keeps: how the classes were matched and, where not by number, each pair."""
        return {"matched_by": self.how, "pairs": dict(self.pairs)} if self.how != "number" else {"matched_by": "number"}


def parse_class_map(items: Sequence[str], flag: str = "--class-map") -> dict[str, str]:
    """``["GTV=tumour", "5=liver"]`` → ``{"GTV": "tumour", "5": "liver"}``; a malformed item is a ConfigError."""
    pairs: dict[str, str] = {}
    for item in items or ():
        reference, sep, model = str(item).partition("=")
        if not sep or not reference.strip() or not model.strip():
            raise ConfigError(f"{flag} {item!r}: expected REFERENCE=MODEL_CLASS, e.g. GTV=tumour or 5=liver")
        pairs[reference.strip()] = model.strip()
    return pairs


def match_classes(reference_names: Optional[Sequence[str]], model_names: Sequence[str],
                  class_map: Optional[Mapping[str, str]] = None, labels: Optional[np.ndarray] = None,
                  ignore_value: Optional[int] = None) -> ClassMatch:
    """The lookup for one reference (see the module doc). ``reference_names`` index = label value,
    background first (None: the reference names nothing, as a NIfTI label file); ``class_map`` the user's
    pairs (:func:`parse_class_map`); ``labels`` the reference's values, which bound the lookup where
    the reference names nothing."""
    class_map = dict(class_map or {})
    model_keys = {class_key(name): index for index, name in enumerate(model_names)}
    present: set[int] = set()
    if labels is not None and np.size(labels):
        values = np.asarray(labels)
        present = {int(v) for v in np.unique(values)} - ({ignore_value} if ignore_value is not None else set())
    highest = max(present, default=-1)
    names = list(reference_names) if reference_names is not None else []
    size = max(len(names), highest + 1, 1)
    name_of = [names[value] if value < len(names) else str(value) for value in range(size)]
    if reference_names is not None and [class_key(n) for n in names] == [class_key(n) for n in model_names] \
            and not class_map:
        return ClassMatch(None, "number")

    lookup = np.zeros(size, dtype=np.int64)
    matched = [False] * size
    pairs: dict[str, str] = {}
    for reference, model in class_map.items():
        if class_key(model) not in model_keys:
            raise ConfigError(f"--class-map {reference}={model}: the model has no class {model!r} "
                              f"(its classes: {', '.join(model_names)})")
        found = _reference_values(reference, names, size)
        if not found:
            raise ConfigError(f"--class-map {reference}={model}: the reference has no class {reference!r}"
                              + (f" (its classes: {', '.join(names[1:])})" if names else ""))
        for value in found:
            lookup[value], matched[value] = model_keys[class_key(model)], True
            pairs[name_of[value]] = model_names[model_keys[class_key(model)]]
    if reference_names is not None:
        for value in range(1, len(names)):
            if not matched[value] and class_key(names[value]) in model_keys:
                lookup[value], matched[value] = model_keys[class_key(names[value])], True
                pairs[name_of[value]] = model_names[lookup[value]]
    matched[0] = True        # background stays background
    if not pairs:
        warning = None
        if reference_names is not None:
            warning = (f"the reference names classes {names[1:]}, the model {list(model_names[1:])}, and none "
                       "is the same: label values are compared by number (give --class-map REFERENCE=MODEL_CLASS "
                       "to match them)")
        return ClassMatch(None, "number", warning=warning)

    notes = []
    # A named class is listed whether or not it has voxels; an unnamed value only where the labels hold it.
    dropped = [name_of[value] for value in range(1, size)
               if not matched[value] and (value < len(names) or value in present)]
    if dropped:
        listed = ", ".join(map(repr, dropped[:8])) + (f" and {len(dropped) - 8} more" if len(dropped) > 8 else "")
        notes.append(f"reference class{'es' if len(dropped) > 1 else ''} {listed} "
                     f"{'are' if len(dropped) > 1 else 'is'} none of the model's classes: counted as background")
    unnamed = [name for index, name in enumerate(model_names) if index and index not in set(lookup[1:].tolist())]
    if unnamed:
        notes.append(f"the reference does not label {', '.join(map(repr, unnamed))}: scored against none "
                     "(whatever the model finds there counts against it)")
    renamed = {ref: model for ref, model in pairs.items() if class_key(ref) != class_key(model)}
    values_moved = any(lookup[v] != v for v in range(1, size) if matched[v])
    if renamed or values_moved:
        notes.append("reference classes matched to the model's: "
                     + ", ".join(f"{ref} → {model}" for ref, model in pairs.items()))
    return ClassMatch(lookup, "map" if class_map else "name", pairs, tuple(notes))


def _reference_values(reference: str, names: Sequence[str], size: int) -> list[int]:
    """The label values a ``--class-map`` reference stands for: a class name the reference gives, else a
    label value."""
    by_name = [value for value, name in enumerate(names) if value and class_key(name) == class_key(reference)]
    if by_name:
        return by_name
    if reference.isdigit() and 0 < int(reference) < size:
        return [int(reference)]
    return []


@dataclass(frozen=True)
class KeptClasses:
    """Some of a label file's classes, renumbered (:func:`keep_classes`)."""

    lookup: np.ndarray                  # file value -> kept class index (0: left out, or background)
    class_names: tuple[str, ...]        # background, then the kept classes as they are to be called
    left_out: tuple[str, ...]           # the file's classes counted as background

    def apply(self, labels: np.ndarray) -> np.ndarray:
        labels = np.asarray(labels)
        inside = labels < self.lookup.size
        out = np.zeros_like(labels)
        out[inside] = self.lookup[labels[inside].astype(np.int64)]
        return out


def keep_classes(names: Sequence[str], items: Sequence[str], labels: np.ndarray,
                 flag: str = "--keep-classes") -> KeptClasses:
    """Only the classes ``items`` name (``GTV``, or ``GTV=lesion`` to call it lesion; a class name of
    ``names`` or a label value) are kept from labels whose values ``names`` name (background first);
    every other class counts as background. For a planning system's structure set, whose External
    contour covers the body on every slice and whose organs at risk are no class to learn."""
    names = list(names)
    size = max(len(names), int(np.max(labels)) + 1 if np.size(labels) else 0, 1)
    lookup = np.zeros(size, dtype=np.int64)
    kept = ["background" if not names else str(names[0])]
    for item in items:
        reference, sep, target = (part.strip() for part in str(item).partition("="))
        if not reference or (sep and not target):
            raise ConfigError(f"{flag} {item!r}: expected CLASS or CLASS=NEW_NAME, e.g. GTV=lesion")
        values = _reference_values(reference, names, size)
        if not values:
            raise ConfigError(f"{flag} {reference}: the labels have no class {reference!r}"
                              + (f" (their classes: {', '.join(names[1:])})" if len(names) > 1 else ""))
        # A class kept under its own name; a label value under the name the labels give it, if any.
        target = target or (names[values[0]] if values[0] < len(names) else reference)
        index = class_index(kept, target)
        if index is None:
            kept.append(target)
            index = len(kept) - 1
        lookup[values] = index
    present = {int(v) for v in np.unique(labels)} if np.size(labels) else set()
    # A value left out whose name a kept class now has (a NIfTI's values named by a set's classes, value 2 kept
    # as the set's 'lesion') is told by its value, not as the name kept.
    left_out = tuple(names[v] if v < len(names) and class_index(kept, names[v]) is None else f"label {v}"
                     for v in range(1, size) if lookup[v] == 0 and (v < len(names) or v in present))
    return KeptClasses(lookup, checked_class_names(kept), left_out)
