"""SAT: DeiT vision transformer with a spatial-aware token (Wu et al., ICCV 2023).

The token sequence is ``[cls, patch_1 .. patch_N, spatial]``. In every spatial-aware block the spatial
token's attention logits over all keys, averaged over heads and squashed by a sigmoid, give a foreground
probability ``P`` per token; the attention weights of every query to key ``k`` are multiplied by
``P[k]``. This equals ``softmax(A) @ (P * V)``, so the fused path keeps scaled-dot-product attention
kernels. The localization map is the mean of ``P`` over the spatial-aware blocks at the patch positions;
classification is a 3x3 conv over the patch grid followed by global average pooling.
"""
import logging
import math
import os
import re
from functools import partial
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from timm.layers import PatchEmbed, resample_abs_pos_embed, trunc_normal_
from timm.layers.attention import Attention
from timm.models import build_model_with_cfg, register_model
from timm.models._registry import generate_default_cfgs
from timm.models.vision_transformer import Block

from utils.checkpoint import clean_state_dict, read_checkpoint
from utils.errors import CheckpointError, ConfigError

__all__ = ["SATVisionTransformer", "SpatialAwareAttention", "SATBlock", "checkpoint_filter_fn"]

_logger = logging.getLogger(__name__)

ATTENTION_IMPLS = ("fused", "naive")


def cpu_bf16_training(x: torch.Tensor) -> bool:
    """Whether ``x`` is on a CPU, under bf16 autocast, with gradients recorded."""
    return (x.device.type == "cpu" and torch.is_grad_enabled() and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16)


