"""SAT model: official-checkpoint equivalence, registration, pretrained files, attention paths, errors."""
import os
import re
import subprocess
import sys

import pytest
import timm
import torch

from Model import build_model, build_model_from_checkpoint, list_archs, model_spec
from Model.losses import (area_per_image, batch_area_loss, gaussian_kernel_3x3, normalization_loss,
                          normalization_per_image, sat_loss, SATLoss)
from utils.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from utils.errors import CheckpointError, ConfigError

from conftest import OFFICIAL_ARCH, OFFICIAL_CKPT, OFFICIAL_MODEL_KWARGS, REPO_ROOT

TINY = "deit_sat_tiny_patch16_224"
NANO = "deit_sat_nano_patch16_224"
SMALL = "deit_sat_small_patch16_224"


@pytest.mark.parametrize("impl", ["fused", "naive"])
def test_official_checkpoint_reproduces_official_outputs(official_outputs, impl):
    out = official_outputs
    model = build_model(OFFICIAL_ARCH, num_classes=10, attn_impl=impl, **OFFICIAL_MODEL_KWARGS)
    meta = load_checkpoint(OFFICIAL_CKPT, model)
    assert meta == {"best_thr": 0.4, "epoch": 30}
    model.eval()
    with torch.no_grad():
        logits, maps = model(out["input"])
    torch.testing.assert_close(logits, out["logits_test"], atol=1e-6, rtol=0)
    torch.testing.assert_close(maps, out["maps_test"], atol=1e-6, rtol=0)
    model.train()  # all drop rates are 0: train mode is deterministic
    with torch.no_grad():
        logits, maps = model(out["input"])
    torch.testing.assert_close(logits, out["logits_train"], atol=1e-6, rtol=0)
    torch.testing.assert_close(area_per_image(maps), out["batch_area_per_image"], atol=1e-6, rtol=0)
    torch.testing.assert_close(normalization_per_image(maps), out["norm_per_image"], atol=1e-6, rtol=0)


def test_official_checkpoint_rebuilds_with_arch_flag_only():
    model, meta = build_model_from_checkpoint(OFFICIAL_CKPT, arch=OFFICIAL_ARCH, **OFFICIAL_MODEL_KWARGS)
    assert model.num_classes == 10 and meta["epoch"] == 30


def official_format_file(model, path):
    """``model`` saved as the official release saves checkpoints (legacy format, 'module.' prefixes, kernel)."""
    state = {f"module.{key}": value for key, value in model.state_dict().items()}
    state["module.weight"] = gaussian_kernel_3x3()
    torch.save({"model": state, "best_thr": 0.4, "epoch": 30}, path, _use_new_zipfile_serialization=False)
    return path


def test_official_checkpoint_architecture_read_off_its_shapes(tmp_path):
    path = official_format_file(build_model(TINY, num_classes=10), tmp_path / "best_loc.pth.tar")
    model, meta = build_model_from_checkpoint(path)  # the release file records no architecture
    assert model.embed_dim == 192 and len(model.blocks) == 12 and model.num_classes == 10 and meta["epoch"] == 30
    assert read_checkpoint(path, mmap=True)["epoch"] == 30  # the legacy format (no mmap in torch.load): read whole
    with pytest.raises(CheckpointError) as err:
        build_model_from_checkpoint(path, arch="deit_sat_small_patch16_224")
    assert str(err.value) == (f"checkpoint {path} does not fit --arch deit_sat_small_patch16_224: it has the "
                              "shapes of deit_sat_tiny_patch16_224 (embed dim 192, depth 12); drop --arch")
    with pytest.raises(CheckpointError, match="has 10 classes, not --num-classes 200"):
        build_model_from_checkpoint(path, num_classes=200)
    # the width-48 official fixture fits no registered architecture
    with pytest.raises(CheckpointError, match="embed dim 48 and depth 12 fit no registered SAT architecture"):
        build_model_from_checkpoint(OFFICIAL_CKPT)


def test_non_finite_weights_are_one_line_naming_the_checkpoint(tmp_path):
    model = build_model(NANO, num_classes=2, img_size=32)
    state = model.state_dict()
    state["blocks.1.attn.qkv.weight"][0, 0] = float("nan")
    path = tmp_path / "nan.pth"
    save_checkpoint(dict(model_spec(model, NANO), model=state), path)
    with pytest.raises(CheckpointError) as err:
        build_model_from_checkpoint(path)
    assert str(err.value) == f"checkpoint {path} holds NaN/Inf weights in 1 tensor(s), first blocks.1.attn.qkv.weight"


