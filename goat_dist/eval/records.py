"""LLM-Adapters records -> the standard zero-shot multiple-choice form (question + choice texts).

The LLM-Adapters files (what GOAT trains on) put the question and the choice texts in one
instruction, e.g. ARC::

    Please choose the correct answer to the question: Which factor ...?

    Answer1: a leg muscle ... Answer2: a bacterial population ... Answer3: ...

    Answer format: answer1/answer2/answer3/answer4

with ``answer: "answer2"``. lm-evaluation-harness scores the same datasets in a standard form
(``Question: ...\\nAnswer:`` followed by each choice *text*), which is what published zero-shot
figures use. ``standard_doc`` recovers that form from a record, per source, following the
harness's own prompts (arc_easy, piqa, siqa, openbookqa, winogrande, super_glue boolq).

Deliberate difference: the LLM-Adapters BoolQ records carry no passage, so BoolQ is
``Question: <question>?\\nAnswer:`` with choices ``no``/``yes`` (the harness prepends the passage;
our BoolQ numbers are therefore not comparable with published BoolQ figures).
"""

from __future__ import annotations

import re
from typing import Any, Optional

_PREFIX = re.compile(r"^Please [^:]*:\s*", re.DOTALL)
_FORMAT_TAIL = re.compile(r"\s*Answer format:[^\n]*\s*$", re.IGNORECASE)
_MARKER = re.compile(r"(?:(?<=\s)|^)(Answer|Solution|Option)([1-9])\s*:\s*")
_FORMAT = re.compile(r"answer format:\s*([^\n]*)", re.IGNORECASE)

# the sources of the shared data folder (LLM-Adapters names) and the standard task names
COMMONSENSE_SOURCES = ["boolq", "piqa", "social_i_qa", "winogrande", "ARC-Easy", "ARC-Challenge",
                       "openbookqa"]
ARITHMETIC_SOURCES = ["gsm8k", "AddSub", "SVAMP"]


class RecordFormatError(ValueError):
    """A record that does not have the LLM-Adapters layout of its source."""


def answer_options(record: dict) -> Optional[list[str]]:
    """The options of ``Answer format: a/b/c`` in the record's instruction (or input), else None.

    E.g. ``["answer1", "answer2", "answer3", "answer4"]``, ``["true", "false"]``. The last such
    line wins; trailing punctuation is stripped. None for math / free-form records.
    """
    for key in ("instruction", "input"):
        found = _FORMAT.findall(str(record.get(key) or ""))
        if found:
            options = [o.strip().strip(".,;:!?\"'") for o in found[-1].split("/")]
            if len(options) >= 2 and all(options):
                return options
    return None


def split_choices(instruction: str) -> tuple[str, list[str]]:
    """``(question, [choice texts])`` of an instruction with ``Answer1: .. Answer2: ..`` markers.

    The choices are the last run of markers numbered 1, 2, ... n (so a question that itself
    mentions "Option1:" is not cut there). Raises RecordFormatError without such markers.
    """
    body = _PREFIX.sub("", instruction, count=1)
    body = _FORMAT_TAIL.sub("", body)
    marks = list(_MARKER.finditer(body))
    start = None
    for i, m in enumerate(marks):
        if m.group(2) == "1" and all(int(marks[j].group(2)) == j - i + 1 for j in range(i, len(marks))):
            start = i
            break
    if start is None or len(marks) - start < 2:
        raise RecordFormatError(f"no 'Answer1: ... Answer2: ...' choices in {instruction[:120]!r}")
    run = marks[start:]
    question = body[:run[0].start()].strip()
    choices = [body[m.end():(run[k + 1].start() if k + 1 < len(run) else len(body))].strip()
               for k, m in enumerate(run)]
    return question, choices


def standard_doc(record: dict, source: str) -> dict[str, Any]:
    """The standard zero-shot form of one LLM-Adapters record.

    Returns:
        ``{"query": str, "choices": [str], "gold": int}`` for every commonsense source, and for
        winogrande additionally ``{"contexts": [str], "continuation": str}`` (the harness scores
        the sentence's part after the blank given each filled-in prefix).
    """
    instruction = str(record.get("instruction") or "")
    options = answer_options(record)
    answer = str(record.get("answer") or "").strip().lower()
    if not options or answer not in [o.lower() for o in options]:
        raise RecordFormatError(f"{source} record: answer {answer!r} is not one of its options "
                                f"{options} ({instruction[:80]!r})")
    gold = [o.lower() for o in options].index(answer)
    if source == "boolq":
        m = re.search(r"question:\s*(.*?)\s*(?:\n|Answer format:|$)", instruction, re.DOTALL)
        if not m:
            raise RecordFormatError(f"boolq record without 'question:' ({instruction[:80]!r})")
        q = m.group(1).rstrip("?").strip()
        # options are true/false; the harness's choices are no/yes
        return {"query": f"Question: {q}?\nAnswer:", "choices": ["no", "yes"],
                "gold": 1 if answer == "true" else 0}
    question, choices = split_choices(instruction)
    if len(choices) != len(options):
        raise RecordFormatError(f"{source} record has {len(choices)} choice texts but "
                                f"{len(options)} options ({instruction[:80]!r})")
    if source == "winogrande":
        if "_" not in question:
            raise RecordFormatError(f"winogrande record without a blank '_' ({question[:80]!r})")
        idx = question.index("_")
        return {"query": question, "choices": choices, "gold": gold,
                "contexts": [question[:idx] + c for c in choices],
                "continuation": question[idx + 1:].strip()}
    if source == "openbookqa":
        query = question
    elif source == "social_i_qa":
        query = f"Q: {question}\nA:"
    else:  # ARC, PIQA
        query = f"Question: {question}\nAnswer:"
    return {"query": query, "choices": choices, "gold": gold}


def standard_training_record(record: dict, source: str) -> dict[str, Any]:
    """An Alpaca-style record in the standard form, for training with prompt_template ``{instruction}``.

    ``instruction`` is the standard prompt (``Question: ...\\nAnswer:``), ``output`` is a space
    plus the gold choice text (what the harness scores), ``answer`` the choice text.
    """
    doc = standard_doc(record, source)
    if source == "winogrande":
        prompt, target = doc["contexts"][doc["gold"]], doc["continuation"]
    else:
        prompt, target = doc["query"], doc["choices"][doc["gold"]]
    return {"instruction": prompt, "input": "", "output": " " + target,
            "answer": doc["choices"][doc["gold"]], "choices": doc["choices"], "source": source}
