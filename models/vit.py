"""DeiT vision transformers with timm's layout: deit_tiny/small_patch16_224, deit3_small_patch16_224.

Touvron et al., "Training data-efficient image transformers & distillation through attention",
ICML 2021 (DeiT), and "DeiT III: Revenge of the ViT", ECCV 2022. Module names, shapes, order,
initialisation and forward follow timm v1.0.28 (huggingface/pytorch-image-models
``8ef73809f622e0031bd7f4940265734aef8b9978``: ``timm/models/deit.py``,
``timm/models/vision_transformer.py``, ``timm/layers/{attention,mlp,layer_scale,drop}.py``), so
timm's weight files for these names load with ``load_state_dict(state_dict, strict=True)``;
mmcls's and Facebook's files are renamed first by :func:`models.vit_layouts.to_timm_state_dict`.

``forward(x, is_feat=True)`` returns the token features of cls_KD's ViT backbones (ViTKD):
the patch tokens of blocks 0 and 1 ``[B, 196, D]``, the patch tokens after the final norm
``[B, 196, D]`` and, last, the normed class token ``[B, D]`` that feeds the head.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import register_model

__all__ = ["VisionTransformer", "ARCHS"]

ARCHS = ("deit_tiny_patch16_224", "deit_small_patch16_224", "deit3_small_patch16_224")
"""The names this file registers (checkpoint loaders map foreign layouts for these)."""

_IMG_SIZE, _PATCH = 224, 16
_LN_EPS = 1e-6  # timm's ViT LayerNorm; torch's default 1e-5 changes the logits by ~1e-3


class DropPath(nn.Module):
    """Stochastic depth per sample (Huang et al., ECCV 2016), as timm's ``drop_path``.

    In training each sample's branch ``[B, ...]`` is zeroed with probability ``p`` and the kept
    ones are scaled by ``1 / (1 - p)``, so the expectation is unchanged; identity in eval.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class LayerScale(nn.Module):
    """Per-channel scale of a residual branch (DeiT III / CaiT): ``x * gamma``, ``gamma [D]``."""

    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Attention(nn.Module):
    """Multi-head self-attention with one ``qkv`` projection (bias) and an output ``proj``.

    ``[B, N, D] -> [B, N, D]``; ``scaled_dot_product_attention`` is the fused path timm takes,
    with the default scale ``head_dim ** -0.5``.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embedding width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """``fc1`` (D -> 4D), exact erf GELU, ``fc2`` (4D -> D) on ``[B, N, D]``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block ``[B, N, D] -> [B, N, D]``:
    ``x + drop_path(ls1(attn(norm1(x))))``, then ``x + drop_path(ls2(mlp(norm2(x))))``.

    ``ls1``/``ls2`` are LayerScales when ``init_values`` is given (DeiT III), else identities.
    """

    def __init__(self, dim: int, num_heads: int, init_values: float | None, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=_LN_EPS)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=_LN_EPS)
        self.mlp = Mlp(dim, 4 * dim)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class PatchEmbed(nn.Module):
    """16x16 patches by a strided convolution: ``[B, 3, 224, 224] -> [B, 196, D]``."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=_PATCH, stride=_PATCH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (_IMG_SIZE, _IMG_SIZE):
            raise ValueError(f"the DeiTs take {_IMG_SIZE}x{_IMG_SIZE} images, got {tuple(x.shape[-2:])}")
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """timm's ``VisionTransformer`` as configured by its DeiT builders (class-token pooling).

    Args:
        embed_dim: token width D (192 tiny, 384 small).
        num_heads: attention heads (3 tiny, 6 small).
        num_classes: size of the classifier output.
        depth: number of blocks.
        no_embed_class: DeiT III: ``pos_embed [1, 196, D]`` is added to the patch tokens before
            the class token is prepended; otherwise (DeiT) the class token is prepended first and
            ``pos_embed`` is ``[1, 197, D]``.
        init_values: LayerScale initial value (DeiT III: 1e-6), or None for no LayerScale.
        drop_path_rate: stochastic depth of the last block; block i gets
            ``drop_path_rate * i / (depth - 1)``.
    """

    def __init__(self, embed_dim: int, num_heads: int, num_classes: int = 1000, depth: int = 12,
                 no_embed_class: bool = False, init_values: float | None = None,
                 drop_path_rate: float = 0.0):
        super().__init__()
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        num_patches = (_IMG_SIZE // _PATCH) ** 2
        self.no_embed_class = no_embed_class
        self.patch_embed = PatchEmbed(embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + (0 if no_embed_class else 1), embed_dim))
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads, init_values, r) for r in rates])
        self.norm = nn.LayerNorm(embed_dim, eps=_LN_EPS)
        self.head = nn.Linear(embed_dim, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # timm's default ('') scheme: the conv and the norms keep torch's own initialisation
        nn.init.trunc_normal_(self.pos_embed, std=0.02, a=-2.0, b=2.0)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        """Parameter names timm exempts from weight decay (besides every bias and norm weight)."""
        return {"pos_embed", "cls_token"}

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, 224, 224]`` -> class token then patch tokens ``[B, 197, D]``."""
        x = self.patch_embed(x)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        if self.no_embed_class:
            return torch.cat([cls, x + self.pos_embed], dim=1)
        return torch.cat([cls, x], dim=1) + self.pos_embed

    def forward(self, x: torch.Tensor, is_feat: bool = False, preact: bool = False):
        """Logits ``[B, K]`` for images ``[B, 3, 224, 224]``, or ``(features, logits)``.

        With ``is_feat`` the features are the patch tokens (class token removed) after blocks
        0 and 1 ``[B, 196, D]``, those after the final norm ``[B, 196, D]``, and the normed
        class token ``[B, D]``. ``preact`` has no meaning for a ViT and is ignored.
        """
        x = self._tokens(x)
        early = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i < 2:
                early.append(x[:, 1:])
        x = self.norm(x)
        pooled = x[:, 0]
        logits = self.head(pooled)
        if not is_feat:
            return logits
        return early + [x[:, 1:], pooled], logits


@register_model("deit_tiny_patch16_224", input_size=_IMG_SIZE)
def deit_tiny_patch16_224(num_classes: int = 1000, drop_path_rate: float = 0.0) -> VisionTransformer:
    """DeiT-Ti: D 192, 3 heads, 12 blocks (5.7 M parameters with 1000 classes)."""
    return VisionTransformer(192, 3, num_classes, drop_path_rate=drop_path_rate)


@register_model("deit_small_patch16_224", input_size=_IMG_SIZE)
def deit_small_patch16_224(num_classes: int = 1000, drop_path_rate: float = 0.0) -> VisionTransformer:
    """DeiT-S: D 384, 6 heads, 12 blocks (22.1 M parameters with 1000 classes)."""
    return VisionTransformer(384, 6, num_classes, drop_path_rate=drop_path_rate)


@register_model("deit3_small_patch16_224", input_size=_IMG_SIZE)
def deit3_small_patch16_224(num_classes: int = 1000, drop_path_rate: float = 0.0) -> VisionTransformer:
    """DeiT III-S: DeiT-S with LayerScale (init 1e-6, timm's) and no position for the class token."""
    return VisionTransformer(384, 6, num_classes, no_embed_class=True, init_values=1e-6,
                             drop_path_rate=drop_path_rate)
