"""Shared-prefix scoring (goat_dist/eval/prefix.py) against one full forward per request.

The oracle runs ``(context + continuation)[-(max_length + 1):][:-1]`` unbatched and unpadded and sums
the log-softmax of the continuation tokens: lm-eval's definition. The prefix path must give the same
log-likelihoods (fp32 rounding) and the same greedy flags for shared and unshared contexts, one- and
many-token continuations, truncated windows and every batch size, on a plain Llama and on a GOAT
model (whose routers then see continuation tokens over a cached prefix).
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from goat_dist import GoatConfig, get_goat_model
from goat_dist.eval.lm import make_lm
from goat_dist.eval.prefix import (
    MIN_SHARED_HEAD,
    prefix_and_continuation,
    score_requests,
    shared_continuation,
    shared_head_length,
)

VOCAB = 97


def _llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256,
                      pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module", params=["llama", "goat"])
def model(request):
    m = _llama()
    if request.param == "goat":
        m = get_goat_model(m, GoatConfig(r=8, num_experts=4, top_k=2, init="goat",
                                         target_modules=["q_proj", "v_proj", "up_proj"]))
        with torch.no_grad():   # B = 0 at init would hide the experts: give them weight
            for layer in m.goat_layers.values():
                layer.lora_B.normal_(0, 0.5)
        m.eval()
    return m


def oracle(model, ctx, cont, max_length):
    window = (list(ctx) + list(cont))[-(max_length + 1):]
    inp = torch.tensor([window[:-1]])
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=inp).logits[0].double(), -1)[-len(cont):]
    tgt = torch.tensor(cont)
    return float(logp.gather(-1, tgt[:, None]).sum()), bool((logp.argmax(-1) == tgt).all())


def requests(seed: int, head: int = 0, option_stem: bool = False):
    """Records of 1-5 options over a shared context, continuations of 1-6 tokens; with ``head``,
    every context starts with the same ``head`` tokens (a prompt template's preamble); with
    ``option_stem``, a record's options start with the same 0-5 tokens (" the correct answer is
    answer" before "1", "2" ...), some options being only that stem plus one token."""
    rng = random.Random(seed)
    preamble = [rng.randrange(1, VOCAB) for _ in range(head)]
    out = []
    for _ in range(14):
        ctx = preamble + [rng.randrange(1, VOCAB) for _ in range(rng.randrange(1, 40))]
        stem = [rng.randrange(1, VOCAB) for _ in range(rng.randrange(0, 6) if option_stem else 0)]
        for _ in range(rng.randrange(1, 6)):
            own = rng.randrange(1, 4) if option_stem else rng.randrange(1, 7)
            out.append((ctx, stem + [rng.randrange(1, VOCAB) for _ in range(own)]))
    rng.shuffle(out)
    return out


@pytest.mark.parametrize("head,stem", [(0, False), (MIN_SHARED_HEAD + 4, False), (0, True),
                                       (MIN_SHARED_HEAD + 4, True)])
@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_equals_one_full_forward_per_request(model, batch_size, head, stem):
    """Also with a shared preamble (run once per batch, its cache copied per context, padding
    between it and each context's own tokens) and with options sharing their first tokens
    (scored once per record in pass 1)."""
    reqs = requests(batch_size, head, stem)
    got = score_requests(model, reqs, max_length=256, batch_size=batch_size, pad_id=0,
                         device=torch.device("cpu"))
    for (ctx, cont), (lp, greedy) in zip(reqs, got):
        ref_lp, ref_greedy = oracle(model, ctx, cont, 256)
        assert lp == pytest.approx(ref_lp, abs=1e-4)
        assert greedy == ref_greedy


def test_greedy_flag_true_when_the_continuation_is_the_argmax(model):
    ctx = [5, 9, 13]
    cont = []
    with torch.no_grad():      # greedy-decode 4 tokens: that continuation is the argmax at every step
        for _ in range(4):
            cont.append(int(model(input_ids=torch.tensor([ctx + cont])).logits[0, -1].argmax()))
    other = cont[:-1] + [(cont[-1] % (VOCAB - 1)) + 1]
    got = score_requests(model, [(ctx, cont), (ctx, other)], 256, 8, 0, torch.device("cpu"))
    assert got[0][1] is True and got[1][1] is False
    assert got[0][0] == pytest.approx(oracle(model, ctx, cont, 256)[0], abs=1e-4)


def test_truncated_window_matches_lm_eval(model):
    """Context + continuation longer than the window: the context loses its start, as in lm-eval."""
    rng = random.Random(7)
    ctx = [rng.randrange(1, VOCAB) for _ in range(30)]
    reqs = [(ctx, [rng.randrange(1, VOCAB) for _ in range(n)]) for n in (1, 3, 5)]
    got = score_requests(model, reqs, max_length=12, batch_size=2, pad_id=0, device=torch.device("cpu"))
    for (c, t), (lp, greedy) in zip(reqs, got):
        assert (lp, greedy) == (pytest.approx(oracle(model, c, t, 12)[0], abs=1e-4), oracle(model, c, t, 12)[1])
    assert prefix_and_continuation(ctx, [1, 2, 3], 12) == (tuple(ctx[-10:]), [1, 2, 3])
    with pytest.raises(ValueError, match="continuation"):
        prefix_and_continuation(ctx, list(range(1, 14)), 12)


def test_lm_eval_wrapper_prefix_path_equals_its_lockstep_path(model):
    """GoatHFLM's two loglikelihood paths: shared-prefix (default) and lm-eval's own loop (kept
    for ZeRO-3 / expert-parallel lockstep) give the same answers on the same requests."""
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t1")),
                                  pad_token="t0", eos_token="t2")
    reqs = [(("c", "x"), ctx, cont) for ctx, cont in requests(11)]
    fast = make_lm(model, tok, batch_size=4)._loglikelihood_tokens(reqs, disable_tqdm=True)
    slow = make_lm(model, tok, batch_size=4, synced_gpus=True)._loglikelihood_tokens(reqs, disable_tqdm=True)
    assert [g for _, g in fast] == [g for _, g in slow]
    assert [lp for lp, _ in fast] == pytest.approx([lp for lp, _ in slow], abs=1e-4)


