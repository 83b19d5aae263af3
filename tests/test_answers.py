"""Final-answer extraction, number normalization and answer checking."""

from __future__ import annotations

import pytest

from dyncomp.data.gsm8k import extract_answer, is_correct, normalize_number

EXTRACT_CASES = [
    # `#### N`, and later numbers that must not replace it
    ("#### 18", "18"),
    ("Janet sells 9 eggs.\n#### 18\nThat is 2 more than 16.", "18"),
    ("#### 18 dollars, which is 3 times 6", "18"),
    ("#### $10", "10"),
    ("####: 35", "35"),
    ("Final answer: #### $990.00", "990"),
    ("#### 1,234", "1234"),
    ("#### -3.50", "-3.5"),
    ("First guess: #### 12\nCorrection: #### 14", "14"),
    ("Final answer: 48 ####", "48"),
    # `\boxed{N}`
    ("So the result is \\boxed{42}. Check: 40 + 2 = 42 and 7 * 6 = 42, so 100 is wrong.", "42"),
    ("\\boxed{\\$1{,}234}", "1234"),
    ("\\boxed{\\text{18 dollars}} because 20 - 2 = 18, not 19", "18"),
    ("\\boxed{50\\%}", "50"),
    ("#### 7 beats \\boxed{8}", "7"),
    # "the answer is N"
    ("The answer is 72. That is 24 more than 48.", "72"),
    ("So the answer is: $18.00 per day, for 7 days.", "18"),
    ("THE FINAL ANSWER IS 5", "5"),
    ("The answer is 50%. Half of 100 is 50, and 30 is less.", "50"),
    ("The answer is -12. A loss of 12 dollars over 3 days.", "-12"),
    # "final answer: N"
    ("Final answer: 24 clips, from 48 / 2.", "24"),
    ("final answer:   0.25 of the 8 pies", "0.25"),
    ("FINAL ANSWER: 1,000,000 and not 999", "1000000"),
    # The last number, when there is no marker
    ("She has 48 + 24 = 72 clips.", "72"),
    ("It costs $18.", "18"),
    ("The total is 1,234 apples.", "1234"),
    ("He made a profit of $70,000.00 in 2 years... no, in 3 years: 70,000 dollars", "70000"),
    ("The temperature fell to -4.", "-4"),
    ("The change is 100 - 95 = 5", "5"),
    ("48-24", "24"),
    ("The share is 12.5%", "12.5"),
    ("It is .5 of the cake", "0.5"),
    ("The tank holds 10.00 liters", "10"),
    # Nothing to extract
    ("I cannot solve this.", None),
    ("", None),
    ("#### none", None),
]


@pytest.mark.parametrize("text,expected", EXTRACT_CASES)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


NORMALIZE_CASES = [
    ("10.00", "10"),
    ("1,234", "1234"),
    ("-3.50", "-3.5"),
    ("$18.00", "18"),
    ("18 dollars", "18"),
    ("72.", "72"),
    ("50%", "50"),
    ("0.125", "0.125"),
    ("1,234,567.80", "1234567.8"),
    ("-0", "0"),
    ("100", "100"),
    ("-$5", "-5"),
    ("abc", None),
]


@pytest.mark.parametrize("text,expected", NORMALIZE_CASES)
def test_normalize_number(text, expected):
    assert normalize_number(text) == expected


CORRECT_CASES = [
    ("#### 10.00", "10", True),
    ("The answer is 10", "10.00", True),
    ("#### 1,234", "1234", True),
    ("#### $18.00", "18", True),
    ("#### 0.1", "0.1000001", True),
    ("#### 0.1", "0.1001", False),
    ("#### 18\nThat is 2 more than 16.", "16", False),
    ("#### -5", "5", False),
    ("no number here", "5", False),
    ("#### 5", "not a number", False),
]


@pytest.mark.parametrize("text,gold,expected", CORRECT_CASES)
def test_is_correct(text, gold, expected):
    assert is_correct(text, gold) is expected