def test_kernel_matches_spec():
    expected = torch.tensor([[0.0026284619, 0.0460116034, 0.0026284619],
                             [0.0460116034, 0.8054397389, 0.0460116034],
                             [0.0026284619, 0.0460116034, 0.0026284619]])
    torch.testing.assert_close(gaussian_kernel_3x3()[0, 0], expected, atol=1e-9, rtol=0)


@pytest.mark.parametrize("arch,dim,heads", [
    ("deit_sat_tiny_patch16_224", 192, 3),
    ("deit_sat_small_patch16_224", 384, 6),
    ("deit_sat_base_patch16_224", 768, 12),
])
def test_registered_archs_have_deit_dims_and_official_keys(arch, dim, heads):
    model = timm.create_model(arch, num_classes=7)
    assert model.embed_dim == dim and model.blocks[0].attn.num_heads == heads
    assert [b.spatial_aware for b in model.blocks] == [False] * 9 + [True] * 3
    assert model.spatial_layers == [10, 11, 12]  # the names of the block maps in overlays and predictions
    official = read_checkpoint(OFFICIAL_CKPT)["model"]  # official keys: 'module.' + ours + the loss kernel
    assert {f"module.{key}" for key in model.state_dict()} | {"module.weight"} == set(official)
    assert model.head.weight.shape == (7, dim, 3, 3)
    assert model.pretrained_cfg["hf_hub_id"] == f"timm/{arch.replace('_sat', '')}.fb_in1k"


def test_list_archs_names_the_sat_models_only():
    assert list_archs() == ["deit_sat_base_patch16_224", NANO, "deit_sat_small_patch16_224", TINY]
    assert "deit_tiny_patch16_224" in timm.list_models()  # timm's own DeiT is no SAT arch


def test_forward_contract_shapes_and_range():
    model = build_model(NANO, num_classes=4, img_size=112).eval()
    with torch.no_grad():
        logits, maps, block_maps = model(torch.randn(2, 3, 112, 112), return_block_maps=True)
    assert logits.shape == (2, 4) and maps.shape == (2, 7, 7) and block_maps.shape == (2, 3, 7, 7)
    assert (maps > 0).all() and (maps < 1).all()
    torch.testing.assert_close(block_maps.mean(dim=1), maps)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_number_of_spatial_blocks(n):
    model = build_model(NANO, num_classes=3, num_spatial_blocks=n)
    assert sum(b.spatial_aware for b in model.blocks) == n
    assert [b.spatial_aware for b in model.blocks][-n:] == [True] * n
    assert model.spatial_layers == list(range(len(model.blocks) - n + 1, len(model.blocks) + 1))
    _, _, block_maps = model(torch.randn(1, 3, 224, 224), return_block_maps=True)
    assert block_maps.shape[1] == n


def test_bad_number_of_spatial_blocks():
    with pytest.raises(ConfigError, match=r"num_spatial_blocks must be in \[1, 6\] \(the model's depth\), got 7"):
        build_model(NANO, num_classes=3, num_spatial_blocks=7)


def test_fused_equals_naive_attention_fp32_with_gradients():
    torch.manual_seed(0)
    model = build_model(NANO, num_classes=5)
    x = torch.randn(3, 3, 224, 224)
    target = torch.tensor([0, 3, 4])
    results = []
    for impl in ("fused", "naive"):
        model.set_attention_impl(impl)
        model.zero_grad()
        logits, maps = model(x)
        sat_loss(logits, maps, target, area_thr=0.25)["loss"].backward()
        results.append((logits.detach(), maps.detach(), model.loc_token.grad.clone(),
                        model.blocks[-1].attn.qkv.weight.grad.clone()))
    for fused, naive in zip(*results):
        torch.testing.assert_close(fused, naive, atol=1e-5, rtol=1e-4)


