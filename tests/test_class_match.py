"""Reference labels put on the model's classes by name (or by the user's pairs) before scoring."""

from __future__ import annotations

import numpy as np
import pytest

from medconddiff.class_match import match_classes, parse_class_map
from medconddiff.errors import ConfigError

MODEL = ("background", "liver", "tumour")


def test_the_same_names_in_the_same_order_change_nothing():
    match = match_classes(("background", "Liver", "tumor"), MODEL)
    labels = np.array([0, 1, 2], np.uint8)
    assert match.is_identity and match.how == "number" and not match.notes and match.warning is None
    assert match.apply(labels) is labels and match.record() == {"matched_by": "number"}


def test_names_in_another_order_are_matched_whatever_their_case_spelling_or_separator():
    match = match_classes(("background", "Tumor", "LIVER"), MODEL)
    assert match.how == "name" and match.lookup.tolist() == [0, 2, 1]
    labels = np.array([[0, 1], [2, 1]], np.uint8)
    moved = match.apply(labels)
    assert moved.dtype == np.uint8 and moved.tolist() == [[0, 2], [1, 2]]
    assert match.record() == {"matched_by": "name", "pairs": {"Tumor": "tumour", "LIVER": "liver"}}
    assert any("Tumor → tumour" in note for note in match.notes)
    kidneys = match_classes(("background", "Left Kidney"), ("background", "left_kidney"))
    assert kidneys.is_identity


def test_a_structure_set_keeps_only_what_the_model_knows_and_says_what_it_dropped_or_lacks():
    # A planning system's ROI order: the body outline first, then the target, then an organ.
    names = ("background", "External", "GTV", "Liver")
    labels = np.array([0, 1, 2, 3, 1, 7], np.int16)           # 7: the file's ignore value
    match = match_classes(names, MODEL, parse_class_map(["GTV=tumour"]), labels, ignore_value=7)
    assert match.how == "map" and match.lookup.tolist() == [0, 0, 2, 1]
    assert match.apply(labels, ignore_value=7).tolist() == [0, 0, 2, 1, 0, 7]
    assert any("'External' is none of the model's classes: counted as background" in n for n in match.notes)
    assert match.record()["pairs"] == {"GTV": "tumour", "Liver": "liver"}
    # Without the pair, the tumour has nothing to be scored against, and the note says so.
    plain = match_classes(names, MODEL, labels=labels, ignore_value=7)
    assert plain.lookup.tolist() == [0, 0, 0, 1]
    assert any("does not label 'tumour'" in n for n in plain.notes)
    assert any("'External', 'GTV' are none of the model's classes" in n for n in plain.notes)


def test_label_values_of_a_file_that_names_nothing_can_be_mapped():
    labels = np.array([0, 3, 5, 5], np.uint8)                 # another tool's numbering: liver is 5
    match = match_classes(None, MODEL, {"5": "liver"}, labels)
    assert match.apply(labels).tolist() == [0, 0, 1, 1]
    assert any("'3' is none of the model's classes" in n for n in match.notes)
    assert match_classes(None, MODEL, {}, labels).lookup is None   # nothing said: by number, no warning
    assert match_classes(None, MODEL, {}, labels).warning is None


def test_nothing_in_common_is_compared_by_number_with_a_warning():
    match = match_classes(("background", "lesion"), MODEL)
    assert match.lookup is None and match.how == "number"
    assert "none is the same" in match.warning and "--class-map" in match.warning


@pytest.mark.parametrize("items, names, message", [
    (["GTV"], ("background", "GTV"), "expected REFERENCE=MODEL_CLASS"),
    (["=liver"], ("background", "GTV"), "expected REFERENCE=MODEL_CLASS"),
    (["GTV=spleen"], ("background", "GTV"), "the model has no class 'spleen'"),
    (["CTV=tumour"], ("background", "GTV"), "the reference has no class 'CTV' (its classes: GTV)"),
    (["9=tumour"], None, "the reference has no class '9'"),
])
def test_a_wrong_pair_is_refused_naming_what_exists(items, names, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        match_classes(names, MODEL, parse_class_map(items), np.array([0, 1], np.uint8))


def test_two_spellings_of_one_class_are_refused_where_a_class_list_is_made(tmp_path):
    from medconddiff.class_match import checked_class_names, merge_class_lists, spelled_as
    from medconddiff.config import ModelConfig
    from medconddiff.training_set import TrainingSet, TrainingSetError

    with pytest.raises(ConfigError, match="must name different classes"):
        ModelConfig(class_names=("background", "liver", "Liver"))
    # The class table of the widget's Fine-tune and Add to set, and add-to-set's --class-names.
    assert checked_class_names([" background", "liver ", "lesion"]) == ("background", "liver", "lesion")
    for names in (["background", "tumor", "Tumour"], ["background", " ", "liver"]):
        with pytest.raises(ConfigError, match="every class needs a name, and names must differ"):
            checked_class_names(names)
    with pytest.raises(TrainingSetError, match="must be unique"):
        TrainingSet.create(tmp_path / "set", ("background", "Tumor", "tumour"))
    assert merge_class_lists(MODEL, ("background", "Tumor", "lesion")) == (*MODEL, "lesion")
    assert spelled_as(("background", "LIVER", "lesion"), MODEL) == ("background", "liver", "lesion")


def test_keeping_some_classes_renumbers_them_and_leaves_the_others_as_background():
    from medconddiff.class_match import keep_classes

    names = ("background", "External", "GTV", "GTVn", "Heart")
    labels = np.array([0, 1, 2, 3, 4, 1], np.uint8)
    kept = keep_classes(names, ["GTV=lesion", "gtvn=Lesion", "4"], labels)
    assert kept.class_names == ("background", "lesion", "Heart")
    assert kept.apply(labels).tolist() == [0, 0, 1, 1, 2, 0] and kept.left_out == ("External",)
    assert keep_classes(names, ["GTV=a", "Heart=A"], labels).class_names == ("background", "a")   # one class
    unnamed = keep_classes(("background", "liver", "tumour"), ["5=liver"], np.array([0, 5, 3], np.uint8))
    assert unnamed.apply(np.array([0, 5, 3], np.uint8)).tolist() == [0, 1, 0]
    # Value 1 is left out while value 5 is kept as 'liver': told by its value ("'liver' is a class the model
    # learns: left out" contradicted the kept class), as is a value no name covers.
    assert unnamed.left_out == ("label 1", "tumour", "label 3")
    for items, message in ((["=x"], "expected CLASS or CLASS=NEW_NAME"), (["PTV"], "the labels have no class 'PTV'"),
                           (["GTV=background"], "names must differ")):
        with pytest.raises(ConfigError, match=message):
            keep_classes(names, items, labels)
