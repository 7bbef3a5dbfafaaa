"""Chat data (``data.format: chat``): conversations rendered by the tokenizer's own chat template,
the loss on the assistant turns only.

Accepted records (as LLaMA-Factory accepts them):

* ``messages``: ``[{"role": "system"|"user"|"assistant", "content": str}, ...]`` (OpenAI / TRL);
* ShareGPT ``conversations``: ``[{"from": "system"|"human"|"gpt", "value": str}, ...]``, with an
  optional top-level ``system`` string (LLaMA-Factory's ``system`` column). ``human`` -> user,
  ``gpt`` -> assistant (LLaMA-Factory's default tags; ``user``/``assistant`` are accepted too);
* Alpaca records (``instruction``, ``input``, ``output``, optional ``system``): one user turn
  (instruction, a blank line, input) and one assistant turn, as LLaMA-Factory renders its
  ``alpaca`` format through a chat template. So the standard-form data files train chat models too.

After an optional system message, turns must alternate user/assistant and end with an assistant
turn (a trailing user turn would have nothing to learn); anything else is a DataError naming the
record (LLaMA-Factory skips such records with a warning; we refuse, so no record silently vanishes).

Tokenization (any Jinja template, no generation markers needed): with
``R(k)`` = the template's rendering of the first k messages and ``G(k)`` = the same with the
generation prompt, the text is cut into segments at the assistant turns,

    R(0..i-1)+G  |  assistant i  |  ...     prompt segment = G(i)[len(R(prev)):],
                                            assistant segment = R(i+1)[len(G(i)):]

The segment texts concatenate to exactly ``apply_chat_template(messages)``. The text is tokenized
as a whole (``add_special_tokens=False``: the template writes bos/eos itself), so the ids are those
of ``apply_chat_template(tokenize=True)``; a token is learned when its characters overlap an
assistant segment (the reply plus what the template closes it with, e.g. ``<|im_end|>\\n``), the
rule of transformers' ``return_assistant_tokens_mask``; -100 elsewhere. (Slow tokenizers without
offsets tokenize each segment on its own, as LLaMA-Factory's ``encode_multiturn`` does.) A template whose rendering of a prefix is
not a prefix of the whole rendering (some templates rewrite earlier turns) cannot be cut this way:
DataError.

Truncation: an example longer than ``max_length`` is cut at the end and counted; trailing
non-assistant tokens left after the cut (a dangling user turn or the start of a later assistant
turn's prompt) are removed, since they train nothing. If no assistant token is left (the first
reply's prompt alone fills ``max_length``), the example is dropped and counted as dropped too.
"""

from __future__ import annotations

import os
from typing import Optional

from .data import IGNORE_INDEX, DataError

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}
MESSAGE_ROLES = ("system", "user", "assistant")


class ChatDataError(DataError):
    """Bad chat data or template (a DataError: the launcher reports it and exits with status 2)."""


def record_kind(columns) -> Optional[str]:
    """``messages``, ``conversations`` or ``alpaca``: which shape the data file's columns have."""
    cols = set(columns)
    if "messages" in cols:
        return "messages"
    if "conversations" in cols:
        return "conversations"
    if {"instruction", "output"} <= cols:
        return "alpaca"
    return None