def test_cpu_bf16_training_attention_matches_the_kernel_and_the_naive_path():
    """Training under bf16 autocast on a CPU multiplies explicit matrices instead of calling
    scaled_dot_product_attention (faster there): the kernel's outputs (no gradients recorded), and the
    naive path's outputs and gradients under the same autocast, to bf16's precision. The query / key
    weights are scaled up so that attention is peaked (a wrong softmax scale moves every number by > 5%)."""
    from utils.amp import cpu_supports_bf16

    if not cpu_supports_bf16():
        pytest.skip("this CPU has no native bf16")
    torch.manual_seed(0)
    model = build_model(NANO, num_classes=5)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(8)
    x, target = torch.randn(3, 3, 224, 224), torch.tensor([0, 3, 4])

    def relative(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    # one autocast region per forward: torch <= 2.9 reused, with gradients, the weights' bf16 copies cached
    # by a no_grad forward of the same region (no gradient reached the weights)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        kernel = model(x)
    results = []
    for impl in ("fused", "naive"):
        model.set_attention_impl(impl)
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, maps = model(x)
        sat_loss(logits.float(), maps.float(), target, area_thr=0.25)["loss"].backward()
        results.append((logits.detach(), maps.detach(), model.loc_token.grad.clone(),
                        model.blocks[-1].attn.qkv.weight.grad.clone()))
    assert max(relative(out, ref) for out, ref in zip(results[0], kernel)) < 0.025
    assert max(relative(fused, naive) for fused, naive in zip(*results)) < 0.025


def test_spatial_probability_only_in_spatial_blocks():
    model = build_model(NANO, num_classes=2)
    x = torch.randn(1, 197 + 1, model.embed_dim)
    for block in model.blocks:
        _, prob = block(x)
        assert (prob is not None) == block.spatial_aware


def test_unknown_arch_lists_known_ones():
    with pytest.raises(ConfigError) as err:
        build_model("deit_sat_huge")
    for name in list_archs():
        assert name in str(err.value)


def test_pretrained_local_deit_file(tmp_path):
    torch.manual_seed(1)
    deit = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    path = tmp_path / "deit_tiny.pth"
    torch.save({"model": deit.state_dict()}, path)
    model = build_model(TINY, num_classes=20, pretrained=str(path))
    assert model.newly_initialized_keys == ["head.bias", "head.weight", "loc_embed", "loc_token"]
    torch.testing.assert_close(model.blocks[5].mlp.fc1.weight, deit.blocks[5].mlp.fc1.weight)
    torch.testing.assert_close(model.pos_embed, deit.pos_embed)
    # a bare timm state dict with DataParallel prefixes works too
    torch.save({f"module.{k}": v for k, v in deit.state_dict().items()}, path)
    bare = build_model(TINY, num_classes=20, pretrained=path)
    torch.testing.assert_close(bare.cls_token, deit.cls_token)


def test_pretrained_true_for_an_arch_without_deit_weights_is_one_config_error():
    with pytest.raises(ConfigError, match=f"^{NANO} has no DeiT weights to start from: --pretrained false"):
        build_model(NANO, num_classes=3, pretrained=True)



def test_models_build_without_huggingface_hub(monkeypatch):
    """huggingface_hub is an optional dependency of timm (a GPU machine given timm's wheel alone, `pip download
    --no-deps`, lacks it): building from random weights needs it not; the hub's weights say it is missing."""
    import importlib.util
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    spec = importlib.util.spec_from_file_location("Model._build_without_hub", REPO_ROOT / "Model" / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    assert build.build_model(NANO, num_classes=3, img_size=32).num_classes == 3
    with pytest.raises(CheckpointError, match=f"^could not get the DeiT weights of {TINY} from the timm hub "
                                              r"\(huggingface_hub is not installed: pip install huggingface_hub\)"):
        build.check_pretrained(TINY, True)

def test_pretrained_file_of_wrong_size_names_keys(tmp_path):
    deit = timm.create_model("deit_small_patch16_224", pretrained=False)
    path = tmp_path / "deit_small.pth"
    torch.save(deit.state_dict(), path)
    with pytest.raises(CheckpointError) as err:  # one line, not one per tensor
        build_model(TINY, num_classes=20, pretrained=path)
    # every tensor of the 12 blocks (12 each), the tokens, patch embedding and final norm: 12 * 12 + 6
    assert str(err.value) == f"{path}: pretrained weights do not fit the model (embed dim 192, depth 12; wrong " \
                             "DeiT size?): 150 tensors differ, e.g. cls_token: pretrained (1, 1, 384) vs model " \
                             "(1, 1, 192); pos_embed: pretrained (1, 197, 384) vs model (1, 197, 192)"


def test_pretrained_file_of_another_network_is_refused(tmp_path):
    """A CNN's state dict shares no tensor with SAT: nothing would load (it trained from random weights, with an
    INFO line listing every key as newly initialised)."""
    path = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), path)
    with pytest.raises(CheckpointError) as err:
        build_model(TINY, num_classes=20, pretrained=path)
    assert str(err.value) == (f"{path}: pretrained weights hold no tensor of the model's transformer blocks "
                              "(expected a DeiT / timm ViT or SAT state dict: blocks.0.attn.qkv.weight, ...; got "
                              "conv1.weight, bn1.weight, bn1.bias, ...)")


