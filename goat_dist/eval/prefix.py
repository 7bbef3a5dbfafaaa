"""Shared-prefix log-likelihood scoring: each context runs through the model once per request group.

Multiple-choice tasks ask lm-eval for log p(continuation | context) once per option, and the options
of a record share their context. lm-eval's HFLM runs ``context + continuation`` in full for every
option (its logits cache merges requests only when the continuations differ in their last token,
which an eos after the option defeats), so a 4-option ARC record costs four forwards of its
~200-token Alpaca prompt. Here the context runs once, its key/value cache is copied to one row per
option, and only the continuation tokens run again:

    pass 0 (shared head)   [1, H]      the tokens every context of the batch starts with (the
                                       Alpaca preamble: ~26 of the LLM-Adapters prompts' ~90
                                       tokens), once per batch, when there are >= MIN_SHARED_HEAD
    pass 1 (prefix)        [G, Lp]     left-padded contexts of G groups, each followed by the
                                       first tokens all its options share (" the correct answer
                                       is answer"), after the head, over its cache copied per
                                       group -> KV cache + the logits at the last K positions
                                       (they score the shared tokens and each option's next one)
    pass 2 (continuations) [R, Lc - 1] R = the requests with >= 2 tokens of their own left, each
                                       over its group's cached prefix -> logits for the rest

With a shared head, pass 1's padding sits between the head and each context's own tokens; the
attention mask hides it and explicit position ids keep every real token at its true position.

The numbers are lm-eval's (same truncation window, same sum of token log-probs, same greedy test):
only the order of floating-point operations differs, within fp32 rounding. Tasks, request building,
metrics and aggregation stay lm-eval's; this replaces one method of the HF wrapper (GoatHFLM). It is
not used when every rank must run the same number of forwards (ZeRO-3 or expert parallelism with
several ranks): the number of passes here depends on the rank's documents.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

Request = tuple[Sequence[int], Sequence[int]]   # (context tokens, continuation tokens)

# A shared head shorter than this is not worth its extra (batch-1) forward; the standard-form
# prompts share only "Question:", the LLM-Adapters ones the ~26-token Alpaca preamble.
MIN_SHARED_HEAD = 8


def shared_head_length(prefixes: Sequence[Sequence[int]], keep: Optional[Sequence[int]] = None
                       ) -> int:
    """Tokens every prefix starts with, leaving prefix g at least its last ``keep[g]`` tokens
    (default 1): the positions whose logits score what follows must run in pass 1."""
    if len(prefixes) < 2:
        return 0
    keep = [1] * len(prefixes) if keep is None else keep
    limit = min(len(p) - k for p, k in zip(prefixes, keep))
    first = prefixes[0]
    n = 0
    while n < limit and all(p[n] == first[n] for p in prefixes):
        n += 1
    return n


def prefix_and_continuation(ctx: Sequence[int], cont: Sequence[int], max_length: int
                            ) -> tuple[tuple[int, ...], list[int]]:
    """lm-eval's input window, split: the model sees ``(ctx + cont)[-(max_length + 1):][:-1]``, so
    the context loses its start when the pair is too long; the continuation is never cut.

    Raises:
        ValueError: an empty context or continuation, or a continuation longer than max_length.
    """
    if not ctx or not cont or len(cont) > max_length:
        raise ValueError(f"need a context and a continuation of 1..{max_length} tokens "
                         f"(got {len(ctx)} and {len(cont)})")
    window = (list(ctx) + list(cont))[-(max_length + 1):]
    return tuple(window[:len(window) - len(cont)]), list(cont)


def _batches(groups: list[tuple[tuple[int, ...], list[int]]], conts: list[list[int]],
             batch_size: int) -> list[list[tuple[tuple[int, ...], list[int]]]]:
    """Consecutive groups while their requests fit in ``batch_size`` rows (one group at least)."""
    out, cur, rows = [], [], 0
    for g in groups:
        n = len(g[1])
        if cur and rows + n > batch_size:
            out.append(cur)
            cur, rows = [], 0
        cur.append(g)
        rows += n
    if cur:
        out.append(cur)
    return out


@torch.no_grad()
def score_requests(model, requests: list[Request], max_length: int, batch_size: int, pad_id: int,
                   device: torch.device, on_done: Optional[Callable[[int, tuple[float, bool]], None]] = None
                   ) -> list[tuple[float, bool]]:
    """(sum of continuation token log-probs, continuation == greedy tokens) per request, in order.

    Args:
        model: a causal LM taking ``input_ids``, ``attention_mask``, ``position_ids``,
            ``cache``, ``use_cache`` and ``logits_to_keep`` (transformers' models; a
            GoatModel forwards them).
        requests: (context tokens, continuation tokens) pairs, as lm-eval encodes them.
        max_length: the model's window (lm-eval's ``max_length``).
        batch_size: requests (continuation rows) per forward; a group is never split.
        pad_id: token id for padding (masked out everywhere).
        on_done: called with (request index, answer) as each request is scored (progress bar,
            lm-eval's cache hook).
    """
    split = [prefix_and_continuation(c, t, max_length) for c, t in requests]
    by_prefix: dict[tuple[int, ...], list[int]] = {}
    for i, (prefix, _) in enumerate(split):
        by_prefix.setdefault(prefix, []).append(i)
    # longest first, like lm-eval: time estimates err high and an out-of-memory shows at once
    groups = sorted(by_prefix.items(), key=lambda kv: (-len(kv[0]), kv[0]))
    conts = [c for _, c in split]
    results: list[Optional[tuple[float, bool]]] = [None] * len(requests)
    for batch in _batches(groups, conts, batch_size):
        for i, ans in _score_batch(model, batch, conts, pad_id, device):
            results[i] = ans
            if on_done is not None:
                on_done(i, ans)
    return results  # type: ignore[return-value]


def shared_continuation(conts: Sequence[Sequence[int]]) -> list[int]:
    """The tokens all of a record's options start with (" the correct answer is answer" before
    "1" / "2" ...), leaving each option at least one token of its own; none for one option."""
    if len(conts) < 2:
        return []
    limit = min(len(c) for c in conts) - 1
    n = 0
    while n < limit and all(c[n] == conts[0][n] for c in conts):
        n += 1
    return list(conts[0][:n])


def _score_batch(model, batch: list[tuple[tuple[int, ...], list[int]]], conts: list[list[int]],
                 pad_id: int, device: torch.device) -> list[tuple[int, tuple[float, bool]]]:
    G = len(batch)
    # the options' common first tokens join their context in pass 1 (scored there, once per
    # record); pass 2 runs only each option's own tokens
    shared = [shared_continuation([conts[i] for i in members]) for _, members in batch]
    ext = [tuple(prefix) + tuple(u) for (prefix, _), u in zip(batch, shared)]
    tail = {i: conts[i][len(u):] for (_, members), u in zip(batch, shared) for i in members}
    K = 1 + max(len(u) for u in shared)        # pass-1 logits kept: the shared tokens' + the next
    # the head may not reach a context's last token: its logits score what follows the context
    H = shared_head_length(ext, keep=[len(u) + 1 for u in shared])
    H = H if H >= MIN_SHARED_HEAD else 0
    head_cache = None
    if H:                                                             # pass 0: the shared head once
        head = torch.tensor([ext[0][:H]], device=device)
        head_cache = model(input_ids=head, attention_mask=torch.ones_like(head),
                           position_ids=torch.arange(H, device=device)[None], use_cache=True,
                           logits_to_keep=1).cache
        head_cache.batch_repeat_interleave(G)
    Lp = max(len(p) for p in ext) - H
    ids = torch.full((G, Lp), pad_id, dtype=torch.long)
    own = torch.zeros((G, Lp), dtype=torch.long)
    for g, prefix in enumerate(ext):               # left padding: every context ends at Lp - 1
        ids[g, Lp - (len(prefix) - H):] = torch.tensor(prefix[H:])
        own[g, Lp - (len(prefix) - H):] = 1
    ids, own = ids.to(device), own.to(device)
    pos = H + (own.cumsum(-1) - 1).clamp_min(0)
    mask = torch.cat([torch.ones((G, H), dtype=torch.long, device=device), own], dim=1)  # [G, H + Lp]
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                logits_to_keep=K, **({"cache": head_cache} if H else {}))
    logp1 = F.log_softmax(out.logits.float(), dim=-1)                 # [G, K, V], last K positions
    first = logp1[:, -1]                                              # [G, V]: scores tail token 0
    shared_score = []                                                 # per group: (log p, greedy)
    for g, u in enumerate(shared):
        if not u:
            shared_score.append((0.0, True))
            continue
        lp = logp1[g, K - 1 - len(u):K - 1]                           # [len(u), V]
        tgt = torch.tensor(u, device=lp.device)
        shared_score.append((float(lp.gather(-1, tgt[:, None]).sum()),
                             bool((lp.argmax(-1) == tgt).all())))

    rows = [(g, i) for g, (_, members) in enumerate(batch) for i in members if len(tail[i]) > 1]
    rest = None                                                       # [R, Lc - 1, V]
    if rows:
        Lc = max(len(tail[i]) for _, i in rows) - 1
        cids = torch.full((len(rows), Lc), pad_id, dtype=torch.long)
        cmask = torch.zeros((len(rows), Lc), dtype=torch.long)
        for r, (_, i) in enumerate(rows):
            cids[r, :len(tail[i]) - 1] = torch.tensor(tail[i][:-1])
            cmask[r, :len(tail[i]) - 1] = 1
        src = torch.tensor([g for g, _ in rows], device=device)
        cache = out.cache
        cache.batch_select_indices(src)                               # one copy of the prefix per row
        cmask = cmask.to(device)
        full_mask = torch.cat([mask[src], cmask], dim=1)              # [R, H + Lp + Lc]
        cpos = mask[src].sum(-1, keepdim=True) + torch.arange(Lc, device=device)
        rest = model(input_ids=cids.to(device), attention_mask=full_mask, position_ids=cpos,
                     cache=cache, use_cache=True).logits
        rest = F.log_softmax(rest.float(), dim=-1)
    row_of = {i: r for r, (_, i) in enumerate(rows)}

    answers = []
    for g, (_, members) in enumerate(batch):
        for i in members:
            t = tail[i]
            logp, greedy = shared_score[g]
            logp += float(first[g, t[0]])
            greedy = greedy and int(first[g].argmax()) == t[0]
            if len(t) > 1:
                lp = rest[row_of[i], :len(t) - 1]                      # [Lt_i - 1, V]
                tgt = torch.tensor(t[1:], device=lp.device)
                logp += float(lp.gather(-1, tgt[:, None]).sum())
                greedy = greedy and bool((lp.argmax(-1) == tgt).all())
            answers.append((i, (logp, greedy)))
    return answers
