"""hubconf.py: torch.hub.load(<repo dir>, <arch>, source='local', ...) builds SAT models and loads checkpoints."""
import numpy as np
import pytest
import timm
import torch
from PIL import Image

import hubconf
from DataLoader.eval_views import default_resize_size
from DataLoader.transforms import test_transform as centre_transform
from Model import SATVisionTransformer, build_model, model_spec
from utils.checkpoint import save_checkpoint
from utils.errors import CheckpointError, ConfigError

from conftest import OFFICIAL_ARCH, OFFICIAL_CKPT, OFFICIAL_MODEL_KWARGS, REPO_ROOT


def test_one_entry_point_per_architecture():
    entry_points = sorted(name for name in dir(hubconf)
                          if callable(getattr(hubconf, name)) and not name.startswith("_"))
    assert entry_points == ["deit_sat_base_patch16_224", "deit_sat_nano_patch16_224", "deit_sat_small_patch16_224",
                            "deit_sat_tiny_patch16_224"]
    assert hubconf.dependencies == ["torch", "timm"]
    assert hubconf.deit_sat_small_patch16_224.__doc__.startswith("SAT on DeiT-Small: dim 384, 6 heads, depth 12.")


def test_hub_load_local_random_weights():
    model = torch.hub.load(str(REPO_ROOT), "deit_sat_small_patch16_224", source="local", pretrained=False,
                           num_classes=5)
    assert isinstance(model, SATVisionTransformer)
    assert (model.embed_dim, len(model.blocks), model.blocks[0].attn.num_heads, model.num_classes) == (384, 12, 6, 5)


def test_hub_load_local_official_checkpoint(official_outputs):
    model = torch.hub.load(str(REPO_ROOT), OFFICIAL_ARCH, source="local", checkpoint=str(OFFICIAL_CKPT),
                           **OFFICIAL_MODEL_KWARGS)
    assert model.num_classes == 10  # read off the official file's head
    assert model.pretrained_cfg["num_classes"] == 10 and model.pretrained_cfg["label_names"] is None  # none recorded
    with torch.no_grad():
        logits, maps = model.eval()(official_outputs["input"])
    torch.testing.assert_close(logits, official_outputs["logits_test"], atol=1e-6, rtol=0)
    torch.testing.assert_close(maps, official_outputs["maps_test"], atol=1e-6, rtol=0)


def test_hub_checkpoint_errors_name_the_entry_point_and_keyword(tmp_path):
    nano = "deit_sat_nano_patch16_224"
    path = tmp_path / "nano.pth"
    model = build_model(nano, num_classes=3)
    save_checkpoint({"model": model.state_dict(), **model_spec(model, nano)}, path)
    with pytest.raises(CheckpointError) as err:
        torch.hub.load(str(REPO_ROOT), "deit_sat_tiny_patch16_224", source="local", checkpoint=str(path))
    assert str(err.value) == (f"checkpoint {path} does not fit the entry point deit_sat_tiny_patch16_224: it records "
                              f"{nano} (embed dim 96, depth 6); load it with torch.hub's entry point {nano}")
    with pytest.raises(CheckpointError) as err:
        torch.hub.load(str(REPO_ROOT), nano, source="local", checkpoint=str(path), num_classes=5)
    assert str(err.value) == f"checkpoint {path} has 3 classes, not num_classes=5; leave out num_classes="
    with pytest.raises(ConfigError) as err:  # named as hub callers pass it (it said --pretrained false)
        torch.hub.load(str(REPO_ROOT), nano, source="local", pretrained=True)
    assert str(err.value) == (f"{nano} has no DeiT weights to start from: pretrained=False (random initialisation) "
                              "or pretrained='PATH' (a weights file)")
    with pytest.raises(ConfigError, match=r"pretrained=True and checkpoint= both given"):  # pretrained was ignored
        torch.hub.load(str(REPO_ROOT), nano, source="local", pretrained=True, checkpoint=str(path))
    # pretrained=None means no weights, as without checkpoint=: not refused (and a ConfigError, as the others)
    assert torch.hub.load(str(REPO_ROOT), nano, source="local", pretrained=None, checkpoint=str(path)).num_classes == 3
    with pytest.raises(ConfigError) as err:  # a TypeError from inside nn.Conv2d before
        torch.hub.load(str(REPO_ROOT), nano, source="local", num_classes="3")
    assert str(err.value) == "num_classes='3': the number of classes must be a positive integer"


def test_hub_official_checkpoint_of_unregistered_width_says_which_options(tmp_path):
    # the entry point alone builds DeiT-Tiny's width (192): the one line says to pass the options, not "153 keys"
    with pytest.raises(CheckpointError) as err:
        torch.hub.load(str(REPO_ROOT), OFFICIAL_ARCH, source="local", checkpoint=str(OFFICIAL_CKPT))
    assert str(err.value) == (f"checkpoint {OFFICIAL_CKPT}: embed dim 48 and depth 12 fit no registered SAT "
                              f"architecture, not the entry point {OFFICIAL_ARCH} (embed dim 192, depth 12); pass "
                              "the model's options (embed_dim=..., depth=..., num_heads=...)")