def test_pretrained_files_that_are_not_weights_are_one_line(tmp_path):
    """Read as checkpoints are: a text file, an empty one, a dict without a state dict (tracebacks before)."""
    (tmp_path / "text.pth").write_text("hello")
    (tmp_path / "empty.pth").write_bytes(b"")
    torch.save({"model": [1, 2, 3]}, tmp_path / "list.pth")
    for name, message in (("nope.pth", "pretrained weights {}: file not found"),
                          ("", "pretrained weights {}: a folder, not a pretrained weights file"),
                          ("text.pth", "{} is not a readable pretrained weights file"),
                          ("empty.pth", "{} is not a readable pretrained weights file"),
                          ("list.pth", "{} is not a pretrained weights file: expected a state dict")):
        path = tmp_path / name
        with pytest.raises(CheckpointError) as err:
            build_model(TINY, pretrained=str(path))
        assert str(err.value).startswith(message.format(path)) and "\n" not in str(err.value), str(err.value)


@pytest.mark.parametrize("spelling, fix", [("flags", "--pretrained false"), ("hub", "pretrained=False")])
def test_pretrained_word_that_is_no_file_says_what_the_option_takes(tmp_path, spelling, fix):
    """--pretrained none (a word the option does not take) said only 'pretrained weights none: file not found':
    the line now says what is expected, in the caller's spelling."""
    with pytest.raises(CheckpointError) as err:
        build_model(TINY, pretrained=str(tmp_path / "none"), spelling=spelling)
    assert str(err.value) == (f"pretrained weights {tmp_path / 'none'}: file not found (expected a weights file, or "
                              f"{fix} for random initialisation)")


def test_pretrained_distilled_deit_loads_and_layer_scale_is_refused(tmp_path):
    """A distilled DeiT's distillation token, its position and head are left out (a traceback from the
    pos_embed resampling before); DeiT III's layer scale, which SAT's blocks lack, is a one-line error (it was
    dropped silently: the model computed another function than the weights')."""
    distilled = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False)
    path = tmp_path / "deit_tiny_distilled.pth"
    torch.save({"model": distilled.state_dict()}, path)
    model = build_model(TINY, num_classes=20, pretrained=path)
    assert model.newly_initialized_keys == ["head.bias", "head.weight", "loc_embed", "loc_token"]
    torch.testing.assert_close(model.pos_embed, torch.cat([distilled.pos_embed[:, :1], distilled.pos_embed[:, 2:]], 1))
    torch.testing.assert_close(model.blocks[5].attn.qkv.weight, distilled.blocks[5].attn.qkv.weight)
    assert build_model(TINY, num_classes=20, pretrained=path, img_size=64).pos_embed.shape == (1, 17, 192)
    path = tmp_path / "deit3_small.pth"
    torch.save(timm.create_model("deit3_small_patch16_224", pretrained=False).state_dict(), path)
    with pytest.raises(CheckpointError) as err:
        build_model(SMALL, num_classes=20, pretrained=path)
    assert str(err.value) == (f"{path}: pretrained weights hold 24 tensors the model has no place for, e.g. "
                              "blocks.0.ls1.gamma, blocks.0.ls2.gamma, blocks.1.ls1.gamma (expected a DeiT / timm ViT "
                              "or SAT state dict: no layer scale or register tokens)")


def test_pretrained_classifier_side_tensors_are_left_out_as_the_head(tmp_path):
    """The representation layer of the original in21k ViTs (pre_logits, as in timm's old jx_*_in21k files) and
    timm's fc_norm of an average-pooled ViT act after the pooling SAT's conv head replaces: left out as the head
    is (refused as tensors the model has no place for before)."""
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, global_pool="avg")
    weights = {**vit.state_dict(), "pre_logits.fc.weight": torch.randn(192, 192),
               "pre_logits.fc.bias": torch.zeros(192)}
    torch.save(weights, tmp_path / "vit.pth")
    model = build_model(TINY, num_classes=20, pretrained=tmp_path / "vit.pth")
    assert model.newly_initialized_keys == ["head.bias", "head.weight", "loc_embed", "loc_token", "norm.bias",
                                            "norm.weight"]
    torch.testing.assert_close(model.blocks[11].mlp.fc2.weight, vit.blocks[11].mlp.fc2.weight)


def test_pretrained_deeper_network_is_said_as_its_depth(tmp_path):
    """A DeiT deeper than the model: its depth is named (not 'layer scale or register tokens')."""
    path = tmp_path / "deit_tiny.pth"
    torch.save(timm.create_model("deit_tiny_patch16_224", pretrained=False).state_dict(), path)
    with pytest.raises(CheckpointError) as err:
        build_model(TINY, num_classes=20, pretrained=path, depth=6)
    assert str(err.value) == (f"{path}: pretrained weights do not fit the model (embed dim 192, depth 6; pretrained "
                              "depth 12; wrong DeiT size?)")
    with pytest.raises(CheckpointError, match=r"\(embed dim 96, depth 6; pretrained depth 12; wrong DeiT size\?\): 78 "
                       r"tensors differ, e.g. cls_token: pretrained \(1, 1, 192\) vs model \(1, 1, 96\)"):
        build_model(NANO, num_classes=20, pretrained=path)


