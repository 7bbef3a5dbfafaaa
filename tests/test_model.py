"""Injection into tiny Hugging Face models: targets, frozen base, training step, unload, aux loss
with padding, and configs that do not fit the model (which must leave it untouched)."""

import copy

import pytest
import torch
import torch.nn as nn

from goat_dist.config import GoatConfigError
from goat_dist.layer import GoatLinear
from goat_dist.model import GoatModel, find_target_modules, get_goat_model
from tests.helpers_core import (goat_param_names, lm_batch, small_cfg, snapshot, tiny_bert,
                                tiny_llama, tiny_roberta)
from tests.oracle import reference_forward

LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


_cfg = small_cfg


def _cls_batch(seed=3):
    ids, mask = lm_batch(batch=3, seq=10, pad_last=4, seed=seed)
    return dict(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 2, 1]))


def _llama_batch():
    ids, mask = lm_batch(batch=2, seq=12, pad_last=5)
    return dict(input_ids=ids, attention_mask=mask, labels=ids)


def _train_step(goat, batch, steps=1, lr=1e-2):
    opt = torch.optim.AdamW(goat.trainable_parameters(), lr=lr)
    goat.train()
    for _ in range(steps):
        out = goat(**batch)
        loss = out.loss + goat.aux_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
    goat.eval()
    return loss


def _assert_model_untouched(model, before_sd, before_rg, before_types):
    """No GoatLinear, same module types, same tensors, same requires_grad flags."""
    assert not any(isinstance(m, GoatLinear) for m in model.modules())
    assert {n: type(m) for n, m in model.named_modules()} == before_types
    after = snapshot(model)
    assert after.keys() == before_sd.keys()
    assert all(torch.equal(after[k], before_sd[k]) for k in before_sd)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before_rg


def _state(model):
    return (snapshot(model), {n: p.requires_grad for n, p in model.named_parameters()},
            {n: type(m) for n, m in model.named_modules()})


# --------------------------------------------------------------------------- targets
def test_llama_q_v_targets_and_trainables():
    """target_modules=[q_proj, v_proj]: exactly those 4 linears are adapted; only GOAT params train."""
    goat = get_goat_model(tiny_llama(), _cfg(target_modules=["q_proj", "v_proj"]))
    assert isinstance(goat, GoatModel)
    names = list(goat.goat_layers)
    assert names == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    for n in names:
        assert isinstance(goat.model.get_submodule(n), GoatLinear)
    trainable = {n for n, p in goat.model.named_parameters() if p.requires_grad}
    assert trainable == goat_param_names(goat.model) and len(trainable) == 3 * 4
    assert goat.config.hidden_size == 64                     # attribute fall-through


def test_llama_all_linear_skips_lm_head():
    """all-linear adapts the 7 projections of each block but never the output embedding."""
    goat = get_goat_model(tiny_llama(), _cfg(target_modules="all-linear"))
    assert sorted(goat.goat_layers) == sorted(f"model.layers.{i}.{'self_attn' if p in LLAMA_LINEARS[:4] else 'mlp'}.{p}"
                                               for i in range(2) for p in LLAMA_LINEARS)
    assert type(goat.model.lm_head) is nn.Linear
    assert not goat.model.lm_head.weight.requires_grad
    trainable = {n for n, p in goat.model.named_parameters() if p.requires_grad}
    assert trainable == goat_param_names(goat.model)


@pytest.mark.parametrize("factory, head", [(tiny_bert, {"classifier.weight", "classifier.bias"}),
                                           (tiny_roberta, {"classifier.dense.weight", "classifier.dense.bias",
                                                           "classifier.out_proj.weight", "classifier.out_proj.bias"})])
def test_classifier_models_modules_to_save(factory, head):
    """BERT/RoBERTa all-linear + modules_to_save=[classifier]: the head is trained in full and never
    wrapped; everything else but the GOAT params is frozen."""
    goat = get_goat_model(factory(), _cfg(target_modules="all-linear", modules_to_save=["classifier"]))
    assert not any(n.startswith("classifier") for n in goat.goat_layers)
    assert any(n.endswith("attention.self.query") for n in goat.goat_layers)
    trainable = {n for n, p in goat.model.named_parameters() if p.requires_grad}
    assert trainable == goat_param_names(goat.model) | head
    assert set(goat.saved_module_parameters()) == head


