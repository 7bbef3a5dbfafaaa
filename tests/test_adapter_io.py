"""Adapter folders: bit-exact save/load onto a fresh base model, refusal of foreign or broken
adapters (leaving the model untouched), atomic replacement."""

import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from goat_dist.adapter_io import (CONFIG_NAME, WEIGHTS_NAME, AdapterLoadError, load_adapter,
                                  save_adapter)
from goat_dist.config import GoatConfig
from goat_dist.layer import GoatLinear
from goat_dist.model import get_goat_model
from tests.helpers_core import small_cfg, lm_batch, snapshot, tiny_bert, tiny_llama


_cfg = small_cfg


def _train(goat, batch, steps=3):
    opt = torch.optim.AdamW(goat.trainable_parameters(), lr=1e-2)
    goat.train()
    for _ in range(steps):
        loss = goat(**batch).loss + goat.aux_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return goat.eval()


def _llama_batch():
    ids, mask = lm_batch(batch=2, seq=12, pad_last=3)
    return dict(input_ids=ids, attention_mask=mask, labels=ids)


def _bert_batch():
    ids, mask = lm_batch(batch=3, seq=10, pad_last=4, seed=3)
    return dict(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 2, 1]))


def _trained(factory, cfg, batch):
    """(fresh copy of the base model, trained GoatModel)."""
    model = factory()
    fresh = copy.deepcopy(model)
    return fresh, _train(get_goat_model(model, cfg), batch)


def _state(model):
    return (snapshot(model), {n: p.requires_grad for n, p in model.named_parameters()},
            {n: type(m) for n, m in model.named_modules()})


def _assert_untouched(model, state):
    sd, rg, types = state
    assert not any(isinstance(m, GoatLinear) for m in model.modules())
    assert {n: type(m) for n, m in model.named_modules()} == types
    now = snapshot(model)
    assert now.keys() == sd.keys() and all(torch.equal(now[k], sd[k]) for k in sd)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == rg


@pytest.fixture(scope="module")
def llama_adapter(tmp_path_factory):
    """A trained llama q/v adapter saved to disk: (path, trained GoatModel, fresh base copy)."""
    torch.manual_seed(0)
    fresh, goat = _trained(tiny_llama, _cfg(target_modules=["q_proj", "v_proj"]), _llama_batch())
    path = str(tmp_path_factory.mktemp("ad") / "llama_adapter")
    save_adapter(goat, path)
    return path, goat, fresh


# --------------------------------------------------------------------------- round trip
def test_llama_round_trip_bit_exact(llama_adapter):
    """Trained adapter -> save -> load on a fresh copy of the base: eval outputs are bit-identical,
    every adapter tensor is identical, and the loaded layers train the same parameters."""
    path, goat, fresh = llama_adapter
    base_copy = copy.deepcopy(fresh)
    loaded = load_adapter(base_copy, path)
    b = _llama_batch()
    with torch.no_grad():
        assert torch.equal(loaded.eval()(**b).logits, goat.eval()(**b).logits)
        assert not torch.equal(loaded(**b).logits, fresh(**b).logits)
    assert list(loaded.goat_layers) == list(goat.goat_layers)
    assert loaded.goat_config == goat.goat_config
    for name, l in loaded.goat_layers.items():
        o = goat.goat_layers[name]
        for t in ("lora_A", "lora_B", "res_A", "res_B"):
            assert torch.equal(getattr(l, t), getattr(o, t)), (name, t)
        assert torch.equal(l.lora_router.weight, o.lora_router.weight)
        assert l.scale == o.scale and l.compute == o.compute
    assert {n for n, p in loaded.model.named_parameters() if p.requires_grad} == \
        {n for n, p in goat.model.named_parameters() if p.requires_grad}


