"""Parameter groups, trainable subsets, lr schedules and AMP selection."""
import contextlib

import pytest
import torch

from Model import build_model
from utils import amp
from utils.amp import LossScaler, amp_dtype, autocast_context, cpu_supports_bf16, describe
from utils.errors import ConfigError
from utils.optim import build_optimizer, build_scheduler, lr_factor, param_groups, set_trainable

NANO = "deit_sat_nano_patch16_224"


@pytest.fixture
def model():
    return build_model(NANO, num_classes=4, img_size=64)


def names(model, params):
    ids = {id(p) for p in params}
    return {name for name, p in model.named_parameters() if id(p) in ids}


TOKENS = {"cls_token", "loc_token", "pos_embed", "loc_embed"}


def test_official_groups_decay_tokens_but_not_1d_params_and_biases(model):
    # The official optimizer is built on nn.DataParallel(model): the wrapper has no no_weight_decay(), so its
    # skip set is empty and the (1, N, D) tokens and embeddings are decayed; only 1-D params and biases are not.
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    decayed, not_decayed = names(model, decay["params"]), names(model, no_decay["params"])
    assert TOKENS | {"head.weight", "blocks.0.attn.qkv.weight", "patch_embed.proj.weight"} <= decayed
    assert {"norm.weight", "head.bias", "blocks.0.attn.qkv.bias", "patch_embed.proj.bias"} <= not_decayed
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_decay_tokens_false_exempts_the_tokens_and_embeddings(model):
    decay, no_decay = param_groups(model, 0.05, decay_tokens=False)
    assert TOKENS <= names(model, no_decay["params"]) and not TOKENS & names(model, decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("which", ["all", "sat", "head"])
def test_trainable_subsets(model, which):
    count = set_trainable(model, which)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert count == sum(p.numel() for p in model.parameters() if p.requires_grad)
    if which == "head":
        assert trainable == {"head.weight", "head.bias"}
    elif which == "sat":
        assert {"loc_token", "loc_embed", "blocks.5.attn.qkv.weight", "blocks.3.mlp.fc1.bias", "norm.weight",
                "head.weight"} <= trainable
        assert not trainable & {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.2.attn.qkv.weight"}
    else:
        assert len(trainable) == len(list(model.parameters()))
    groups = param_groups(model, 0.05)
    assert sum(len(g["params"]) for g in groups) == len(trainable)
    with pytest.raises(ConfigError):
        set_trainable(model, "backbone")


def test_constant_schedule_is_constant_after_warmup(model):
    optimizer = build_optimizer(model, 1e-3, 0.05)
    scheduler = build_scheduler(optimizer, schedule="constant", lr=1e-3, min_lr=1e-6, epochs=3, warmup_epochs=1,
                                steps_per_epoch=4)
    lrs = []
    for _ in range(12):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lrs[4:] == pytest.approx([1e-3] * 8)


def test_cosine_schedule_reaches_min_lr():
    factors = [lr_factor(s, schedule="cosine", total_steps=10, warmup_steps=0, min_ratio=0.01) for s in range(11)]
    assert factors[0] == 1.0 and factors[5] == pytest.approx(0.505) and factors[10] == pytest.approx(0.01)
    assert all(a >= b for a, b in zip(factors, factors[1:]))


def test_amp_selection_on_cpu():
    assert amp_dtype("cpu") is None  # fp32 unless asked for
    assert amp_dtype("cpu", False) is None
    assert amp_dtype("cpu", "auto") == (torch.bfloat16 if cpu_supports_bf16() else None)
    assert autocast_context("cpu", False) is contextlib.nullcontext
    assert not LossScaler("cpu", False).scaler.is_enabled()
    if cpu_supports_bf16():
        assert amp_dtype("cpu", True) == torch.bfloat16
        with autocast_context("cpu", True)():
            assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16
        assert not LossScaler("cpu", True).scaler.is_enabled()  # bf16 needs no grad scaler
    else:
        with pytest.raises(ConfigError, match="native bf16"):
            amp_dtype("cpu", True)


def test_a_warmup_as_long_as_the_run_reaches_lr_at_its_last_step():
    """warmup_epochs == epochs: the last step trains at lr (train.py warns only for a longer warm-up)."""
    factors = [lr_factor(s, schedule="cosine", total_steps=8, warmup_steps=8, min_ratio=0.0) for s in range(8)]
    assert factors == pytest.approx([0.125 * (s + 1) for s in range(8)]) and factors[-1] == 1.0


@pytest.mark.parametrize("native_bf16", [True, False])
def test_amp_on_a_cpu_with_and_without_native_bf16(monkeypatch, native_bf16):
    """Both CPU kinds, whichever this machine is: bf16 autocast where oneDNN has native bf16; else --amp is
    refused in one line and amp: auto is fp32."""
    monkeypatch.setattr(amp, "cpu_supports_bf16", lambda: native_bf16)
    if native_bf16:
        assert amp_dtype("cpu", True) == amp_dtype("cpu", "auto") == torch.bfloat16
        assert describe("cpu", "auto") == "bf16 autocast"
    else:
        with pytest.raises(ConfigError, match=r"^--amp \(amp: true\) needs CUDA or a CPU with native bf16"):
            amp_dtype("cpu", True)
        assert amp_dtype("cpu", "auto") is None and describe("cpu", "auto") == "fp32"
        assert autocast_context("cpu", "auto") is contextlib.nullcontext