# --------------------------------------------------------------------------- training + unload
@pytest.mark.parametrize("factory, cfg_kw, batch", [
    (tiny_llama, dict(target_modules=["q_proj", "v_proj"]), _llama_batch),
    (tiny_llama, dict(target_modules="all-linear", compute="grouped"), _llama_batch),
    (tiny_bert, dict(target_modules="all-linear", modules_to_save=["classifier"]), _cls_batch),
    (tiny_roberta, dict(target_modules=["query", "value"], modules_to_save=["classifier"],
                        init="molora"), _cls_batch),
], ids=["llama-qv", "llama-all-grouped", "bert", "roberta-molora"])
def test_training_step_touches_only_trainables_and_unload_restores(factory, cfg_kw, batch):
    """AdamW steps change every trainable tensor and leave every frozen one bit-identical; unload()
    gives back the original modules with the original requires_grad flags, and (except for a trained
    head) outputs equal to the untouched model's bit-exactly."""
    model = factory()
    original = copy.deepcopy(model)
    rg_before = {n: p.requires_grad for n, p in model.named_parameters()}
    goat = get_goat_model(model, _cfg(**cfg_kw))
    b = batch()
    before = {n: p.detach().clone() for n, p in goat.model.named_parameters()}
    trainable = {n for n, p in goat.model.named_parameters() if p.requires_grad}
    loss = _train_step(goat, b, steps=2)
    assert torch.isfinite(loss)
    for n, p in goat.model.named_parameters():
        if n in trainable:
            assert not torch.equal(p, before[n]), f"trainable {n} did not change"
        else:
            assert torch.equal(p, before[n]), f"frozen {n} changed"
            assert p.grad is None, f"frozen {n} got a gradient"
    with torch.no_grad():
        assert not torch.equal(goat(**b).logits, original(**b).logits)   # the adapter does something
    restored = goat.unload()
    assert restored is model
    assert not any(isinstance(m, GoatLinear) for m in restored.modules())
    assert {n: p.requires_grad for n, p in restored.named_parameters()} == rg_before
    assert {n for n, _ in restored.named_parameters()} == {n for n, _ in original.named_parameters()}
    head = set(goat.goat_config.modules_to_save)
    with torch.no_grad():
        for n, p in original.named_parameters():         # copy the trained head, nothing else
            if any(n.startswith(h + ".") for h in head):
                p.copy_(restored.get_parameter(n))
        assert torch.equal(restored(**b).logits, original(**b).logits)
    for n, p in restored.named_parameters():
        if not any(n.startswith(h + ".") for h in head):
            assert torch.equal(p, original.get_parameter(n)), n


def test_unload_without_training_is_bit_exact():
    """Inject then unload with no training: outputs equal the original model's bit-exactly."""
    model = tiny_bert()
    original = copy.deepcopy(model)
    b = _cls_batch()
    restored = get_goat_model(model, _cfg(target_modules="all-linear",
                                          modules_to_save=["classifier"])).unload()
    with torch.no_grad():
        assert torch.equal(restored(**b).logits, original(**b).logits)


def test_reinjecting_a_goat_model_is_refused():
    """get_goat_model on a GoatModel raises (unload first)."""
    goat = get_goat_model(tiny_llama(), _cfg(target_modules=["q_proj"]))
    with pytest.raises(GoatConfigError, match="unload"):
        get_goat_model(goat, _cfg(target_modules=["q_proj"]))


# --------------------------------------------------------------------------- aux loss, padding
def _captured_inputs(goat):
    inputs = {}
    hooks = [l.register_forward_hook(lambda mod, args, out, name=n: inputs.__setitem__(name, args[0].detach()))
             for n, l in goat.goat_layers.items()]
    return inputs, hooks


@pytest.mark.parametrize("ignore", [True, False])
def test_aux_loss_padding(ignore):
    """With aux_loss_ignore_padding the per-layer aux equals the oracle over the unmasked tokens
    only (and differs from the all-token value); without it, it includes the padding. GoatModel's
    aux_loss() is aux_loss_coef times the sum over layers."""
    goat = get_goat_model(tiny_llama(), _cfg(target_modules=["q_proj", "v_proj"], aux_loss_coef=0.01,
                                             aux_loss_ignore_padding=ignore))
    b = _llama_batch()
    mask = b["attention_mask"]
    assert (mask == 0).sum() == 5
    inputs, hooks = _captured_inputs(goat)
    goat.train()
    goat(**b)
    for h in hooks:
        h.remove()
    total = 0.0
    for name, layer in goat.goat_layers.items():
        _, aux_masked = reference_forward(layer, inputs[name], token_mask=mask)
        _, aux_all = reference_forward(layer, inputs[name])
        want, other = (aux_masked, aux_all) if ignore else (aux_all, aux_masked)
        assert layer.last_aux_loss.item() == pytest.approx(want.item(), rel=1e-5), name
        assert abs(layer.last_aux_loss.item() - other.item()) > 1e-5, name
        n_tok = int(mask.sum()) if ignore else mask.numel()
        assert layer.expert_counts.sum().item() == n_tok * 2
        total += layer.last_aux_loss.item()
    assert goat.aux_loss().item() == pytest.approx(0.01 * total, rel=1e-5)
    assert goat.aux_loss().requires_grad
    assert goat._context.token_mask is None                  # cleared after the forward