def test_folder_layout(llama_adapter):
    """The folder holds the config (with the GoatConfig and per-layer shapes) and the safetensors
    with experts, routers and frozen residual factors of each layer."""
    path, goat, _ = llama_adapter
    assert sorted(os.listdir(path)) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    meta = json.load(open(os.path.join(path, CONFIG_NAME)))
    assert GoatConfig.from_dict(meta["goat_config"]) == goat.goat_config
    assert set(meta["layers"]) == set(goat.goat_layers)
    keys = set(load_file(os.path.join(path, WEIGHTS_NAME)))
    for n in goat.goat_layers:
        assert {f"{n}.{t}" for t in ("lora_A", "lora_B", "lora_router.weight", "res_A", "res_B")} <= keys


def test_bert_round_trip_with_classifier(tmp_path):
    """BERT all-linear + trained classifier head: the loaded model reproduces the trained logits
    bit-exactly, head included."""
    fresh, goat = _trained(tiny_bert, _cfg(target_modules="all-linear", modules_to_save=["classifier"],
                                           init="goat_mini"), _bert_batch())
    path = str(tmp_path / "bert")
    save_adapter(goat, path)
    assert {"classifier.weight", "classifier.bias"} <= set(load_file(os.path.join(path, WEIGHTS_NAME)))
    loaded = load_adapter(fresh, path)
    b = _bert_batch()
    with torch.no_grad():
        assert torch.equal(loaded.eval()(**b).logits, goat(**b).logits)
    assert torch.equal(loaded.model.classifier.weight, goat.model.classifier.weight)
    assert loaded.model.classifier.weight.requires_grad


def test_hydralora_round_trip(tmp_path):
    """The shared-A (hydralora) adapter without residual round-trips bit-exactly."""
    fresh, goat = _trained(tiny_llama, _cfg(target_modules=["v_proj"], init="hydralora", top_k=1),
                           _llama_batch())
    save_adapter(goat, str(tmp_path / "h"))
    loaded = load_adapter(fresh, str(tmp_path / "h"))
    assert all(l.lora_A.shape[0] == 1 and l.res_A is None for l in loaded.goat_layers.values())
    b = _llama_batch()
    with torch.no_grad():
        assert torch.equal(loaded.eval()(**b).logits, goat(**b).logits)


# --------------------------------------------------------------------------- refusals
def test_load_onto_different_shapes_refused(llama_adapter):
    """An adapter for hidden=64 onto a hidden=32 llama: AdapterLoadError naming the layer and the
    shapes, and the model is left untouched."""
    path, _, _ = llama_adapter
    other = tiny_llama(hidden=32)
    state = _state(other)
    with pytest.raises(AdapterLoadError, match=r"q_proj.*64x64"):
        load_adapter(other, path)
    _assert_untouched(other, state)


def test_load_onto_other_architecture_refused(llama_adapter):
    """A llama adapter onto a BERT: AdapterLoadError (layer does not exist), model untouched."""
    path, _, _ = llama_adapter
    other = tiny_bert()
    state = _state(other)
    with pytest.raises(AdapterLoadError, match="does not exist"):
        load_adapter(other, path)
    _assert_untouched(other, state)


def test_load_onto_different_head_shape_refused(tmp_path):
    """A BERT adapter whose saved classifier has 3 labels onto a 2-label BERT: AdapterLoadError,
    and the model is left untouched (no GoatLinear left behind)."""
    _, goat = _trained(tiny_bert, _cfg(target_modules=["query", "value"], modules_to_save=["classifier"]),
                       _bert_batch())
    save_adapter(goat, str(tmp_path / "b3"))
    other = tiny_bert(num_labels=2)
    state = _state(other)
    with pytest.raises(AdapterLoadError, match="classifier"):
        load_adapter(other, str(tmp_path / "b3"))
    _assert_untouched(other, state)


def _copy_adapter(src, dst):
    os.makedirs(dst)
    for f in os.listdir(src):
        with open(os.path.join(src, f), "rb") as a, open(os.path.join(dst, f), "wb") as b:
            b.write(a.read())
    return dst