def to_messages(record: dict, index: int, source: str) -> list[dict]:
    """The record as ``[{"role", "content"}, ...]``, validated (see the module docstring).

    Raises:
        ChatDataError: unknown roles, missing content, wrong turn order, no final assistant turn.
    """
    where = f"data file {source!r}: record {index}"
    if record.get("messages") is not None:
        msgs = record["messages"]
        if not isinstance(msgs, list):
            raise ChatDataError(f"{where}: 'messages' must be a list of {{role, content}} objects")
        out = []
        for m in msgs:
            if not isinstance(m, dict) or m.get("role") not in MESSAGE_ROLES \
                    or not isinstance(m.get("content"), str):
                raise ChatDataError(f"{where}: message {m!r} must have a role in {MESSAGE_ROLES} "
                                    f"and a string content")
            out.append({"role": m["role"], "content": m["content"]})
    elif record.get("conversations") is not None:
        conv = record["conversations"]
        if not isinstance(conv, list):
            raise ChatDataError(f"{where}: 'conversations' must be a list of {{from, value}} objects")
        out = []
        if isinstance(record.get("system"), str) and record["system"]:
            out.append({"role": "system", "content": record["system"]})
        for m in conv:
            if not isinstance(m, dict) or m.get("from") not in SHAREGPT_ROLES \
                    or not isinstance(m.get("value"), str):
                raise ChatDataError(f"{where}: ShareGPT turn {m!r} must have 'from' in "
                                    f"{sorted(SHAREGPT_ROLES)} and a string 'value' (tool turns "
                                    f"'observation'/'function_call' are not supported)")
            out.append({"role": SHAREGPT_ROLES[m["from"]], "content": m["value"]})
    elif record.get("instruction") is not None and record.get("output") is not None:
        inp = record.get("input")
        user = str(record["instruction"]) + (f"\n\n{inp}" if inp is not None and str(inp).strip() else "")
        out = [{"role": "user", "content": user},
               {"role": "assistant", "content": str(record["output"])}]
        if isinstance(record.get("system"), str) and record["system"]:
            out.insert(0, {"role": "system", "content": record["system"]})
    else:
        raise ChatDataError(f"{where} has no 'messages', 'conversations' or 'instruction'+'output'; "
                            f"chat records need one of them")
    body = out[1:] if out and out[0]["role"] == "system" else out
    expected = ["user", "assistant"] * (len(body) // 2 + 1)
    if not body or [m["role"] for m in body] != expected[:len(body)] or body[-1]["role"] != "assistant":
        raise ChatDataError(f"{where}: turns must be [system], user, assistant, user, assistant, ... "
                            f"ending with an assistant turn; got roles {[m['role'] for m in out]}")
    return out


def check_records(ds, path: str, skip_bad: bool) -> tuple[list[dict], int]:
    """The records of a loaded chat data file, each validated by to_messages.

    Returns:
        (records, skipped): with ``skip_bad`` (``data.skip_bad_records``) a bad record is left out
        and counted instead of raising.

    Raises:
        ChatDataError: no column of an accepted shape; a bad record (unless ``skip_bad``); no
            good record at all.
    """
    if record_kind(ds.column_names) is None:
        raise ChatDataError(f"data file {path!r}: data.format=chat needs a 'messages' column "
                            f"(role/content), a ShareGPT 'conversations' column (from/value) or "
                            f"Alpaca 'instruction' + 'output'; found fields {list(ds.column_names)}")
    good, skipped = [], 0
    for i, r in enumerate(ds.to_list()):
        try:
            to_messages(r, i, path)
        except ChatDataError as e:
            if not skip_bad:
                raise ChatDataError(f"{e}; fix or remove the record, or set "
                                    f"data.skip_bad_records=true to skip such records") from None
            skipped += 1
            continue
        good.append(r)
    if not good:
        raise ChatDataError(f"data file {path!r}: all {skipped} records are bad chat records; "
                            f"fix the file")
    return good, skipped


def corpus_text(messages: list[dict]) -> str:
    """The contents joined by newlines: text to train a preset's tokenizer on."""
    return "\n".join(m["content"] for m in messages)


def resolve_template(tokenizer, template: Optional[str]) -> str:
    """The Jinja chat template to render with: ``template`` (a file path or an inline Jinja string,
    from ``data.chat_template``) or the tokenizer's own.

    Raises:
        ChatDataError: no template anywhere, or an unreadable template file.
    """
    if template:
        if "{%" in template or "{{" in template:
            return template
        if not os.path.isfile(template):
            raise ChatDataError(f"data.chat_template {template!r} is neither an existing file nor "
                                f"a Jinja template string; give a .jinja file path")
        with open(template) as f:
            return f.read()
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: the default one
        own = own.get("default")
    if not own:
        raise ChatDataError("data.format=chat needs a chat template, but the tokenizer has none; "
                            "use the model's chat tokenizer (e.g. an -Instruct model) or set "
                            "data.chat_template to a Jinja template file")
    return own


def _render(tokenizer, template: str, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def segments(tokenizer, template: str, messages: list[dict], where: str) -> list[tuple[str, bool]]:
    """The rendering cut into ``(text, is_assistant)`` segments whose concatenation equals
    ``apply_chat_template(messages)``.

    Raises:
        ChatDataError: the template is not prefix-stable (see the module docstring).
    """
    full = _render(tokenizer, template, messages, False)
    out: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        with_prompt = _render(tokenizer, template, messages[:i], True)
        through = _render(tokenizer, template, messages[:i + 1], False)
        if not (with_prompt.startswith(done) and through.startswith(with_prompt)
                and full.startswith(through)):
            raise ChatDataError(f"{where}: the chat template does not render a conversation's "
                                f"beginning as a prefix of the whole (it rewrites earlier turns), "
                                f"so the assistant turns cannot be located; use a template "
                                f"without that (data.chat_template)")
        out.append((with_prompt[len(done):], False))
        out.append((through[len(with_prompt):], True))
        done = through
    if len(full) > len(done):
        out.append((full[len(done):], False))
    return [(t, a) for t, a in out if t]


def _encode(tokenizer, segs: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of the segments' concatenation; labels = ids on assistant tokens.

    Fast tokenizers: the whole text is tokenized at once (``add_special_tokens=False``, as
    ``apply_chat_template(tokenize=True)``: the ids are the template's own), and a token is an
    assistant token when its characters overlap an assistant segment, which is the rule of
    transformers' ``return_assistant_tokens_mask``. Tokenizing segments apart would differ from
    the template's tokenization (sentencepiece adds a word-start marker at each segment start).
    Slow tokenizers (no offsets): each segment is tokenized on its own.
    """
    text = "".join(t for t, _ in segs)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        spans, pos = [], 0
        for t, is_asst in segs:
            if is_asst:
                spans.append((pos, pos + len(t)))
            pos += len(t)
        ids = list(enc["input_ids"])
        labels = [tok if any(s < b and e > a for a, b in spans) else IGNORE_INDEX
                  for tok, (s, e) in zip(ids, enc["offset_mapping"])]
        return ids, labels
    enc = tokenizer([t for t, _ in segs], add_special_tokens=False)["input_ids"]
    ids, labels = [], []
    for (_, is_asst), seg_ids in zip(segs, enc):
        ids += seg_ids
        labels += list(seg_ids) if is_asst else [IGNORE_INDEX] * len(seg_ids)
    return ids, labels


def tokenize_chat(records: list[dict], tokenizer, template: Optional[str], max_length: int,
                  source: str) -> tuple[list[list[int]], list[list[int]], list[int], int, int]:
    """Tokenize chat records into (input_ids, labels) with the loss on assistant turns only.

    Args:
        records: raw records (any accepted shape).
        tokenizer: a transformers tokenizer.
        template: ``data.chat_template`` (file or inline Jinja) or None for the tokenizer's own.
        max_length: maximum tokens per example.
        source: the data file, for messages.

    Returns:
        (input_ids, labels, kept, num_truncated, num_dropped), as
        ``goat_dist.train.data.tokenize_instruction``: ``kept`` are the indices of the records that
        made an example.

    Raises:
        ChatDataError: bad records, no template, a template that cannot be cut at assistant turns.
    """
    if not records:
        return [], [], [], 0, 0
    tmpl = resolve_template(tokenizer, template)
    ids_out, labels_out, kept = [], [], []
    truncated = dropped = 0
    for idx, rec in enumerate(records):
        where = f"data file {source!r}: record {idx}"
        try:
            segs = segments(tokenizer, tmpl, to_messages(rec, idx, source), where)
        except ChatDataError:
            raise
        except Exception as e:  # jinja2 errors raised by the template itself (raise_exception)
            raise ChatDataError(f"{where}: the chat template failed to render it "
                                f"({type(e).__name__}: {e})") from None
        ids, labels = _encode(tokenizer, segs)
        if len(ids) > max_length:
            truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
            last = max((j for j, l in enumerate(labels) if l != IGNORE_INDEX), default=-1)
            if last < 0:
                dropped += 1
                continue
            ids, labels = ids[:last + 1], labels[:last + 1]
        ids_out.append(ids)
        labels_out.append(labels)
        kept.append(idx)
    return ids_out, labels_out, kept, truncated, dropped