def test_pretrained_weights_of_another_patch_size_are_said_as_such(tmp_path):
    # a ViT of patch 32 at the model's width: the hint said 'wrong DeiT size?', pointing at the width
    path = tmp_path / "vit_patch32.pth"
    torch.save(build_model(NANO, num_classes=2, patch_size=32).state_dict(), path)
    with pytest.raises(CheckpointError) as err:
        build_model(NANO, num_classes=2, pretrained=path)
    assert str(err.value) == (f"{path}: pretrained weights do not fit the model (embed dim 96, depth 6; patch size "
                              "16; another patch size?): 1 tensors differ, e.g. patch_embed.proj.weight: pretrained "
                              "(96, 3, 32, 32) vs model (96, 3, 16, 16)")


def test_pretrained_safetensors_file(tmp_path):
    """timm's hub weights are .safetensors files: a local copy loads as a .pth does."""
    safetensors = pytest.importorskip("safetensors.torch", reason="no safetensors (optional for timm)")
    deit = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    safetensors.save_file(deit.state_dict(), tmp_path / "model.safetensors")
    model = build_model(TINY, num_classes=20, pretrained=tmp_path / "model.safetensors")
    torch.testing.assert_close(model.blocks[11].attn.qkv.weight, deit.blocks[11].attn.qkv.weight)


def test_pretrained_pos_embed_resampled_for_other_img_size(tmp_path):
    deit = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    path = tmp_path / "deit.pth"
    torch.save(deit.state_dict(), path)
    model = build_model(TINY, num_classes=3, img_size=160, pretrained=path)
    assert model.pos_embed.shape == (1, 101, 192)


def test_pretrained_pos_embed_resampling_is_logged(tmp_path, caplog):
    deit = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    path = tmp_path / "deit.pth"
    torch.save(deit.state_dict(), path)
    with caplog.at_level("INFO", logger="Model.sat"):
        build_model(TINY, num_classes=3, img_size=(160, 320), pretrained=path)
        build_model(TINY, num_classes=3, img_size=224, pretrained=path)  # the file's grid: nothing resampled
    said = [r.getMessage() for r in caplog.records if "pos_embed" in r.getMessage()]
    assert said == ["pretrained weights: position embeddings (pos_embed) resampled bicubically from their 14 x 14 "
                    "patch grid to the model's 10 x 20 (img_size 160 x 320)"]


def test_pretrained_file_of_wrong_width_at_another_img_size_names_the_files_shape(tmp_path):
    # pos_embed was resampled to the model's grid before the width was compared: "pretrained (1, 65, 384)", a
    # shape the 224 px file does not hold
    deit = timm.create_model("deit_small_patch16_224", pretrained=False)
    path = tmp_path / "deit_small.pth"
    torch.save(deit.state_dict(), path)
    with pytest.raises(CheckpointError, match=re.escape("pos_embed: pretrained (1, 197, 384) vs model (1, 65, 192)")):
        build_model(TINY, num_classes=20, img_size=128, pretrained=path)


def test_own_checkpoint_roundtrip_records_model_spec(tmp_path):
    model = build_model(NANO, num_classes=3, img_size=112, num_spatial_blocks=2)
    path = tmp_path / "ckpt" / "last.pth"
    save_checkpoint(dict(model_spec(model, NANO, ["a", "b", "c"], num_spatial_blocks=2),
                         model=model.state_dict(), epoch=2, best_thr=0.35), path)
    assert [p.name for p in path.parent.iterdir()] == ["last.pth"]  # no temp files left
    rebuilt, meta = build_model_from_checkpoint(path)
    assert meta["class_names"] == ["a", "b", "c"] and meta["epoch"] == 2 and meta["best_thr"] == 0.35
    assert rebuilt.num_spatial_blocks == 2 and rebuilt.grid_size == (7, 7)
    for key, value in model.state_dict().items():
        assert torch.equal(value, rebuilt.state_dict()[key])


