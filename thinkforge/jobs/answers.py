"""Final-answer extraction and comparison, as s1 / LIMO / MATH500 / AIME graders do it.

A completion's answer is, in order of preference: the last ``\\boxed{...}`` (nested braces
allowed), the last ``Final Answer:`` / ``Answer:`` line ("The final answer is $x$"
phrasing included), or the last number in the text. Answers are compared after
normalisation: ``$`` and spaces go, as do trailing units or words ("17 apples", "5 cm",
``\\text{ cm}``), thousands separators, a trailing period, ``x =``; numbers compare by
value, so ``\\frac{1}{2}``, ``\\dfrac12``, ``1/2``, ``0.5`` and ``.50`` are one answer,
``007`` is ``7`` and ``-0`` is ``0``.

    extract_answer("so it is $\\boxed{\\frac{1}{2}}$.")   # -> "\\frac{1}{2}"
    normalize("17 apples.")                               # -> "17"
    is_correct("...\\nAnswer: 0.5", "\\frac{1}{2}")        # -> True

Pure Python: the evaluation runner and tests import it without torch.
"""

from __future__ import annotations

import re
from fractions import Fraction

__all__ = ["answers_equal", "extract_answer", "extract_boxed", "is_correct", "normalize"]

_BOXED = re.compile(r"\\(?:boxed|fbox)(\s*)")
_ANSWER_IS = re.compile(r"(?:final\s+)?answer\s+is\s*[:\uff1a]?\s*(.*)", re.IGNORECASE)
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def _balanced(text: str, start: int) -> str | None:
    """The contents of the brace group opening at ``text[start]``, or None if unclosed."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
    return None


def extract_boxed(text: str) -> str | None:
    """The contents of the last ``\\boxed{...}`` (or ``\\boxed 5``), nested braces kept."""
    for match in reversed(list(_BOXED.finditer(text))):
        end = match.end()
        if end < len(text) and text[end] == "{":
            inner = _balanced(text, end)
            if inner is not None:
                return inner.strip()
        elif match.group(1):  # "\\boxed 5": the argument is one bare token
            bare = re.match(r"[^\s$]+", text[end:])
            if bare:
                return bare.group(0)
    return None


def _answer_line(text: str) -> str | None:
    """What follows the last ``Answer:`` / ``Final Answer:`` marker on its line."""
    for line in reversed(text.splitlines()):
        said = _ANSWER_IS.search(line)
        marked = said or re.search(r"(?:final\s+)?answer\s*[:\uff1a]", line, re.IGNORECASE)
        if marked is None:
            continue
        rest = said.group(1) if said else line[marked.end() :]
        rest = re.sub(r"\.?\s*I hope it is correct\.?\s*$", "", rest, flags=re.IGNORECASE)
        rest = rest.strip()
        if rest:
            return rest
    return None


def extract_answer(text: str | None) -> str | None:
    """The final answer a completion states, unnormalised; None when it states none."""
    if not text:
        return None
    boxed = extract_boxed(text)
    if boxed:
        return boxed
    line = _answer_line(text)
    if line:
        return line
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


_UNITS = (
    "cm|mm|km|m|kg|mg|g|s|ms|min|h|hr|hrs|hours|degrees|deg|units|sq|ft|in|inches|mph|"
    "dollars|cents|percent"
)
_LATEX_NOISE = re.compile(r"\\[,;:! ]|\\left|\\right|\\displaystyle|\\mathrm\{\s*\}")
_TRAILING_TEXT = re.compile(r"\s*\\(?:text|mbox|mathrm)\{[^{}]*\}\s*$")
_TRAILING_WORDS = re.compile(rf"^(.*?[\d}}])(?:\s+[A-Za-z][A-Za-z .]*|(?:{_UNITS})\.?)$")


def _strip_units(s: str) -> str:
    while _TRAILING_TEXT.search(s) and not _TRAILING_TEXT.fullmatch(s):
        s = _TRAILING_TEXT.sub("", s)
    match = _TRAILING_WORDS.match(s)
    return match.group(1) if match else s


def _unwrap_text(s: str) -> str:
    match = re.fullmatch(r"\\(?:text|mbox|textbf|mathrm|mathbf)\{(.*)\}", s)
    return match.group(1) if match else s


def _frac_braces(s: str) -> str:
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    # \frac12 and \frac1{2}: single-character arguments without braces.
    s = re.sub(r"\\frac\s*([0-9a-zA-Z])\s*([0-9a-zA-Z])", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\s*([0-9a-zA-Z])\s*\{", r"\\frac{\1}{", s)
    return s


def _to_number(s: str) -> Fraction | None:
    """The value of an integer, decimal, ``a/b`` or ``\\frac{a}{b}`` string, else None."""
    sign = 1
    if s.startswith("-"):
        sign, s = -1, s[1:]
    frac = re.fullmatch(r"\\frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}", s)
    parts = frac.groups() if frac else s.split("/") if s.count("/") == 1 else (s,)
    try:
        values = [Fraction(p) for p in parts if re.fullmatch(r"-?(\d+\.?\d*|\.\d+)", p)]
    except (ValueError, ZeroDivisionError):
        return None
    if len(values) != len(parts):
        return None
    if len(values) == 2:
        return None if values[1] == 0 else sign * values[0] / values[1]
    return sign * values[0]


def _canonical_number(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else str(value)


def normalize(answer: str | None) -> str:
    """A canonical string for an answer: numbers by value ("1/2", "7"), else tidied text."""
    if answer is None:
        return ""
    s = answer.strip().replace("$", "").replace("\n", " ")
    s = _LATEX_NOISE.sub("", s)
    s = re.sub(r"\^\{?\\circ\}?|\\%|%", "", s).strip()
    s = s.rstrip(".").strip()
    s = _unwrap_text(s).strip()
    s = _strip_units(s).strip()
    s = re.sub(r"^[A-Za-z]\s*=\s*", "", s)  # "x = 5" -> "5"
    s = _frac_braces(s)
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s) or re.fullmatch(
        r"-?\d+(?:\{,\}\d{3})+", s
    ):
        s = s.replace("{,}", "").replace(",", "")
    s = s.replace(" ", "")
    value = _to_number(s)
    return _canonical_number(value) if value is not None else s


def answers_equal(a: str | None, b: str | None) -> bool:
    """Whether two answers agree after normalisation (an empty answer agrees with none)."""
    left, right = normalize(a), normalize(b)
    return bool(left) and left == right


def _reference_answer(reference: str) -> str:
    """A reference may be a bare answer ("17") or a worked solution with a marked one."""
    if extract_boxed(reference) is not None or _answer_line(reference) is not None:
        return extract_answer(reference) or reference
    return reference


def is_correct(prediction_text: str | None, reference: str) -> bool:
    """Whether the answer a completion states equals the reference answer."""
    return answers_equal(extract_answer(prediction_text), _reference_answer(reference))