@pytest.mark.parametrize("damage, match", [
    ("no_folder", "does not exist"),
    ("no_weights", WEIGHTS_NAME),
    ("no_config", CONFIG_NAME),
    ("bad_json", "not valid JSON"),
    ("wrong_format", "not a goat_dist adapter"),
    ("truncated_weights", "corrupt"),
    ("garbage_weights", "corrupt"),
    ("missing_res_B", "missing"),
    ("missing_lora_A", "missing"),
])
def test_broken_adapter_refused(llama_adapter, tmp_path, damage, match):
    """Missing or corrupt files raise AdapterLoadError saying what is wrong; the model is untouched."""
    src, _, fresh = llama_adapter
    path = str(tmp_path / "broken")
    if damage != "no_folder":
        _copy_adapter(src, path)
    w, c = os.path.join(path, WEIGHTS_NAME), os.path.join(path, CONFIG_NAME)
    if damage == "no_weights":
        os.remove(w)
    elif damage == "no_config":
        os.remove(c)
    elif damage == "bad_json":
        open(c, "w").write(open(os.path.join(src, CONFIG_NAME)).read()[:-20])
    elif damage == "wrong_format":
        meta = json.load(open(c))
        meta["format"] = "peft"
        json.dump(meta, open(c, "w"))
    elif damage == "truncated_weights":
        data = open(w, "rb").read()
        open(w, "wb").write(data[: len(data) // 2])
    elif damage == "garbage_weights":
        open(w, "wb").write(b"\x00" * 64)
    elif damage.startswith("missing_"):
        from safetensors.torch import save_file
        sd = load_file(w)
        # the LAST layer's tensor: earlier layers would already be swapped if loading went ahead
        del sd[[k for k in sorted(sd) if k.endswith("." + damage[len("missing_"):])][-1]]
        save_file(sd, w)
    model = copy.deepcopy(fresh)
    state = _state(model)
    with pytest.raises(AdapterLoadError, match=match):
        load_adapter(model, path)
    _assert_untouched(model, state)


def test_config_missing_layers_refused(llama_adapter, tmp_path):
    """A config JSON that parses but lacks its 'layers' table is a corrupt adapter: AdapterLoadError."""
    src, _, fresh = llama_adapter
    path = _copy_adapter(src, str(tmp_path / "nolayers"))
    c = os.path.join(path, CONFIG_NAME)
    meta = json.load(open(c))
    del meta["layers"]
    json.dump(meta, open(c, "w"))
    model = copy.deepcopy(fresh)
    state = _state(model)
    with pytest.raises(AdapterLoadError):
        load_adapter(model, path)
    _assert_untouched(model, state)


# --------------------------------------------------------------------------- atomic save
def test_save_over_existing_folder_replaces_it(llama_adapter, tmp_path):
    """Saving over an existing folder replaces it whole (stale files gone, new tensors in), and no
    temporary folder is left next to it."""
    src, goat, _ = llama_adapter
    path = _copy_adapter(src, str(tmp_path / "ad"))
    open(os.path.join(path, "stale.txt"), "w").write("old")
    with torch.no_grad():
        layer = next(iter(goat.goat_layers.values()))
        old_B = layer.lora_B.detach().clone()
        layer.lora_B.add_(1.0)
    try:
        save_adapter(goat, path)
    finally:
        with torch.no_grad():
            layer.lora_B.copy_(old_B)
    assert sorted(os.listdir(path)) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    name = next(iter(goat.goat_layers))
    assert torch.equal(load_file(os.path.join(path, WEIGHTS_NAME))[f"{name}.lora_B"], old_B + 1.0)
    assert sorted(os.listdir(tmp_path)) == ["ad"]


def test_failed_save_keeps_previous_folder(llama_adapter, tmp_path):
    """A save that fails while writing leaves the previous adapter folder intact and loadable, and
    leaves no temporary folder behind."""
    src, goat, fresh = llama_adapter
    path = _copy_adapter(src, str(tmp_path / "ad"))
    before = {f: open(os.path.join(path, f), "rb").read() for f in os.listdir(path)}
    with pytest.raises(Exception):
        save_adapter(goat, path, state_dict={"bad": "not a tensor"})
    assert {f: open(os.path.join(path, f), "rb").read() for f in os.listdir(path)} == before
    load_adapter(copy.deepcopy(fresh), path)
    assert sorted(os.listdir(tmp_path)) == ["ad"], "temporary folder left behind"