@pytest.mark.parametrize("options", [{"img_size": (64, 96)}, {"img_size": 64, "patch_size": 8}])
def test_non_square_or_other_patch_size_checkpoint_rebuilds_without_options(tmp_path, options):
    # the checkpoint recorded img_size 64 only: "does not fit the model (1 keys differ, first: pos_embed ..."
    model = build_model(NANO, num_classes=3, **options)
    path = tmp_path / "model.pth"
    save_checkpoint(dict(model_spec(model, NANO), model=model.state_dict()), path)
    rebuilt, _ = build_model_from_checkpoint(path)
    assert rebuilt.patch_embed.img_size == model.patch_embed.img_size
    assert rebuilt.patch_embed.patch_size == model.patch_embed.patch_size
    torch.testing.assert_close(rebuilt.pos_embed, model.pos_embed, atol=0, rtol=0)


def test_checkpoint_shape_mismatch_is_one_line():
    model = build_model(OFFICIAL_ARCH, num_classes=12, **OFFICIAL_MODEL_KWARGS)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(OFFICIAL_CKPT, model)
    assert str(err.value) == (f"checkpoint {OFFICIAL_CKPT} does not fit the model (2 keys differ, first: head.bias "
                              "(10,) vs model (12,); head.weight (10, 48, 3, 3) vs model (12, 48, 3, 3))")


def test_not_a_checkpoint_names_the_file(tmp_path):
    bogus = tmp_path / "notes.pth"
    bogus.write_text("hello")
    with pytest.raises(CheckpointError, match="notes.pth is not a readable checkpoint"):
        load_checkpoint(bogus, build_model(NANO, num_classes=2))
    torch.save([1, 2, 3], bogus)
    with pytest.raises(CheckpointError, match="notes.pth is not a checkpoint"):
        load_checkpoint(bogus, build_model(NANO, num_classes=2))


@pytest.mark.parametrize("content, what", [
    (bytes(range(7, 256)) * 64, "not a torch.save file (neither a zip archive nor a pickle)"),
    (b"", "the file is empty"),
    (b"\x80\x04\x95" + bytes(64), "a pickle that a safe load cannot read: not written by torch.save, or holding "
                                  "more than tensors, plain containers and numbers ("),  # (torch's reason)
])
def test_unreadable_checkpoint_says_what_the_file_is_not_and_never_to_load_it_unsafely(tmp_path, content, what):
    path = tmp_path / "download.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(path)
    assert str(err.value).startswith(f"{path} is not a readable checkpoint: {what}")
    assert "weights_only" not in str(err.value) and "\n" not in str(err.value)


def test_checkpoints_holding_training_args_and_numpy_numbers_load(tmp_path):
    """As DeiT's main.py saves them (args: an argparse.Namespace) or with a threshold as np.float64: read (they
    were called 'cut short or damaged'); a class beyond those is refused as what it is, the file not run."""
    import argparse
    import pathlib
    import numpy as np
    model = build_model(NANO, num_classes=3)
    path = tmp_path / "deit_style.pth"
    torch.save({"state_dict": model.state_dict(), "args": argparse.Namespace(lr=5e-4, model="deit"),
                "best_thr": np.float64(0.35), "epoch": np.int64(7)}, path)
    rebuilt, meta = build_model_from_checkpoint(path)
    assert meta["args"].lr == 5e-4 and float(meta["best_thr"]) == 0.35 and rebuilt.num_classes == 3
    torch.save({"model": model.state_dict(), "data": pathlib.PurePosixPath("data")}, path)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(path)
    assert re.fullmatch(re.escape(f"{path} is not a readable checkpoint: a torch.save archive holding more than "
                                  "tensors, plain containers and numbers (Unsupported global: GLOBAL pathlib.")
                        + r"(_local\.)?" + re.escape("PurePosixPath was not an allowed global by default), which the "
                                                     "safe load used here does not rebuild: save its weights alone, "
                                                     "e.g. torch.save({'model': state_dict}, path)"), str(err.value))


def test_state_dict_layout_and_module_prefixes_load(tmp_path):
    model = build_model(NANO, num_classes=3)
    path = tmp_path / "other_project.pth"
    torch.save({"state_dict": {f"module.{key}": value for key, value in model.state_dict().items()}, "epoch": 7},
               path)
    rebuilt, meta = build_model_from_checkpoint(path)
    assert meta["epoch"] == 7 and meta["arch"] == NANO and rebuilt.num_classes == 3
    for key, value in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value), key