class SpatialAwareAttention(Attention):
    """Multi-head self-attention that can gate keys by the spatial token's foreground probability.

    ``impl='fused'`` folds the probability into the values and calls
    ``F.scaled_dot_product_attention`` (training under bf16 autocast on a CPU: the same product with
    explicit matrices, whose bf16 backward is faster there than that kernel's); ``impl='naive'`` builds
    the explicit attention matrix and multiplies it after the softmax, as the official code does
    (reference for tests and benchmarks).
    """

    def __init__(self, *args, impl: str = "fused", **kwargs):
        super().__init__(*args, **kwargs)
        self.impl = impl

    def forward(self, x: torch.Tensor, spatial_aware: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        prob = None
        if spatial_aware:
            # logits of the spatial (last) query over all keys, averaged over heads: (B, N)
            spatial_logits = (q[:, :, -1:, :] * self.scale) @ k.transpose(-2, -1)
            prob = spatial_logits.mean(dim=1).squeeze(1).sigmoid()
        drop_p = self.attn_drop.p if self.training else 0.0
        if self.impl == "fused":
            if prob is not None:
                v = v * prob[:, None, :, None].to(v.dtype)
            if cpu_bf16_training(x):
                x = self.attn_drop(((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)) @ v
            else:
                x = F.scaled_dot_product_attention(q, k, v, dropout_p=drop_p)
        else:
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            attn = self.attn_drop(attn)
            if prob is not None:
                attn = attn * prob[:, None, None, :].to(attn.dtype)
            x = attn @ v
        x = self.proj(x.transpose(1, 2).reshape(B, N, self.attn_dim))
        return self.proj_drop(x), prob


class SATBlock(Block):
    """timm pre-norm transformer block whose attention also returns the spatial probability."""

    def __init__(self, dim: int, num_heads: int, spatial_aware: bool = False, **kwargs):
        super().__init__(dim, num_heads, attn_layer=SpatialAwareAttention, **kwargs)
        self.spatial_aware = spatial_aware

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        y, prob = self.attn(self.norm1(x), spatial_aware=self.spatial_aware)
        x = x + self.drop_path1(self.ls1(y))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, prob


class SATVisionTransformer(nn.Module):
    """DeiT backbone + spatial-aware token + conv classification head.

    ``forward(images)`` returns ``(logits, maps)``: logits (B, num_classes) and the fused localization
    map (B, grid_h, grid_w) of raw sigmoid probabilities. ``forward(images, return_block_maps=True)``
    adds the per-block maps (B, num_spatial_blocks, grid_h, grid_w).
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        num_spatial_blocks: int = 3,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        attn_impl: str = "fused",
    ):
        super().__init__()
        if not 1 <= num_spatial_blocks <= depth:
            raise ConfigError(f"num_spatial_blocks must be in [1, {depth}] (the model's depth), got "
                              f"{num_spatial_blocks}")
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        self.num_spatial_blocks = num_spatial_blocks
        norm_layer = partial(nn.LayerNorm, eps=1e-6)

        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        self.grid_size = self.patch_embed.grid_size
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # the paper's spatial token and its own position embedding (named as in the official checkpoints)
        self.loc_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.loc_embed = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)

        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        first_spatial = depth - num_spatial_blocks
        self.blocks = nn.ModuleList([
            SATBlock(
                embed_dim, num_heads, spatial_aware=i >= first_spatial,
                mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=drop_rate, attn_drop=attn_drop_rate,
                drop_path=dpr[i], norm_layer=norm_layer,
            )
            for i in range(depth)
        ])
        self.norm = norm_layer(embed_dim)
        self.head = nn.Conv2d(embed_dim, num_classes, kernel_size=3, padding=1)
        self.set_attention_impl(attn_impl)
        self._init_weights()

    def _init_weights(self):
        for p in (self.cls_token, self.loc_token, self.pos_embed, self.loc_embed):
            trunc_normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def set_attention_impl(self, impl: str):
        """Switch every block between ``'fused'`` (SDPA, mask folded into V) and ``'naive'``."""
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
        for block in self.blocks:
            block.attn.impl = impl

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"cls_token", "loc_token", "pos_embed", "loc_embed"}

    @property
    def spatial_layers(self) -> List[int]:
        """The layer numbers (1-based) of the spatial-aware blocks, e.g. [10, 11, 12] for DeiT-S: the names of
        the per-block maps in overlays and predictions."""
        return [k + 1 for k, block in enumerate(self.blocks) if block.spatial_aware]

    def spatial_parameters(self) -> List[nn.Parameter]:
        """Parameters of the spatial token, its embedding, the spatial-aware blocks, the final norm and the head."""
        params = [self.loc_token, self.loc_embed]
        for block in self.blocks:
            if block.spatial_aware:
                params += list(block.parameters())
        return params + list(self.norm.parameters()) + list(self.head.parameters())

    def forward(self, x: torch.Tensor, return_block_maps: bool = False):
        B = x.shape[0]
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1) + self.pos_embed
        x = torch.cat([x, (self.loc_token + self.loc_embed).expand(B, -1, -1)], dim=1)  # spatial token, last
        x = self.pos_drop(x)
        probs = []
        for block in self.blocks:
            x, prob = block(x)
            if prob is not None:  # a spatial-aware block: its foreground probability of the patch tokens
                probs.append(prob[:, 1:-1])  # (without the cls and the spatial token)
        x = self.norm(x)
        gh, gw = self.grid_size
        patches = x[:, 1:-1].transpose(1, 2).reshape(B, self.embed_dim, gh, gw)
        logits = self.head(patches).mean(dim=(2, 3))
        block_maps = torch.stack(probs, dim=1).reshape(B, len(probs), gh, gw)
        maps = block_maps.mean(dim=1)
        if return_block_maps:
            return logits, maps, block_maps
        return logits, maps


# what a ViT computes after its blocks' tokens are pooled, which SAT replaces by its conv head: the classifier,
# the norm of the pooled features (timm's fc_norm) and the representation layer of the original in21k ViTs
CLASSIFIER_KEYS = ("head.", "fc_norm.", "pre_logits.")


def checkpoint_filter_fn(state_dict: dict, model: SATVisionTransformer) -> dict:
    """Adapt a DeiT / timm ViT (or SAT) state dict to ``model``.

    Unwraps a ``'model'`` key, strips ``module.`` prefixes, drops the classifier side (``CLASSIFIER_KEYS``), a
    distilled DeiT's distillation token and head and the official smoothing kernel (``weight``) and resamples
    ``pos_embed`` to the model's grid; any other tensor the model has no place for (layer scale), then tensors
    of other shapes or a deeper network's blocks, are a CheckpointError. The keys of ``model`` that stay
    uninitialised are logged and stored in ``model.newly_initialized_keys``.
    """
    if "model" in state_dict and isinstance(state_dict["model"], dict):
        state_dict = state_dict["model"]
    own = model.state_dict()
    state_dict = dict(clean_state_dict(state_dict))
    if "dist_token" in state_dict:  # a distilled DeiT: its distillation token, its position and its head go
        state_dict = {key: value for key, value in state_dict.items()
                      if key != "dist_token" and not key.startswith("head_dist.")}
        if "pos_embed" in state_dict:
            state_dict["pos_embed"] = torch.cat([state_dict["pos_embed"][:, :1], state_dict["pos_embed"][:, 2:]], 1)
        _logger.info("pretrained weights: a distilled DeiT; its distillation token and head are left out")
    out, mismatched = {}, []
    for key, value in state_dict.items():
        if key not in own or key.startswith(CLASSIFIER_KEYS):
            continue
        if key == "pos_embed" and value.shape != own[key].shape and value.shape[-1] == own[key].shape[-1] and \
                math.isqrt(value.shape[1] - 1) ** 2 == value.shape[1] - 1:
            # (a class-token position, a square grid and the model's width; else said below as the file holds it)
            side = math.isqrt(value.shape[1] - 1)
            value = resample_abs_pos_embed(value, new_size=model.grid_size, num_prefix_tokens=1)
            _logger.info("pretrained weights: position embeddings (pos_embed) resampled bicubically from their "
                         "%d x %d patch grid to the model's %d x %d (img_size %s)", side, side, *model.grid_size,
                         " x ".join(str(n) for n in dict.fromkeys(model.patch_embed.img_size)))
        if value.shape != own[key].shape:
            mismatched.append(f"{key}: pretrained {tuple(value.shape)} vs model {tuple(own[key].shape)}")
        out[key] = value
    if not any(key.startswith("blocks.") for key in out):  # e.g. a CNN's weights: nothing would be loaded
        theirs = ", ".join(list(state_dict)[:3])
        raise CheckpointError(f"pretrained weights hold no tensor of the model's transformer blocks (expected a "
                              f"DeiT / timm ViT or SAT state dict: blocks.0.attn.qkv.weight, ...; got {theirs}, ...)")
    unused = [key for key in state_dict if key not in own and not key.startswith(CLASSIFIER_KEYS) and key != "weight"]
    depth = len(model.blocks)
    block = {key: int(found.group(1)) for key in unused if (found := re.match(r"blocks\.(\d+)\.", key))}
    deeper = [block[key] + 1 for key in block if block[key] >= depth]  # a deeper network's blocks: said below
    unused = [key for key in unused if block.get(key, -1) < depth]  # as its depth, not as layer scale
    if unused:  # e.g. DeiT III's layer scale: left out, the model would compute another function than theirs
        raise CheckpointError(f"pretrained weights hold {len(unused)} tensors the model has no place for, e.g. "
                              f"{', '.join(unused[:3])} (expected a DeiT / timm ViT or SAT state dict: no layer "
                              "scale or register tokens)")
    if mismatched or deeper:
        theirs = f"; pretrained depth {max(deeper)}" if deeper else ""
        differ = f": {len(mismatched)} tensors differ, e.g. {'; '.join(mismatched[:2])}" if mismatched else ""
        patch = "patch_embed.proj.weight" in state_dict and tuple(state_dict["patch_embed.proj.weight"].shape[-2:]) \
            != tuple(own["patch_embed.proj.weight"].shape[-2:])
        hint = f"patch size {model.patch_embed.patch_size[0]}; another patch size?" if patch else "wrong DeiT size?"
        raise CheckpointError(f"pretrained weights do not fit the model (embed dim {model.embed_dim}, depth {depth}"
                              f"{theirs}; {hint}){differ}")
    model.newly_initialized_keys = sorted(k for k in own if k not in out)
    _logger.info("pretrained weights: newly initialised keys: %s", ", ".join(model.newly_initialized_keys))
    return out


def _cfg(deit_name: str = "", **kwargs) -> dict:
    return {
        "hf_hub_id": f"timm/{deit_name}.fb_in1k" if deit_name else None,
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None,
        "crop_pct": 0.875, "interpolation": "bicubic", "fixed_input_size": True,
        "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
        "first_conv": "patch_embed.proj", "classifier": "head", "license": "apache-2.0",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "deit_sat_tiny_patch16_224.fb_in1k": _cfg("deit_tiny_patch16_224"),
    "deit_sat_small_patch16_224.fb_in1k": _cfg("deit_small_patch16_224"),
    "deit_sat_base_patch16_224.fb_in1k": _cfg("deit_base_patch16_224"),
    "deit_sat_nano_patch16_224.untrained": _cfg(),
})


# The registered architectures' shapes (Model/build.py also tells them apart by these in checkpoints).
ARCH_ARGS = {
    "deit_sat_tiny_patch16_224": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "deit_sat_small_patch16_224": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "deit_sat_base_patch16_224": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "deit_sat_nano_patch16_224": dict(patch_size=16, embed_dim=96, depth=6, num_heads=3, mlp_ratio=2.0),
}


def _create_sat(variant: str, pretrained=False, **kwargs) -> SATVisionTransformer:
    """Build ``variant`` (its ARCH_ARGS, overridden by ``kwargs``) through timm's builder. ``pretrained`` is
    False, True (DeiT weights via timm) or a file path."""
    kwargs = dict(ARCH_ARGS[variant], **kwargs)
    weights = None
    if isinstance(pretrained, (str, bytes)) or hasattr(pretrained, "__fspath__"):
        # a local file: read as the checkpoints are (one-line errors for a folder, a file that is no state dict)
        pretrained_path = pretrained
        weights, pretrained = read_checkpoint(pretrained, "pretrained weights")["model"], False
    model = build_model_with_cfg(
        SATVisionTransformer, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        pretrained_strict=False,
        **kwargs,
    )
    if weights is not None:
        try:
            model.load_state_dict(checkpoint_filter_fn(weights, model), strict=False)
        except CheckpointError as err:
            raise CheckpointError(f"{os.fsdecode(pretrained_path)}: {err}") from None
    return model


@register_model
def deit_sat_tiny_patch16_224(pretrained=False, **kwargs) -> SATVisionTransformer:
    """SAT on DeiT-Tiny: dim 192, 3 heads, depth 12."""
    return _create_sat("deit_sat_tiny_patch16_224", pretrained, **kwargs)


@register_model
def deit_sat_small_patch16_224(pretrained=False, **kwargs) -> SATVisionTransformer:
    """SAT on DeiT-Small: dim 384, 6 heads, depth 12."""
    return _create_sat("deit_sat_small_patch16_224", pretrained, **kwargs)


@register_model
def deit_sat_base_patch16_224(pretrained=False, **kwargs) -> SATVisionTransformer:
    """SAT on DeiT-Base: dim 768, 12 heads, depth 12."""
    return _create_sat("deit_sat_base_patch16_224", pretrained, **kwargs)


@register_model
def deit_sat_nano_patch16_224(pretrained=False, **kwargs) -> SATVisionTransformer:
    """CPU-friendly demo size: dim 96, 3 heads, depth 6 (last 3 spatial-aware); no pretrained weights."""
    return _create_sat("deit_sat_nano_patch16_224", pretrained, **kwargs)