def test_hub_refuses_a_foreign_module_of_the_repos_package_names(tmp_path, monkeypatch):
    # a researcher's own `utils` package imported first: one line naming it, not "No module named utils.checkpoint"
    import types
    foreign = types.ModuleType("DataLoader")
    foreign.__file__ = str(tmp_path / "DataLoader" / "__init__.py")
    monkeypatch.setitem(__import__("sys").modules, "DataLoader", foreign)
    with pytest.raises(ImportError, match=r"a module named 'DataLoader' is already imported from .*tmp.*not from"):
        torch.hub.load(str(REPO_ROOT), "deit_sat_nano_patch16_224", source="local", num_classes=3)


@pytest.mark.parametrize("options", [{"num_spatial_blocks": 1}, {"embed_dim": 48, "num_heads": 2}])
def test_checkpoint_saved_as_documented_rebuilds_the_model_built(tmp_path, options):
    # docs/evaluation.md: save_checkpoint(dict(model_spec(model, arch), model=...)) then rebuild without flags
    nano = "deit_sat_nano_patch16_224"
    torch.manual_seed(0)
    model = build_model(nano, num_classes=3, img_size=64, **options).eval()
    path = tmp_path / "sat.pth"
    save_checkpoint(dict(model_spec(model, nano), model=model.state_dict()), path)
    rebuilt = torch.hub.load(str(REPO_ROOT), nano, source="local", checkpoint=str(path)).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected, got = model(images), rebuilt(images)
    assert rebuilt.num_spatial_blocks == model.num_spatial_blocks
    assert rebuilt.blocks[0].attn.num_heads == model.blocks[0].attn.num_heads
    torch.testing.assert_close(got[0], expected[0], atol=0, rtol=0)
    torch.testing.assert_close(got[1], expected[1], atol=0, rtol=0)


def test_hub_checkpoint_of_a_plain_deit_says_it_is_pretrained_weights(tmp_path):
    # a timm DeiT file given as checkpoint=: one line saying what it is, not "has 1000 classes, not num_classes=5;
    # leave out num_classes=" (then "3 keys differ") or "load it with the entry point deit_sat_tiny" (the same)
    import timm
    path = tmp_path / "deit_tiny.pth"
    torch.save(timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=7).state_dict(), path)
    for entry_point, options in (("deit_sat_tiny_patch16_224", {"num_classes": 5}),
                                 ("deit_sat_small_patch16_224", {})):
        with pytest.raises(CheckpointError) as err:
            torch.hub.load(str(REPO_ROOT), entry_point, source="local", checkpoint=str(path), **options)
        assert str(err.value) == (f"checkpoint {path} holds a plain ViT / DeiT's weights (a linear head, no spatial "
                                  "token loc_token), not SAT's; to start SAT from them: pretrained='PATH'")


def test_hub_model_of_a_checkpoint_carries_its_class_names_where_timm_keeps_them(tmp_path):
    # torch.hub returns the model alone: the class names of a trained checkpoint were out of reach without torch.load
    nano = "deit_sat_nano_patch16_224"
    path = tmp_path / "best.pth"
    model = build_model(nano, num_classes=3)
    save_checkpoint({"model": model.state_dict(), **model_spec(model, nano, ["Albatross", "Gull", "Tern"])}, path)
    loaded = torch.hub.load(str(REPO_ROOT), nano, source="local", checkpoint=str(path))
    assert loaded.pretrained_cfg["label_names"] == ("Albatross", "Gull", "Tern")
    assert loaded.pretrained_cfg["num_classes"] == 3 and loaded.pretrained_cfg["input_size"] == (3, 224, 224)
    assert build_model(nano, num_classes=3).pretrained_cfg.get("label_names") is None  # a new model has none


@pytest.mark.parametrize("img_size, resize_size", [(224, None), (320, None), (448, None), (64, 73), (128, 144)])
def test_timm_data_config_of_a_checkpoints_model_gives_the_official_test_view(tmp_path, img_size, resize_size):
    # timm's data config of a loaded model said DeiT's 224 px, bicubic, shorter-side resize, whatever the checkpoint
    nano = "deit_sat_nano_patch16_224"
    path = tmp_path / "best.pth"
    model = build_model(nano, num_classes=3, img_size=img_size)
    save_checkpoint({"model": model.state_dict(), **model_spec(model, nano), "config": {"resize_size": resize_size}},
                    path)
    loaded = torch.hub.load(str(REPO_ROOT), nano, source="local", checkpoint=str(path))
    config = timm.data.resolve_data_config({}, model=loaded)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 410, 3), dtype=np.uint8))
    official = centre_transform(img_size, resize_size or default_resize_size(img_size))  # Resize((R, R)), CenterCrop
    assert torch.equal(timm.data.create_transform(**config)(image), official(image))


