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


def requests(seed: int, head: int = 0):
    """Records of 1-5 options over a shared context, continuations of 1-6 tokens; with ``head``,
    every context starts with the same ``head`` tokens (a prompt template's preamble)."""
    rng = random.Random(seed)
    preamble = [rng.randrange(1, VOCAB) for _ in range(head)]
    out = []
    for _ in range(14):
        ctx = preamble + [rng.randrange(1, VOCAB) for _ in range(rng.randrange(1, 40))]
        for _ in range(rng.randrange(1, 6)):
            out.append((ctx, [rng.randrange(1, VOCAB) for _ in range(rng.randrange(1, 7))]))
    rng.shuffle(out)
    return out


@pytest.mark.parametrize("head", [0, MIN_SHARED_HEAD + 4])
@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_equals_one_full_forward_per_request(model, batch_size, head):
    """Also with a shared preamble (run once per batch, its cache copied per context, padding
    between it and each context's own tokens)."""
    reqs = requests(batch_size, head)
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
