"""GSM8K-style answer extraction and exact match, for scoring generated text.

:func:`normalize_answer`: the text after the LAST ``####`` if there is one (GSM8K's answer
marker), else the LAST number in the text; then

* a number (``-1,234.50``, ``$72``, ``+3``, ``5.``) becomes its canonical form: commas, ``$``,
  a leading ``+`` and trailing fractional zeros removed (``"1,200.0"`` -> ``"1200"``,
  ``"2.50"`` -> ``"2.5"``, ``"-0"`` -> ``"0"``);
* after ``####`` without a number, the stripped text (inner whitespace collapsed, one trailing
  ``.`` dropped) is the answer;
* no ``####`` and no number: ``None`` (never equal to anything).

:func:`exact_match` compares two normalised answers.

>>> normalize_answer("She pays 3 * 4 = 12 dollars.\\n#### 1,200.0")
'1200'
>>> normalize_answer("so the answer is 42.")
'42'
>>> exact_match("#### 7", "The total is 7.0 apples")
True
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["normalize_answer", "exact_match", "exact_match_rate"]

MARKER = "####"
_NUMBER = re.compile(r"[-+]?(?:\$\s?)?(?:\d[\d,]*(?:\.\d*)?|\.\d+)")


def _canonical_number(text: str) -> str:
  text = text.replace(",", "").replace("$", "").replace(" ", "").lstrip("+")
  negative = text.startswith("-")
  text = text.lstrip("-")
  if "." in text:
    text = text.rstrip("0").rstrip(".")
  text = text.lstrip("0") or "0"
  if text.startswith("."):
    text = "0" + text
  return "-" + text if negative and text != "0" else text


def normalize_answer(text: str | None) -> str | None:
  """The canonical answer in ``text`` (module docstring), or ``None`` if it has none."""
  if text is None:
    return None
  if MARKER in text:
    tail = text.rsplit(MARKER, 1)[1]
    match = _NUMBER.search(tail)
    if match:
      return _canonical_number(match.group())
    tail = " ".join(tail.split()).removesuffix(".")
    return tail or None
  numbers = _NUMBER.findall(text)
  return _canonical_number(numbers[-1]) if numbers else None


def exact_match(prediction: str | None, reference: str | None) -> bool:
  """Whether both texts have an answer and the normalised answers are equal."""
  a, b = normalize_answer(prediction), normalize_answer(reference)
  return a is not None and a == b


def exact_match_rate(predictions: Sequence[str], references: Sequence[str]) -> float:
  """Fraction of pairs with :func:`exact_match` (``ValueError`` on different lengths or none)."""
  if len(predictions) != len(references) or not references:
    raise ValueError(f"predictions and references must be non-empty and of equal length; got "
                     f"{len(predictions)} and {len(references)}")
  return sum(map(exact_match, predictions, references)) / len(references)