def test_shared_head_length_leaves_every_context_its_last_token():
    assert shared_head_length([(1, 2, 3, 4), (1, 2, 3, 5, 6)]) == 3
    assert shared_head_length([(1, 2, 3), (1, 2, 3, 4)]) == 2     # (1, 2, 3) keeps its 3
    assert shared_head_length([(1, 2), (3, 2)]) == 0
    assert shared_head_length([(1, 2, 3)]) == 0                   # one context: nothing to share
    assert shared_head_length([(1, 2, 3, 4), (1, 2, 3, 5, 6)], keep=[2, 1]) == 2


def test_shared_continuation_leaves_every_option_a_token():
    assert shared_continuation([[7, 8, 9, 1], [7, 8, 9, 2, 3]]) == [7, 8, 9]
    assert shared_continuation([[7, 8], [7, 8, 9]]) == [7]                # [7, 8] keeps its 8
    assert shared_continuation([[7, 8], [5, 8]]) == []
    assert shared_continuation([[7, 8, 9]]) == []                         # one option


def test_head_stops_before_a_context_whose_options_share_a_stem(model):
    """Context A is a start of context B, and A's options share a stem that B continues with:
    the batch's common head must still leave A's last context token in pass 1 (its logits score
    the stem), not swallow it."""
    rng = random.Random(3)
    head = [rng.randrange(1, VOCAB) for _ in range(MIN_SHARED_HEAD + 2)]
    a, b = head + [5], head + [5, 9, 9, 7]
    reqs = [(a, [9, 9, 1]), (a, [9, 9, 2]), (b, [3]), (b, [4, 6])]
    got = score_requests(model, reqs, max_length=256, batch_size=64, pad_id=0,
                         device=torch.device("cpu"))
    for (ctx, cont), (lp, greedy) in zip(reqs, got):
        ref_lp, ref_greedy = oracle(model, ctx, cont, 256)
        assert lp == pytest.approx(ref_lp, abs=1e-4)
        assert greedy == ref_greedy
