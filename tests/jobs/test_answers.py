"""Answer extraction and normalisation: table tests in the MATH500 / AIME / s1 styles."""

from __future__ import annotations

import pytest

from thinkforge.jobs.answers import answers_equal, extract_answer, is_correct, normalize


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so the sum is $\\boxed{17}$.", "17"),
        ("first \\boxed{3}, no: \\boxed{4}", "4"),
        ("$\\boxed{\\frac{1}{2}}$", "\\frac{1}{2}"),
        ("\\boxed{\\left(3, \\frac{\\pi}{2}\\right)}", "\\left(3, \\frac{\\pi}{2}\\right)"),
        ("\\boxed{x^{2^{3}}}", "x^{2^{3}}"),
        ("\\fbox{12}", "12"),
        ("\\boxed 5 is it", "5"),
        ("3+5=8\n8+2=10\nAnswer: 10", "10"),
        ("Answer: 17 apples.", "17 apples."),
        ("Final Answer: The final answer is $-3$. I hope it is correct.", "$-3$"),
        ("The answer is 42", "42"),
        ("answer: 1\nFinal Answer: 2", "2"),
        ("Answer:\nI think 12, maybe 13", "13"),
        ("we get 1,234 then 5,678", "5,678"),
        ("values 1,2,3", "3"),
        ("it is -7 degrees", "-7"),
        ("ratio 3/4", "3/4"),
        ("x is 2.50 now", "2.50"),
        ("no numbers here", None),
        ("", None),
        (None, None),
        ("\\boxed{unclosed", None),
    ],
)
def test_extract_answer(text: str | None, expected: str | None) -> None:
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("17", "17"),
        (" $17$ ", "17"),
        ("17.", "17"),
        ("17 apples", "17"),
        ("17 apples.", "17"),
        ("5 cm", "5"),
        ("5cm", "5"),
        ("5\\text{ cm}", "5"),
        ("5 \\text{ square units}", "5"),
        ("\\text{5}", "5"),
        ("1,000", "1000"),
        ("1{,}000", "1000"),
        ("-1,234,567", "-1234567"),
        ("\\frac{1}{2}", "1/2"),
        ("\\dfrac{1}{2}", "1/2"),
        ("\\tfrac12", "1/2"),
        ("-\\frac{3}{6}", "-1/2"),
        ("\\frac{-3}{6}", "-1/2"),
        ("1/2", "1/2"),
        ("0.5", "1/2"),
        (".50", "1/2"),
        ("2.0", "2"),
        ("007", "7"),
        ("-0", "0"),
        ("-0.0", "0"),
        ("x = 5", "5"),
        ("50\\%", "50"),
        ("90^\\circ", "90"),
        ("\\left( 1, 2 \\right)", "(1,2)"),
        ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt{3}}{2}"),
        ("\\text{(B)}", "(B)"),
        ("1/0", "1/0"),
        (None, ""),
    ],
)
def test_normalize(answer: str | None, expected: str) -> None:
    assert normalize(answer) == expected


@pytest.mark.parametrize(
    ("prediction", "reference", "correct"),
    [
        # boxed
        ("Thus $\\boxed{204}$.", "204", True),
        ("Thus $\\boxed{204}$.", "240", False),
        # Answer: lines, the tiny model's format
        ("Answer: 17", "17", True),
        ("3+4=7\nAnswer: 7", "17", False),
        ("Final Answer: The final answer is $\\frac{3}{4}$. I hope it is correct.", "0.75", True),
        # fractions
        ("\\boxed{\\dfrac{2}{4}}", "\\frac{1}{2}", True),
        ("Answer: 1/2", "\\frac12", True),
        ("Answer: 0.5", "\\frac{1}{2}", True),
        ("Answer: 0.6", "\\frac{1}{2}", False),
        # trailing units and words
        ("Answer: 17 apples", "17", True),
        ("\\boxed{5\\text{ cm}}", "5", True),
        ("Answer: 12 cm.", "12 cm", True),
        # negative
        ("Answer: -3", "-3", True),
        ("Answer: -3", "3", False),
        ("\\boxed{-0}", "0", True),
        # decimals
        ("Answer: 3.50", "3.5", True),
        ("Answer: 3.05", "3.5", False),
        # nested boxed and references that are worked solutions
        ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}", True),
        ("so 1,000", "The total is \\boxed{1000}.", True),
        ("Answer: 033", "Final Answer: 33", True),
        # no answer at all
        ("I am not sure.", "17", False),
        ("", "17", False),
        (None, "17", False),
    ],
)
def test_is_correct(prediction: str | None, reference: str, correct: bool) -> None:
    assert is_correct(prediction, reference) is correct


def test_empty_answers_are_never_equal() -> None:
    assert not answers_equal(None, None)
    assert not answers_equal("", "")
    assert answers_equal("\\frac{1}{2}", "0.5")
