"""Conversion and checking of constants, per widget type (the table in engine/types.py)."""
from __future__ import annotations

import math

import pytest

from engine.types import Boolean, Combo, Float, InputError, Int, Socket, String, types_compatible


@pytest.mark.parametrize("given, expected", [(12, 12), ("12", 12), (" 12 ", 12), (12.0, 12), ("12.0", 12), (-3, -3)])
def test_int_accepts_integral_values(given, expected):
    converted = Int(0).coerce(given)
    assert converted == expected and type(converted) is int


@pytest.mark.parametrize("given", [True, False, 12.5, "abc", None, [1], math.inf, math.nan, "1e400"])
def test_int_rejects_non_integral_values(given):
    with pytest.raises(InputError) as caught:
        Int(0).coerce(given)
    assert caught.value.error_type == "invalid_input_type"
    assert caught.value.message == "Failed to convert an input value to a INT value"


@pytest.mark.parametrize("given, expected", [(1, 1.0), (0.5, 0.5), ("2.5", 2.5), ("3", 3.0)])
def test_float_accepts_numbers_and_numeric_strings(given, expected):
    converted = Float(0.0).coerce(given)
    assert converted == expected and type(converted) is float


@pytest.mark.parametrize("given", [True, "nan", math.nan, math.inf, "x", None])
def test_float_rejects_bools_non_finite_and_text(given):
    with pytest.raises(InputError, match="is not a valid FLOAT"):
        Float(0.0).coerce(given)


@pytest.mark.parametrize("given, expected", [("hi", "hi"), (3, "3"), (2.5, "2.5"), ("", "")])
def test_string_accepts_text_and_numbers(given, expected):
    assert String().coerce(given) == expected


@pytest.mark.parametrize("given", [True, None, ["a"], {"a": 1}])
def test_string_rejects_bools_none_and_containers(given):
    with pytest.raises(InputError, match="is not a valid STRING"):
        String().coerce(given)


@pytest.mark.parametrize("given, expected", [(True, True), (False, False), ("true", True), ("False", False),
                                             (1, True), (0, False)])
def test_boolean_accepts_bools_words_and_zero_one(given, expected):
    assert Boolean(False).coerce(given) is expected


@pytest.mark.parametrize("given", ["yes", 2, 0.5, None])
def test_boolean_rejects_other_values(given):
    with pytest.raises(InputError, match="is not a valid BOOLEAN"):
        Boolean(False).coerce(given)


def test_range_checks_report_min_and_max_errors():
    spec = Int(5, min=1, max=10)
    assert spec.coerce(1) == 1 and spec.coerce(10) == 10
    with pytest.raises(InputError) as low:
        spec.coerce(0)
    assert (low.value.error_type, low.value.details) == ("value_smaller_than_min", "0 is smaller than min 1")
    with pytest.raises(InputError) as high:
        Float(0.5, min=0.0, max=1.0).coerce(1.5)
    assert (high.value.error_type, high.value.details) == ("value_bigger_than_max", "1.5 is bigger than max 1.0")


def test_combo_accepts_only_listed_values():
    spec = Combo(["euler", "heun"])
    assert spec.coerce("heun") == "heun"
    with pytest.raises(InputError) as caught:
        spec.coerce("eulr")
    assert caught.value.error_type == "value_not_in_list"
    assert caught.value.details == "'eulr' not in ['euler', 'heun']"


def test_combo_of_numbers_does_not_take_a_bool_for_an_int_option():
    with pytest.raises(InputError, match="not in"):
        Combo([1, 2]).coerce(True)


def test_combo_of_numbers_takes_an_equal_number_of_another_type():
    assert Combo([1, 2]).coerce(1.0) == 1


def test_combo_of_strings_does_not_take_a_number_for_a_numeric_string():
    with pytest.raises(InputError, match="not in"):
        Combo(["1", "2"]).coerce(1)


def test_socket_refuses_a_constant():
    with pytest.raises(InputError, match=r"MODEL input takes a link \[node_id, output_index\], got constant 3"):
        Socket("MODEL").coerce(3)


@pytest.mark.parametrize("output_type, input_type, expected", [
    ("MODEL", "MODEL", True), ("MODEL", "CLIP", False), ("*", "CLIP", True), ("IMAGE", "*", True),
    ("IMAGE,MASK", "MASK", True), ("LATENT", "IMAGE,MASK", False)])
def test_link_type_compatibility(output_type, input_type, expected):
    assert types_compatible(output_type, input_type) is expected


def test_default_outside_its_range_is_refused_at_declaration():
    with pytest.raises(ValueError, match="INT default 0 is invalid: 0 is smaller than min 1"):
        Int(0, min=1)
    with pytest.raises(ValueError, match="FLOAT default 2.0 is invalid: 2.0 is bigger than max 1.0"):
        Float(2.0, max=1.0)
