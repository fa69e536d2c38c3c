"""DeiT teacher files made the way their producers made them: Facebook's DeiT III checkpoints
(``gamma_1``/``gamma_2`` in its module order) and mmcls's conversion of them (mmpretrain's
``tools/model_converters/deit3_to_mmpretrain.py`` rules). Shared by the model, run and fetch
tests."""
from __future__ import annotations

from collections import OrderedDict


def facebook_state_dict(timm_sd: dict) -> OrderedDict:
    """Facebook's DeiT III module order: a block's own gamma_1, gamma_2 come before its children."""
    out = OrderedDict()
    for k, v in timm_sd.items():
        if ".ls" in k:
            continue
        if k.endswith("norm1.weight") and k.startswith("blocks."):
            block = k[: -len("norm1.weight")]
            for j in (1, 2):
                if f"{block}ls{j}.gamma" in timm_sd:
                    out[f"{block}gamma_{j}"] = timm_sd[f"{block}ls{j}.gamma"]
        out[k] = v
    return out


def mmcls_state_dict(fb_sd: dict) -> OrderedDict:
    """The renaming of mmpretrain's deit3_to_mmpretrain.py (``convert_deit3``), rule by rule."""
    out = OrderedDict()
    for k, v in fb_sd.items():
        if k.startswith("head"):
            out[k.replace("head.", "head.layers.head.")] = v
            continue
        new = k
        if k.startswith("patch_embed"):
            new = k.replace("proj.", "projection.")
        elif k.startswith("blocks"):
            new = k.replace("blocks.", "layers.")
            for old, rep in (("norm1", "ln1"), ("norm2", "ln2"), ("mlp.fc1", "ffn.layers.0.0"),
                             ("mlp.fc2", "ffn.layers.1"), ("gamma_1", "attn.gamma1.weight"),
                             ("gamma_2", "ffn.gamma2.weight")):
                if old in k:
                    new = new.replace(old, rep)
                    break
        elif k.startswith("norm"):
            new = k.replace("norm", "ln1")
        out["backbone." + new] = v
    return out