def test_losses_on_hand_checked_maps():
    # area: |mean over the batch of each map's mean - area_thr|, the deviation of the batch mean
    half = torch.stack([torch.zeros(14, 14), torch.ones(14, 14)])  # map means 0 and 1
    assert batch_area_loss(half, 0.5) == 0  # (the mean deviation would be 0.5)
    assert batch_area_loss(half, 0.3).item() == pytest.approx(0.2)
    # normalization: the smoothed map M' of a single pixel 0.5 is 0.5 x the kernel centre 0.8054397389,
    # (1 - M') M' = 0.4027198695 x 0.5972801305 = 0.2405365762
    assert normalization_loss(torch.full((2, 1, 1), 0.5)).item() == pytest.approx(0.2405365762, abs=1e-7)
    assert normalization_loss(torch.zeros(2, 5, 5)) == 0
    # one pixel of 1 in the middle of 3x3: M' is the kernel, mean of (1 - k) k over its 9 entries
    one = torch.zeros(1, 3, 3)
    one[0, 1, 1] = 1
    assert normalization_loss(one).item() == pytest.approx(0.0380856579, abs=1e-7)
    # total: cross-entropy of uniform logits over 4 classes is ln 4, plus area |0.5 - 0.3| plus normalization
    terms = sat_loss(torch.zeros(2, 4), torch.full((2, 1, 1), 0.5), torch.tensor([0, 3]), area_thr=0.3)
    assert set(terms) == {"loss", "ce", "area", "norm"}
    assert terms["ce"].item() == pytest.approx(1.3862944, abs=1e-6)
    assert terms["area"].item() == pytest.approx(0.2, abs=1e-7)
    assert terms["loss"].item() == pytest.approx(1.3862944 + 0.2 + 0.2405365762, abs=1e-6)


def test_loss_weights_scale_the_map_terms_and_weight_0_leaves_a_term_out():
    """The paper's ablation of the losses: the total weighs the batch area and normalization terms; the reported
    terms stay unweighted; a term weighted 0 sends no gradient to the maps."""
    maps = torch.full((2, 1, 1), 0.5, requires_grad=True)
    terms = sat_loss(torch.zeros(2, 4), maps, torch.tensor([0, 3]), area_thr=0.3, area_loss_weight=0.5,
                     norm_loss_weight=2.0)
    assert terms["area"].item() == pytest.approx(0.2, abs=1e-7)  # unweighted, as above
    assert terms["norm"].item() == pytest.approx(0.2405365762, abs=1e-7)
    assert terms["loss"].item() == pytest.approx(1.3862944 + 0.5 * 0.2 + 2 * 0.2405365762, abs=1e-6)
    area_only = SATLoss(0.3, area_loss_weight=1.0, norm_loss_weight=0.0)(torch.zeros(2, 4), maps, torch.tensor([0, 3]))
    area_only["loss"].backward()
    # d|mean(m) - 0.3| / dm_i = sign(0.5 - 0.3) / 2 = 0.5 for each of the two 1x1 maps: the normalization's
    # gradient (1 - 2 M') x the kernel centre, non-zero at 0.5, is absent
    assert maps.grad.flatten().tolist() == pytest.approx([0.5, 0.5], abs=1e-7)
    maps.grad = None
    SATLoss(0.3, area_loss_weight=0.0, norm_loss_weight=0.0)(torch.zeros(2, 4), maps, torch.tensor([0, 3]))[
        "loss"].backward()
    assert maps.grad is None or not maps.grad.any()  # cross-entropy alone: the maps get nothing


def test_losses_match_official_per_image_terms(official_outputs):
    """The official training step's per-image area and normalization terms, for the official maps."""
    model, _ = build_model_from_checkpoint(OFFICIAL_CKPT, arch=OFFICIAL_ARCH, **OFFICIAL_MODEL_KWARGS)
    with torch.no_grad():
        logits, maps = model.train()(official_outputs["input"])
    area = official_outputs["batch_area_per_image"]
    assert batch_area_loss(maps, 0.25).item() == pytest.approx((area.mean() - 0.25).abs().item(), abs=1e-6)
    assert normalization_loss(maps).item() == pytest.approx(official_outputs["norm_per_image"].mean().item(), abs=1e-6)


@pytest.fixture(scope="module")
def fresh_offline_process():
    """One fresh Python process (hub offline: HF_HUB_OFFLINE=1) that imports Model, makes a SAT model by its timm
    name and prints its class, then asks for the DeiT weights (pretrained=True) as the scripts do (run_cli)."""
    code = ("import Model, timm\nfrom utils.errors import run_cli\n"
            "print(type(timm.create_model('deit_sat_nano_patch16_224', num_classes=2)).__name__, flush=True)\n"
            "run_cli(lambda argv: Model.build_model('deit_sat_tiny_patch16_224', num_classes=3, pretrained=True))")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, env=env,
                          timeout=120)


def test_import_model_registers_in_fresh_process(fresh_offline_process):
    assert fresh_offline_process.stdout.strip() == "SATVisionTransformer", fresh_offline_process.stderr[-3000:]


