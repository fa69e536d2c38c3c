"""Renames DeiT weight files in mmcls's or Facebook's layout to timm's, by explicit key tables.

Three producers write the DeiT weights this project loads (:mod:`models.vit` holds timm's layout):

- **mmcls / mmpretrain**: ``{'meta': ..., 'state_dict': {...}}`` as its runner saves it, or the
  bare dict its ``tools/model_converters/deit3_to_mmpretrain.py`` writes (open-mmlab/mmpretrain
  ``ee7f2e88``), e.g. ``deit3-small-p16_in21k-pre_3rdparty_in1k_20221009-dcd90827.pth``. Keys
  ``backbone.{cls_token, pos_embed, patch_embed.projection, layers.i.*, ln1}``, ``head.layers.head``;
  the shapes are timm's (DeiT III's ``pos_embed`` stays ``[1, 196, D]``, mmcls's ``DeiT3``
  backbone has no position for the class token either).
- **Facebook** (facebookresearch/deit ``main.py``, ``models_v2.py``): ``{'model': {...}, ...}``;
  DeiT uses timm's own names, DeiT III names its LayerScales ``blocks.i.gamma_1``/``gamma_2``.
- **timm**: a bare state dict, or nested under ``'state_dict'`` (timm's ``train.py``) or
  ``'model'`` (this project's checkpoints).

The layout is told by the keys, not by the container. Every key must match a rule of its
layout's table; anything else is a ``ValueError``, because an extra tensor means another network
(a distilled DeiT's ``dist_token`` and second head, a ``pre_logits`` layer, a ``fc_norm``), and
dropping it would load a teacher that is not the one in the file. The result is then loaded
strictly, which checks the shapes against the chosen architecture.
"""
from __future__ import annotations

import functools
import re
from types import MappingProxyType
from typing import Mapping

import torch

__all__ = ["to_timm_state_dict", "detect_layout"]

Table = tuple[tuple[str, str], ...]

# (foreign key, timm key); {i} is a block index, {p} is weight or bias.
_TIMM_RULES: Table = (
    ("cls_token", "cls_token"),
    ("pos_embed", "pos_embed"),
    ("patch_embed.proj.{p}", "patch_embed.proj.{p}"),
    ("blocks.{i}.norm1.{p}", "blocks.{i}.norm1.{p}"),
    ("blocks.{i}.attn.qkv.{p}", "blocks.{i}.attn.qkv.{p}"),
    ("blocks.{i}.attn.proj.{p}", "blocks.{i}.attn.proj.{p}"),
    ("blocks.{i}.ls1.gamma", "blocks.{i}.ls1.gamma"),
    ("blocks.{i}.norm2.{p}", "blocks.{i}.norm2.{p}"),
    ("blocks.{i}.mlp.fc1.{p}", "blocks.{i}.mlp.fc1.{p}"),
    ("blocks.{i}.mlp.fc2.{p}", "blocks.{i}.mlp.fc2.{p}"),
    ("blocks.{i}.ls2.gamma", "blocks.{i}.ls2.gamma"),
    ("norm.{p}", "norm.{p}"),
    ("head.{p}", "head.{p}"),
)

_FACEBOOK_RULES: Table = tuple(r for r in _TIMM_RULES if ".ls" not in r[0]) + (
    ("blocks.{i}.gamma_1", "blocks.{i}.ls1.gamma"),
    ("blocks.{i}.gamma_2", "blocks.{i}.ls2.gamma"),
)

_MMCLS_RULES: Table = (
    ("backbone.cls_token", "cls_token"),
    ("backbone.pos_embed", "pos_embed"),
    ("backbone.patch_embed.projection.{p}", "patch_embed.proj.{p}"),
    ("backbone.layers.{i}.ln1.{p}", "blocks.{i}.norm1.{p}"),
    ("backbone.layers.{i}.attn.qkv.{p}", "blocks.{i}.attn.qkv.{p}"),
    ("backbone.layers.{i}.attn.proj.{p}", "blocks.{i}.attn.proj.{p}"),
    ("backbone.layers.{i}.attn.gamma1.weight", "blocks.{i}.ls1.gamma"),
    ("backbone.layers.{i}.ln2.{p}", "blocks.{i}.norm2.{p}"),
    ("backbone.layers.{i}.ffn.layers.0.0.{p}", "blocks.{i}.mlp.fc1.{p}"),
    ("backbone.layers.{i}.ffn.layers.1.{p}", "blocks.{i}.mlp.fc2.{p}"),
    ("backbone.layers.{i}.ffn.gamma2.weight", "blocks.{i}.ls2.gamma"),
    ("backbone.ln1.{p}", "norm.{p}"),   # mmcls's final norm (ln2 would be its avg-pool norm)
    ("head.layers.head.{p}", "head.{p}"),
)

