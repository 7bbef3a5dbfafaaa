"""Answer parsing for the LLM-Adapters instruction format: options, candidates, extraction.

Used by the task definitions (goat_dist/eval/tasks.py): the option-scoring continuations and the
answer-extraction filter of the paper's generate + extract protocol.
"""

from __future__ import annotations

import math
import re
from typing import Optional

from .records import answer_options

__all__ = ["answer_options", "candidate_response", "extract_answer", "is_correct",
           "normalize_number", "NUMERIC_TOLERANCE"]

_NUMBER = re.compile(r"-?\d+\.?\d*")
_ANSWER_IS = re.compile(r"the correct answer is", re.IGNORECASE)
NUMERIC_TOLERANCE = 1e-3  # |pred - gold| <= tol counts as correct (LLM-Adapters' math eval)


def _option_pattern(options: list[str]) -> re.Pattern:
    # longest first so "answer10" is not read as "answer1"; word boundaries for "answer1x"
    alts = "|".join(re.escape(o) for o in sorted(options, key=len, reverse=True))
    return re.compile(rf"(?<![0-9A-Za-z])({alts})(?![0-9A-Za-z])", re.IGNORECASE)


def normalize_number(s: str) -> Optional[str]:
    """``"576"``, ``"576.0"``, ``"576."``, ``"1,152"`` -> a canonical string (``"576.0"``); else None."""
    try:
        v = float(str(s).replace(",", "").strip())
    except ValueError:
        return None
    return repr(v) if math.isfinite(v) else None


def extract_answer(text: str, options: Optional[list[str]]) -> Optional[str]:
    """The answer in a generated response (LLM-Adapters' extraction).

    Args:
        text: the decoded response (prompt excluded).
        options: the record's options: the first option word (case-insensitive) after the first
            "the correct answer is", else the first one anywhere in the text; returned in the
            options' spelling. None: free-form: the last number in the text, commas removed
            (LLM-Adapters' math rule), normalised (``"576"`` -> ``"576.0"``); with no number, the
            stripped text (compared as a string), or None when empty.
    """
    if options:
        pat = _option_pattern(options)
        starts = [m.end() for m in _ANSWER_IS.finditer(text)]
        for segment in ([text[starts[0]:]] if starts else []) + [text]:
            m = pat.search(segment)
            if m:
                word = m.group(1).lower()
                return next(o for o in options if o.lower() == word)
        return None
    numbers = _NUMBER.findall(text.replace(",", ""))
    if numbers:
        return normalize_number(numbers[-1])
    return text.strip() or None


def is_correct(pred: Optional[str], answer) -> bool:
    """Numbers: |pred - answer| <= NUMERIC_TOLERANCE; otherwise case-insensitive string equality."""
    if pred is None or answer is None:
        return False
    p, a = normalize_number(str(pred)), normalize_number(str(answer))
    if p is not None and a is not None:
        return abs(float(p) - float(a)) <= NUMERIC_TOLERANCE
    return str(pred).strip().lower() == str(answer).strip().lower()


def candidate_response(record: dict, options: list[str], option: str) -> str:
    """The record's output with its gold option replaced by ``option`` (what option scoring scores).

    The gold option is the record's ``answer`` if the output contains it, else the option found
    in the output; an output with no option in it gives ``"the correct answer is <option>"``
    (the LLM-Adapters output format).
    """
    output = str(record.get("output") or "")
    pat = _option_pattern(options)
    gold = record.get("answer")
    spots = [m for m in pat.finditer(output)
             if gold is None or m.group(1).lower() == str(gold).lower()] or list(pat.finditer(output))
    if not spots:
        return f"the correct answer is {option}"
    m = spots[-1]  # the last mention is the one the answer sentence ends with
    return output[:m.start(1)] + option + output[m.end(1):]
