"""GoatConfig: validation (every invalid value names its field), derived values, serialisation."""

import math

import pytest

from goat_dist.config import INITS, SCALINGS, GoatConfig, GoatConfigError


INVALID = [
    (dict(r=12, num_experts=8), "r"),
    (dict(r=0), "r"),
    (dict(r=8.0), "r"),
    (dict(num_experts=0), "num_experts"),
    (dict(top_k=0), "top_k"),
    (dict(r=8, num_experts=4, top_k=5), "top_k"),
    (dict(init="lora"), "init"),
    (dict(init="GOAT"), "init"),
    (dict(scaling="pissa"), "scaling"),
    (dict(scaling=0.0), "scaling"),
    (dict(scaling=-2.0), "scaling"),
    (dict(scaling="nan"), "scaling"),
    (dict(scaling=True), "scaling"),
    (dict(compute="loop"), "compute"),
    (dict(rho=-1.0), "rho"),
    (dict(rho=0.0), "rho"),
    (dict(lora_alpha=-16.0), "lora_alpha"),
    (dict(lora_alpha=0.0), "lora_alpha"),
    (dict(eta=-1.0), "eta"),
    (dict(init_cof=-0.1), "init_cof"),
    (dict(init_cof=math.inf), "init_cof"),
    (dict(lora_dropout=-0.1), "lora_dropout"),
    (dict(lora_dropout=1.0), "lora_dropout"),
    (dict(aux_loss_coef=-1e-3), "aux_loss_coef"),
    (dict(aux_loss_coef=math.nan), "aux_loss_coef"),
    (dict(aux_loss_coef=math.inf), "aux_loss_coef"),
    (dict(svd_dtype="float16"), "svd_dtype"),
    (dict(grouped_min_rank=0), "grouped_min_rank"),
    (dict(target_modules="q_proj"), "target_modules"),
    (dict(target_modules=[]), "target_modules"),
    (dict(target_modules=["q_proj", ""]), "target_modules"),
    (dict(init="pissa_milora", r=1, num_experts=1, top_k=1), "pissa_milora"),
]


@pytest.mark.parametrize("kwargs, field", INVALID,
                         ids=[f"{f}:{'/'.join(f'{k}={v!r}' for k, v in kw.items())}" for kw, f in INVALID])
def test_invalid_config_raises_naming_field(kwargs, field):
    """Each invalid value raises GoatConfigError whose message names the offending field."""
    with pytest.raises(GoatConfigError, match=field):
        GoatConfig(**kwargs)


def test_config_error_is_value_error():
    """GoatConfigError is a ValueError (callers catching ValueError keep working)."""
    assert issubclass(GoatConfigError, ValueError)


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("scaling", SCALINGS + (2.0,))
def test_valid_configs_accepted(init, scaling):
    """Every init x scaling combination with r % E == 0 and top_k <= E is accepted."""
    c = GoatConfig(r=16, num_experts=4, top_k=4, init=init, scaling=scaling)
    assert c.init == init and c.expert_rank == 4


def test_scale_for_each_scaling():
    """s = alpha/r_e (lora), alpha/sqrt(r_e) (rslora), sqrt(3 eta n / r_e) (goat), or the number."""
    kw = dict(r=32, lora_alpha=64.0, num_experts=8, eta=2.0)
    assert GoatConfig(**kw, scaling="lora").scale_for(1024) == pytest.approx(16.0)
    assert GoatConfig(**kw, scaling="rslora").scale_for(1024) == pytest.approx(32.0)
    assert GoatConfig(**kw, scaling="goat").scale_for(1024) == pytest.approx(math.sqrt(3 * 2 * 1024 / 4))
    assert GoatConfig(**kw, scaling="goat").scale_for(4096) == pytest.approx(math.sqrt(3 * 2 * 4096 / 4))
    assert GoatConfig(**kw, scaling=3.5).scale_for(1024) == 3.5
    assert GoatConfig(**kw, scaling="2").scale_for(7) == 2.0   # numbers given as strings (YAML/CLI)


def test_official_defaults():
    """Defaults reproduce the paper's runs: s = 16 for r=8, alpha=16, E=8; init_cof = 1/E; rho = 10."""
    c = GoatConfig()
    assert (c.r, c.lora_alpha, c.num_experts, c.top_k, c.init, c.rho) == (8, 16.0, 8, 2, "goat", 10.0)
    assert c.scale_for(4096) == 16.0
    assert c.residual_coef == pytest.approx(1 / 8)
    assert GoatConfig(init_cof=0.5).residual_coef == 0.5
    assert GoatConfig(init_cof=0).residual_coef == 0.0


def test_from_dict_rejects_unknown_fields():
    """from_dict refuses unknown keys and names them."""
    with pytest.raises(GoatConfigError, match="lora_rank"):
        GoatConfig.from_dict({"r": 8, "lora_rank": 8})


def test_from_dict_validates():
    """from_dict runs the same validation as the constructor."""
    with pytest.raises(GoatConfigError, match="top_k"):
        GoatConfig.from_dict({"r": 8, "num_experts": 2, "top_k": 3})


def test_dict_and_json_round_trip():
    """to_dict -> from_dict gives an equal config; to_json is valid JSON of the same dict."""
    import json
    c = GoatConfig(r=16, num_experts=4, top_k=1, init="goat_mini", scaling="rslora", init_cof=0.3,
                   target_modules=("q_proj", "v_proj"), modules_to_save=["classifier"],
                   aux_loss_ignore_padding=False, compute="grouped")
    assert c.target_modules == ["q_proj", "v_proj"]
    c2 = GoatConfig.from_dict(c.to_dict())
    assert c2 == c
    assert json.loads(c.to_json()) == c.to_dict()