def test_bf16_autocast_stays_close_to_fp32(official_outputs):
    """The documented AMP tolerance (README, Performance): maps within 1e-2, same top-1 class."""
    from utils.amp import cpu_supports_bf16

    if not cpu_supports_bf16():
        pytest.skip("this CPU has no native bf16")
    out = official_outputs
    model, _ = build_model_from_checkpoint(OFFICIAL_CKPT, arch=OFFICIAL_ARCH, **OFFICIAL_MODEL_KWARGS)
    model.eval()
    with torch.no_grad():
        logits32, maps32 = model(out["input"])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits16, maps16 = model(out["input"])
    assert (maps16.float() - maps32).abs().max() < 1e-2
    assert (logits16.float() - logits32).abs().max() < 2e-2
    assert torch.equal(logits16.argmax(1), logits32.argmax(1))


def test_pretrained_hub_unreachable_is_one_clear_error(fresh_offline_process):
    out = fresh_offline_process
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "error: could not get the DeiT weights of deit_sat_tiny_patch16_224" in out.stderr
    assert "--pretrained PATH" in out.stderr


def test_pretrained_without_network_fails_at_once_with_the_same_error(tmp_path):
    """Not offline mode and nothing cached: the hub probe (one TCP connection) fails instead of the
    download's retries; the host is made unresolvable so that the test means the same with network."""
    code = ("import Model\nfrom utils.errors import run_cli\n"
            "run_cli(lambda argv: Model.build_model('deit_sat_tiny_patch16_224', num_classes=3, pretrained=True))")
    env = {key: value for key, value in os.environ.items() if "proxy" not in key.lower() and key != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT="https://sat-hub-probe.invalid", HF_HOME=str(tmp_path / "hf"))
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "error: could not get the DeiT weights of deit_sat_tiny_patch16_224 from the timm hub" in out.stderr
    assert "--pretrained PATH" in out.stderr


def test_the_smoothing_kernel_first_made_under_inference_mode_serves_training():
    """The loss's kernel is copied to a device once (Model/losses.py); made first in an inference-mode
    evaluation, it must still be usable by a training step's backward."""
    from Model.losses import _kernel_on, normalization_loss
    _kernel_on.cache_clear()
    with torch.inference_mode():  # float64: a copy of the float32 kernel (as on a GPU), made in inference mode
        normalization_loss(torch.rand(2, 4, 4, dtype=torch.float64))
    maps = torch.rand(2, 4, 4, dtype=torch.float64, requires_grad=True)
    normalization_loss(maps).backward()
    assert maps.grad is not None and maps.grad.abs().sum() > 0


def test_a_checkpoint_of_a_newer_format_is_refused_in_one_line(tmp_path):
    # format_version was written but read by nothing: a newer file was loaded as if this code knew its keys
    model = build_model(NANO, num_classes=2)
    path = tmp_path / "best.pth"
    save_checkpoint(dict(model_spec(model, NANO, ["a", "b"]), model=model.state_dict(), epoch=1), path)
    assert read_checkpoint(path)["format_version"] == 1  # this version's own files load
    torch.save(dict(torch.load(path, weights_only=True), format_version=2), path)
    with pytest.raises(CheckpointError) as err:
        build_model_from_checkpoint(path)
    assert str(err.value) == (f"{path} was written by a newer version of this project (checkpoint format 2; this "
                              "one reads format 1 and older): update the code (git pull) to read it")


def test_not_a_checkpoint_says_what_the_file_holds(tmp_path):
    # an optimizer-only file, as some training loops save it: the line said only what was expected
    model = build_model(NANO, num_classes=2)
    optimizer = torch.optim.AdamW(model.parameters())
    for name, content, holds in (("optim.pth", {"optimizer": optimizer.state_dict()},
                                  "it holds a dict of the keys 'optimizer'"),
                                 ("optim_sd.pth", optimizer.state_dict(),
                                  "it holds an optimizer's state (state, param_groups), not model weights"),
                                 ("list.pth", [1, 2, 3], "it holds a list")):
        torch.save(content, tmp_path / name)
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(tmp_path / name, model)
        assert str(err.value) == (f"{tmp_path / name} is not a checkpoint: expected a state dict or a dict with a "
                                  f"'model' or 'state_dict' state dict; {holds}")


def test_a_plain_deit_given_to_a_script_as_checkpoint_names_train_pys_flag(tmp_path):
    # evaluator.py / tools/predict.py / tools/export_onnx.py have no --pretrained: the advice names train.py's
    path = tmp_path / "deit_tiny.pth"
    torch.save(timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=3).state_dict(), path)
    with pytest.raises(CheckpointError) as err:
        build_model_from_checkpoint(path)
    assert str(err.value).endswith("not SAT's; to start SAT from them: train.py --pretrained PATH")
