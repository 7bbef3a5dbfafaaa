"""train.bf16=auto: bf16 where it is native (CUDA with bf16, CPUs with AVX512-BF16 / AMX-BF16),
fp32 elsewhere; and bf16 training under ZeRO-3 (+ offload_param) stays close to fp32."""

from __future__ import annotations

import os

import pytest
import torch

from goat_dist.parallel.comm import dist_backend
from goat_dist.train.checkpoint import resume_bf16
from goat_dist.train.config import ConfigError, load_run_config
from goat_dist.train.ds_config import (bf16_wanted, cpu_native_bf16, read_ds_config,
                                       resolve_ds_config)
from tests.train_helpers import DEMO_DATA, ROOT, losses, read_summary, run_train, tiny_config

ZERO3 = os.path.join(ROOT, "ds_configs", "zero3.json")

EPYC = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
SAPPHIRE = "flags\t\t: fpu avx512f amx_tile amx_bf16 amx_int8\n"
OLD_XEON = "flags\t\t: fpu sse2 avx2 avx512f avx512_vnni\nbugs\t\t: avx512_bf16_is_not_a_flag_here\n"


@pytest.mark.parametrize("cpuinfo, native", [(EPYC, True), (SAPPHIRE, True), (OLD_XEON, False),
                                             ("", False)])
def test_cpu_native_bf16_reads_the_flags_line(cpuinfo, native):
    assert cpu_native_bf16(cpuinfo) is native


def _run(bf16: str):
    return load_run_config(None, ["model.preset=tiny-llama", f"train.bf16={bf16}",
                                  f"data.train_file={os.path.join(DEMO_DATA, 'train.json')}"])


def test_auto_follows_the_device_and_explicit_values_win():
    auto = _run("auto")
    assert bf16_wanted(auto, "cpu") is cpu_native_bf16()
    assert bf16_wanted(auto, "cuda") is (torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    assert bf16_wanted(auto, "mps") is False
    for value, want in (("true", True), ("false", False)):
        run = _run(value)
        assert bf16_wanted(run, "cpu") is want and bf16_wanted(run, "cuda") is want
        ds = resolve_ds_config(read_ds_config(None), run, world_size=1)
        assert ds["bf16"]["enabled"] is want
    # an explicit DeepSpeed value that contradicts the run config is refused, auto is not
    with pytest.raises(Exception, match="bf16.enabled"):
        resolve_ds_config({"bf16": {"enabled": True}},
                          _run("false"), world_size=1)


def test_a_resumed_run_keeps_its_checkpoints_precision():
    """auto follows the checkpoint (whatever this machine would pick), an agreeing explicit value
    is accepted, a contradicting one is refused, and a checkpoint written before the precision
    was recorded leaves train.bf16 to resolve as for a fresh run."""
    for saved in (True, False):
        assert resume_bf16({"bf16": saved}, _run("auto")) is saved
        assert resume_bf16({"bf16": saved}, _run(str(saved).lower())) is saved
        with pytest.raises(ConfigError, match="cannot change precision"):
            resume_bf16({"bf16": saved}, _run(str(not saved).lower()))
        ds = resolve_ds_config(read_ds_config(None), _run("auto"), world_size=1, bf16=saved)
        assert ds["bf16"]["enabled"] is saved
    assert resume_bf16({}, _run("auto")) is None and resume_bf16({}, _run("true")) is None


def test_cpu_only_torch_initialises_deepspeeds_default_backend():
    """gloo alone on a machine without CUDA (the NCCL+gloo pair is for GPUs)."""
    assert dist_backend() == ("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else None)


@pytest.mark.slow
def test_bf16_zero3_offload_param_trains_close_to_fp32(tmp_path):
    """ZeRO-3 with the frozen base partitioned and offloaded, in bf16 (DeepSpeed casts the model,
    fp32 masters) on 2 ranks: same losses as fp32 within bf16 rounding, and it learns."""
    fp32 = tiny_config(str(tmp_path / "a.yaml"), str(tmp_path / "fp32"), train={"bf16": False})
    bf16 = tiny_config(str(tmp_path / "b.yaml"), str(tmp_path / "bf16"), train={"bf16": True})
    assert run_train(["--config", fp32, "--ds_config", ZERO3], world=2) == 0
    assert run_train(["--config", bf16, "--ds_config", ZERO3], world=2) == 0
    s = read_summary(str(tmp_path / "bf16"))
    assert s["bf16"] is True and s["zero_stage"] == 3
    got, want = losses(str(tmp_path / "bf16")), losses(str(tmp_path / "fp32"))
    assert got == pytest.approx(want, abs=3e-2)
    assert got[-1] < got[0]
