"""Accuracy of a causal LM on Alpaca records with an ``answer``: option scoring or generation.

Two modes (``DataConfig.eval_mode``):

* ``options`` (records whose instruction ends with ``Answer format: a/b/c``: boolq, ARC, OBQA,
  PIQA, SIQA, WinoGrande): for each option, the record's own output with the gold option
  replaced by that option (``the correct answer is answer3``) is scored by its total
  log-likelihood after the prompt, and the best-scoring option is the prediction. Exact and
  cheap: one forward per option, no sampling, no parsing of free text, and it measures what the
  loss trains (tiny / early models that do not yet emit the format still get a meaningful
  accuracy). Under ZeRO-3 it is a plain forward, which every rank runs in lockstep anyway.
* ``generate`` (free-form, e.g. math with numeric answers; also usable for option records):
  greedy decoding from the prompt, then answer extraction as LLM-Adapters does it (first option
  word after "the correct answer is", or the last number for math). It is what the GOAT /
  LLM-Adapters papers report, but it needs ``max_new_tokens`` decoding steps per batch and, under
  ZeRO-3, ``synced_gpus=True`` so ranks that finish early keep serving parameter gathers.

Records without options always need ``generate``; the training loop picks the mode.

Inputs are built exactly as in training (data.py): prompt tokenized with special tokens,
response tokenized without, + eos, so the scored response tokens are the trained ones.
"""

from __future__ import annotations

import math
import re
from typing import Optional

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX, collate, format_prompt

_FORMAT = re.compile(r"answer format:\s*([^\n]*)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d+\.?\d*")
_ANSWER_IS = re.compile(r"the correct answer is", re.IGNORECASE)
NUMERIC_TOLERANCE = 1e-3  # |pred - gold| <= tol counts as correct (LLM-Adapters' math eval)


# --------------------------------------------------------------------------------- answer parsing

def answer_options(record: dict) -> Optional[list[str]]:
    """The options of ``Answer format: a/b/c`` in the record's instruction (or input), else None.

    E.g. ``["answer1", "answer2", "answer3", "answer4"]``, ``["true", "false"]``,
    ``["solution1", "solution2"]``, ``["option1", "option2"]``. The last such line wins; options
    keep the record's spelling; trailing punctuation is stripped. None for math / free-form.
    """
    for key in ("instruction", "input"):
        text = record.get(key) or ""
        found = _FORMAT.findall(str(text))
        if found:
            options = [o.strip().strip(".,;:!?\"'") for o in found[-1].split("/")]
            if len(options) >= 2 and all(options):
                return options
    return None


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
    """The answer in a generated response.

    Args:
        text: the decoded response (prompt excluded).
        options: the record's options: the first option word (case-insensitive) after the last
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


# --------------------------------------------------------------------------------- option scoring

def _candidate_response(record: dict, options: list[str], option: str) -> str:
    """The record's output with its gold option replaced by ``option``.

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