def test_aux_loss_before_any_forward_is_zero():
    """aux_loss() is 0 before a training forward."""
    goat = get_goat_model(tiny_llama(), _cfg(target_modules=["q_proj"]))
    assert goat.aux_loss().item() == 0.0


def test_reset_expert_counts_per_layer():
    """reset_expert_counts returns one (E,) count per layer, tokens*top_k each, then starts over."""
    goat = get_goat_model(tiny_llama(), _cfg(target_modules=["v_proj"], aux_loss_ignore_padding=False))
    goat.train()
    goat(**_llama_batch())
    counts = goat.reset_expert_counts()
    assert set(counts) == set(goat.goat_layers)
    assert all(c.shape == (4,) and c.sum() == 24 * 2 for c in counts.values())
    assert all(c.sum() == 0 for c in goat.reset_expert_counts().values())


# --------------------------------------------------------------------------- invalid configs
@pytest.mark.parametrize("cfg_kw, match", [
    (dict(target_modules=["q_proj", "qkv_proj"]), r"target_modules.*qkv_proj"),
    (dict(target_modules=["lm_head"]), r"target_modules.*lm_head"),
    (dict(target_modules=["q_proj"], modules_to_save=["score"]), r"modules_to_save.*score"),
    (dict(target_modules="all-linear", r=128, num_experts=8), r"chunk.*8.*16.*layer"),
    (dict(target_modules=["k_proj"], r=48, num_experts=8), r"chunk.*4.*6.*k_proj"),
    (dict(target_modules=["q_proj"], init="pissa", r=128, num_experts=8), r"r=128.*min\(m,n\)=64"),
], ids=["unknown-target", "lm-head-target", "unknown-save", "chunk-all-linear", "chunk-k_proj",
        "pissa-r-too-big"])
def test_config_that_does_not_fit_leaves_model_untouched(cfg_kw, match):
    """A config that does not fit the model raises GoatConfigError naming the problem, and the model
    is left exactly as it was (no GoatLinear, same weights, same requires_grad)."""
    model = tiny_llama()
    model.model.embed_tokens.weight.requires_grad_(False)      # a non-default flag must survive too
    state = _state(model)
    with pytest.raises(GoatConfigError, match=match):
        get_goat_model(model, _cfg(**cfg_kw))
    _assert_model_untouched(model, *state)


def test_find_target_modules_exclude():
    """exclude_modules removes matches; suffix matching does not match partial names."""
    model = tiny_llama()
    names = find_target_modules(model, _cfg(target_modules="all-linear", exclude_modules=["down_proj"]))
    assert not any(n.endswith("down_proj") for n in names) and len(names) == 12
    with pytest.raises(GoatConfigError):
        find_target_modules(model, _cfg(target_modules=["proj"]))


class _NestedHeadNet(nn.Module):
    """A plain torch model whose task head is nested: head.classifier = Sequential(Linear, Linear)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
        self.head = nn.Module()
        self.head.classifier = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 3))

    def forward(self, x):
        return self.head.classifier(self.body(x))


def test_plain_torch_model_all_linear():
    """A plain nn.Module (no get_output_embeddings) with all-linear: every nn.Linear is adapted."""
    goat = get_goat_model(_NestedHeadNet(), _cfg(r=2, num_experts=2, top_k=1))
    assert sorted(goat.goat_layers) == ["body.0", "body.2", "head.classifier.0", "head.classifier.1"]
    assert goat(torch.randn(5, 16)).shape == (5, 3)


def test_nested_modules_to_save_is_trained_in_full_not_adapted():
    """modules_to_save matches by suffix, so a nested head (head.classifier) is trained in full:
    its linears are not wrapped by all-linear, all its parameters train, and exactly its
    parameters are saved with the adapter."""
    goat = get_goat_model(_NestedHeadNet(), _cfg(r=2, num_experts=2, top_k=1,
                                                 modules_to_save=["classifier"]))
    head = {f"head.classifier.{i}.{t}" for i in (0, 1) for t in ("weight", "bias")}
    assert sorted(goat.goat_layers) == ["body.0", "body.2"]
    trainable = {n for n, p in goat.model.named_parameters() if p.requires_grad}
    assert trainable == goat_param_names(goat.model) | head
    assert set(goat.saved_module_parameters()) == head
