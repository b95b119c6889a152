"""One slice-list syntax for every command and the widget: A-B inclusive, A:B half-open, comma lists."""

import argparse

import numpy as np
import pytest

from medconddiff.commands.common import SLICES_HELP
from medconddiff.datasets import parse_ranges, range_indices
from medconddiff.errors import SliceSpecError, UserInputError, user_error_types
from medconddiff.slice_lists import SLICE_SYNTAX, parse_slice_list, parse_slice_spec, parse_slices, slice_list_text


@pytest.mark.parametrize("text, expected", [
    ("60-63", [60, 61, 62, 63]),
    ("60:64", [60, 61, 62, 63]),
    ("10, 12, 20-24", [10, 12, 20, 21, 22, 23, 24]),
    ("0:3,5:7", [0, 1, 2, 5, 6]),
    ("0:3, 2-4, 9", [0, 1, 2, 3, 4, 9]),          # overlapping parts of both forms
    ("3–4;1", [1, 3, 4]),                          # en dash and semicolon, as the widget's text shows them
    (" 7 ", [7]),
    ("5-5", [5]),
])
def test_inclusive_dash_and_half_open_colon_mean_one_thing_each(text, expected):
    assert parse_slices(text) == expected
    assert parse_slice_list(text) == expected


def test_the_same_slices_written_both_ways_are_the_same_list():
    assert parse_slices("60-63") == parse_slices("60:64") == list(range(60, 64))
    assert parse_slices("0:40,80:128") == parse_slices("0-39, 80-127")


def test_open_ranges_need_the_slice_count():
    assert parse_slices("4:", 7) == [4, 5, 6]
    assert parse_slices(":2", 7) == [0, 1]
    with pytest.raises(SliceSpecError, match="needs the scan's slice count"):
        parse_slices("4:")


@pytest.mark.parametrize("text, message", [
    ("ten", "cannot read 'ten'"),
    ("5-3", "is empty"),
    ("5:5", "is empty"),
    ("-3", "negative indices are not accepted"),
    ("1:2:3", "cannot read"),
    (",", "names no slice"),
    ("1.5", "cannot read"),
])
def test_malformed_lists_are_one_clear_user_error(text, message):
    with pytest.raises(SliceSpecError, match=message) as caught:
        parse_slices(text, what="--slices")
    assert isinstance(caught.value, user_error_types()) and isinstance(caught.value, UserInputError)
    assert "--slices" in str(caught.value) and "\n" not in str(caught.value)
    if message != "names no slice":
        assert "10, 12, 20-24" in str(caught.value)    # every error shows how to write it


def test_bounds_are_checked_against_the_slice_count_and_name_the_scan():
    assert parse_slices("0:6", 6, where="scan") == list(range(6))
    with pytest.raises(SliceSpecError, match=r"slice\(s\) 6–7 are outside the 6 slices of scan \(0 to 5\)"):
        parse_slices("4-7", 6, what="--slices", where="scan")
    with pytest.raises(SliceSpecError, match="outside the 6 slices"):
        parse_slices("0:7", 6)
    # A typo of a billion slices is named as a range, not counted out one by one (it took GBs and minutes).
    with pytest.raises(SliceSpecError, match=r"slice\(s\) 6–999999999 are outside"):
        parse_slices("4:1000000000,8:20", 6)


def test_blank_means_all_slices_and_the_widget_gets_an_empty_list():
    assert parse_slices(None) is None and parse_slices("  ") is None
    assert parse_slice_list("") == []


def test_the_text_the_widget_shows_reads_back_as_the_same_slices():
    slices = [1, 2, 3, 7, 9, 10]
    assert slice_list_text(slices) == "1–3, 7, 9–10"
    assert parse_slice_list(slice_list_text(slices)) == slices


def test_training_ranges_use_the_same_parser_and_check_every_case():
    ranges = parse_ranges("0-1,3:5", "--train-slices")
    np.testing.assert_array_equal(range_indices(ranges, 6, "case_a"), [0, 1, 3, 4])
    np.testing.assert_array_equal(range_indices(parse_ranges("4:"), 6, "case_a"), [4, 5])
    np.testing.assert_array_equal(range_indices([(0, 2)], 6, "case_a"), [0, 1])   # plain tuples still work
    assert parse_ranges("") is None and parse_ranges(None) is None
    with pytest.raises(SliceSpecError, match="--train-slices '0:9'.*outside the 6 slices of case_b"):
        range_indices(parse_ranges("0:9", "--train-slices"), 6, "case_b")
    with pytest.raises(SliceSpecError, match="--val-slices"):
        parse_ranges("48..72", "--val-slices")


def test_every_slice_flag_explains_the_syntax_in_the_same_words():
    from medconddiff.cli import SUBCOMMANDS
    import importlib

    flags = {"segment": ["--slices"], "evaluate": ["--slices"], "finetune": ["--slices"],
             "train": ["--train-slices", "--val-slices"]}
    assert SLICE_SYNTAX in SLICES_HELP
    for command, names in flags.items():
        parser = argparse.ArgumentParser()
        importlib.import_module(SUBCOMMANDS[command][0]).add_arguments(parser)
        helps = {action.option_strings[0]: action.help for action in parser._actions if action.option_strings}
        for name in names:
            assert SLICES_HELP in helps[name], (command, name)


def test_spec_keeps_its_text_and_half_open_ranges():
    spec = parse_slice_spec("2-4, 9:11", "--slices")
    assert spec.ranges == ((2, 5), (9, 11)) and spec.text == "2-4, 9:11"
    assert spec.indices(12) == [2, 3, 4, 9, 10]