_TABLES: Mapping[str, Table] = MappingProxyType(
    {"timm": _TIMM_RULES, "facebook": _FACEBOOK_RULES, "mmcls": _MMCLS_RULES})

_BLOCK_KEYS = tuple(f"{m}.{p}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
                    for p in ("weight", "bias"))
_TOP_KEYS = ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
             "norm.weight", "norm.bias", "head.weight", "head.bias")


@functools.lru_cache(maxsize=None)
def _pattern(template: str) -> re.Pattern[str]:
    body = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(body)


def _rename(key: str, table: Table) -> str | None:
    """The timm name of ``key`` under ``table``, or None when no rule matches."""
    for foreign, timm in table:
        m = _pattern(foreign).fullmatch(key)
        if m:
            return timm.format(**m.groupdict())
    return None


def _state_dict_in(obj: Mapping) -> Mapping:
    """The tensor dict inside a loaded file: ``obj['state_dict']``, ``obj['model']`` or ``obj``."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"the checkpoint is a {type(obj).__name__}, not a dict")
    for nest in ("state_dict", "model"):
        inner = obj.get(nest)
        if isinstance(inner, Mapping):
            obj = inner
            break
    if not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError("the checkpoint holds no state dict (no 'state_dict' or 'model' dict of tensors)")
    return obj


def detect_layout(state: Mapping[str, torch.Tensor]) -> str:
    """``'mmcls'``, ``'facebook'`` or ``'timm'``: which producer named the keys of ``state``.

    Raises:
        ValueError: no class token under any layout's name (not a ViT state dict).
    """
    if "backbone.cls_token" in state:
        return "mmcls"
    if "cls_token" not in state:
        example = next(iter(state))
        raise ValueError(f"not a DeiT checkpoint: no cls_token or backbone.cls_token (first key {example!r})")
    if any(re.fullmatch(r"blocks\.\d+\.gamma_[12]", k) for k in state):
        return "facebook"
    return "timm"


def _check_complete(out: Mapping[str, torch.Tensor], layout: str) -> None:
    depth = 1 + max((int(k.split(".")[1]) for k in out if k.startswith("blocks.")), default=-1)
    scaled = "blocks.0.ls1.gamma" in out
    block = _BLOCK_KEYS + (("ls1.gamma", "ls2.gamma") if scaled else ())
    need = list(_TOP_KEYS) + [f"blocks.{i}.{k}" for i in range(depth) for k in block]
    missing = [k for k in need if k not in out]
    if missing or depth == 0:
        first = missing[0] if missing else "blocks.0.norm1.weight"
        raise ValueError(f"{layout} checkpoint lacks {max(len(missing), 1)} DeiT weights "
                         f"(e.g. timm's {first!r}); it is not a complete DeiT")


def to_timm_state_dict(obj: Mapping) -> dict[str, torch.Tensor]:
    """Renames a loaded DeiT / DeiT III weight file into timm's state-dict keys.

    Args:
        obj: what ``torch.load`` returned: an mmcls file (``'state_dict'`` nested or bare
            ``backbone.``/``head.`` keys), a Facebook file (``'model'`` nested) or a timm state
            dict (bare or nested).

    Returns:
        ``{timm key: tensor}`` in the file's order, tensors unchanged (not copied); load it
        with ``model.load_state_dict(..., strict=True)``, which checks the shapes.

    Raises:
        ValueError (one line): no state dict; not a ViT (no class token); a distilled DeiT
            (``dist_token``); a key no rule of the detected layout maps; a missing weight.
    """
    state = _state_dict_in(obj)
    distilled = [k for k in state if k.endswith("dist_token") or ".head_dist." in k or k.startswith("head_dist.")]
    if distilled:
        raise ValueError(f"{distilled[0]!r} marks a distilled DeiT (a second token and head); "
                         "only the plain DeiT / DeiT III architectures are registered")
    layout = detect_layout(state)
    table = _TABLES[layout]
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        name = _rename(key, table)
        if name is None:
            unknown.append(key)
        else:
            out[name] = value
    if unknown:
        raise ValueError(f"{layout} checkpoint has {len(unknown)} keys outside the DeiT layout "
                         f"(e.g. {unknown[0]!r}); it holds another network")
    _check_complete(out, layout)
    return out