def option_scoring_batches(records: list[dict], tokenizer, template: str,
                           max_length: int) -> list[dict]:
    """One tokenized candidate per (record with options, option).

    A candidate is prompt + candidate response (see _candidate_response) + eos, labels -100 on the
    prompt. If it exceeds ``max_length``, the prompt loses tokens from its start (after a leading
    bos), never the response: the options differ only at the response's end, so cutting there
    would make them tie (a response longer than max_length on its own is kept whole). Records
    without options get no candidate.

    Returns:
        dicts with ``input_ids``, ``labels`` (lists, ready for ``collate``), ``record_index``
        (position in ``records``), ``option_index`` (position in the record's options) and
        ``option`` (the option string).
    """
    eos = tokenizer.eos_token_id
    bos = tokenizer.bos_token_id
    out = []
    for ri, rec in enumerate(records):
        options = answer_options(rec)
        if not options:
            continue
        prompt = list(tokenizer(format_prompt(rec, template), add_special_tokens=True)["input_ids"])
        responses = tokenizer([_candidate_response(rec, options, o) for o in options],
                              add_special_tokens=False)["input_ids"]
        for oi, (opt, resp) in enumerate(zip(options, responses)):
            resp = list(resp) + [eos]
            p = prompt
            excess = len(p) + len(resp) - max_length
            if excess > 0:
                keep = 1 if (p and bos is not None and p[0] == bos) else 0
                p = p[:keep] + p[keep + excess:]
            out.append({"input_ids": p + resp, "labels": [IGNORE_INDEX] * len(p) + resp,
                        "record_index": ri, "option_index": oi, "option": opt})
    return out


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of log p(label token) per sequence, with the causal shift; -100 labels are ignored.

    Args:
        logits: (B, S, V) model outputs (position s predicts token s + 1).
        labels: (B, S) token ids, -100 where not scored.

    Returns:
        (B,) float32: sum over s of log softmax(logits[:, s])[labels[:, s + 1]].
    """
    logits = logits[:, :-1].float()
    target = labels[:, 1:]
    mask = target != IGNORE_INDEX
    logp = F.log_softmax(logits, dim=-1).gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(dim=-1)


@torch.no_grad()
def score_candidates(model, candidates: list[dict], pad_id: int, batch_size: int,
                     device) -> list[float]:
    """Total response log-likelihood of each candidate (model forward in batches of ``batch_size``).

    A convenience for the training loop; under ZeRO-3 every rank must call it with the same
    number of batches.
    """
    scores: list[float] = []
    for i in range(0, len(candidates), batch_size):
        batch = collate(candidates[i:i + batch_size], pad_id)
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device)).logits
        scores += sequence_logprobs(logits, batch["labels"].to(device)).tolist()
    return scores


def pick_options(candidates: list[dict], scores: list[float]) -> list[int]:
    """Per record index, the option index with the highest score (ties: the first option).

    Returns:
        a list of length max(record_index) + 1; -1 for records that had no candidates.
    """
    if len(candidates) != len(scores):
        raise ValueError(f"pick_options: {len(candidates)} candidates but {len(scores)} scores")
    if not candidates:
        return []
    best: dict[int, tuple[float, int]] = {}
    for c, s in zip(candidates, scores):
        r = c["record_index"]
        if r not in best or s > best[r][0]:
            best[r] = (float(s), c["option_index"])
    return [best[r][1] if r in best else -1 for r in range(max(best) + 1)]


# ------------------------------------------------------------------------------------- generation

@torch.no_grad()
def generate_answers(model, tokenizer, records: list[dict], template: str, max_new_tokens: int,
                     device, batch_size: int, max_prompt_length: Optional[int] = None,
                     **generate_kwargs) -> list[str]:
    """Greedy responses to the records' prompts, decoded without special tokens.

    Prompts are tokenized as in training and left-padded (so every row's next token follows its
    own last prompt token); the tokenizer's padding side is not touched. ``max_prompt_length``
    keeps the prompt's last tokens (after bos) if given. ``generate_kwargs`` go to
    ``model.generate`` (the loop passes ``synced_gpus=True`` under ZeRO-3).

    Returns:
        one response string per record, in order.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    bos = tokenizer.bos_token_id
    prompts = tokenizer([format_prompt(r, template) for r in records],
                        add_special_tokens=True)["input_ids"]
    if max_prompt_length is not None:
        cut = []
        for p in prompts:
            keep = 1 if (p and bos is not None and p[0] == bos) else 0
            cut.append(p if len(p) <= max_prompt_length else p[:keep] + p[len(p) - max_prompt_length + keep:])
        prompts = cut
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        S = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), S), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), S), dtype=torch.long)
        for j, p in enumerate(chunk):
            ids[j, S - len(p):] = torch.as_tensor(p, dtype=torch.long)
            mask[j, S - len(p):] = 1
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                             eos_token_id=tokenizer.eos_token_id, **generate_kwargs)
        out += tokenizer.batch_decode(gen[:, S:], skip_special_tokens=True)
    return out