def test_timm_data_config_of_a_non_square_checkpoints_model_and_timms_alias(tmp_path):
    # a (height, width) model's data config said DeiT's 224 x 224; timm's alias default_cfg kept DeiT's cfg
    nano = "deit_sat_nano_patch16_224"
    path = tmp_path / "best.pth"
    model = build_model(nano, num_classes=3, img_size=(64, 128))
    save_checkpoint({"model": model.state_dict(), **model_spec(model, nano, ["a", "b", "c"])}, path)
    loaded = torch.hub.load(str(REPO_ROOT), nano, source="local", checkpoint=str(path))
    assert timm.data.resolve_data_config({}, model=loaded)["input_size"] == (3, 64, 128)
    assert loaded.default_cfg is loaded.pretrained_cfg and loaded.default_cfg["label_names"] == ("a", "b", "c")


def test_hub_checkpoint_with_another_img_size_names_the_checkpoints_size(tmp_path):
    nano = "deit_sat_nano_patch16_224"
    path = tmp_path / "nano.pth"
    model = build_model(nano, num_classes=3, img_size=64)
    save_checkpoint({"model": model.state_dict(), **model_spec(model, nano)}, path)
    with pytest.raises(CheckpointError) as err:  # was: "does not fit the model (1 keys differ, first: pos_embed ..."
        torch.hub.load(str(REPO_ROOT), nano, source="local", checkpoint=str(path), img_size=224)
    assert str(err.value) == f"checkpoint {path} takes 64 x 64 inputs, not img_size=224; leave out img_size="
    for same in (64, (64, 64)):
        assert torch.hub.load(str(REPO_ROOT), nano, source="local", checkpoint=str(path),
                              img_size=same).patch_embed.img_size == (64, 64)


def test_hub_checkpoint_with_another_num_spatial_blocks_is_refused(tmp_path):
    # no tensor shape tells the spatial-aware blocks apart: num_spatial_blocks=3 silently made block 4 spatial-aware
    nano = "deit_sat_nano_patch16_224"
    path = tmp_path / "nano.pth"
    model = build_model(nano, num_classes=3, img_size=64, num_spatial_blocks=2)
    save_checkpoint({"model": model.state_dict(), **model_spec(model, nano)}, path)
    with pytest.raises(CheckpointError) as err:
        torch.hub.load(str(REPO_ROOT), nano, source="local", checkpoint=str(path), num_spatial_blocks=3)
    assert str(err.value) == (f"checkpoint {path} was trained with num_spatial_blocks=2, not num_spatial_blocks=3; "
                              "leave out num_spatial_blocks=")
    assert torch.hub.load(str(REPO_ROOT), nano, source="local", checkpoint=str(path),
                          num_spatial_blocks=2).spatial_layers == [5, 6]


def test_hub_img_size_not_a_multiple_of_the_patch_size_is_refused():
    # img_size=100 built a model whose patch embedding drops 4 pixels: a 6 x 6 map over 96 of the 100 pixels
    for size in (100, (128, 100)):
        with pytest.raises(ConfigError) as err:
            torch.hub.load(str(REPO_ROOT), "deit_sat_nano_patch16_224", source="local", num_classes=2, img_size=size)
        assert str(err.value) == (f"img_size={size!r}: the input size must be a positive integer multiple of the "
                                  "patch size 16 (the localization map covers whole patches)")
    assert torch.hub.load(str(REPO_ROOT), "deit_sat_nano_patch16_224", source="local", num_classes=2,
                          img_size=(64, 96)).patch_embed.img_size == (64, 96)


def test_hub_checkpoint_of_a_non_square_or_other_patch_size_model_loads_with_its_img_size(tmp_path):
    # img_size= is compared by patch grid, not as a square of 16-pixel patches: a (64, 96) model's checkpoint
    # (4 x 6 patches) was refused as "takes 80 x 80 inputs", and a patch_size=8 one as "takes 128 x 128 inputs"
    nano = "deit_sat_nano_patch16_224"
    for name, options in (("wide.pth", {"img_size": (64, 96)}), ("p8.pth", {"img_size": 64, "patch_size": 8})):
        model = build_model(nano, num_classes=3, **options)
        save_checkpoint({"model": model.state_dict(), **model_spec(model, nano)}, tmp_path / name)
        loaded = torch.hub.load(str(REPO_ROOT), nano, source="local", checkpoint=str(tmp_path / name), **options)
        assert tuple(loaded.patch_embed.img_size) == tuple(model.patch_embed.img_size)
        torch.testing.assert_close(loaded.pos_embed, model.pos_embed, atol=0, rtol=0)
    with pytest.raises(CheckpointError) as err:
        torch.hub.load(str(REPO_ROOT), nano, source="local", checkpoint=str(tmp_path / "wide.pth"), img_size=(96, 96))
    assert str(err.value) == (f"checkpoint {tmp_path / 'wide.pth'} takes inputs of 24 patches of 16 pixels (not a "
                              "square), not img_size=(96, 96); give img_size=(height, width) as built")
    with pytest.raises(CheckpointError) as err:
        torch.hub.load(str(REPO_ROOT), nano, source="local", checkpoint=str(tmp_path / "p8.pth"), img_size=96,
                       patch_size=8)
    assert str(err.value) == (f"checkpoint {tmp_path / 'p8.pth'} takes 64 x 64 inputs, not img_size=96; leave out "
                              "img_size=")
