"""DeiT / DeiT III: timm's layout, the feature contract, stochastic depth, foreign weight files.

Expected layouts come from the spec copy ``tests/data/golden_public.json`` (timm v1.0.28's
``state_dict()``; numeric parity is in ``test_parity.py``). The forward is checked against a
functional re-implementation written here from PARITY.md section 10.4 with explicit softmax
attention. Foreign files are made the way their producers make them: Facebook's
``{'model': ...}`` with ``gamma_1``/``gamma_2`` in its module order (facebookresearch/deit
``models_v2.py``, ``main.py``), and mmcls's by the string rules of mmpretrain's
``tools/model_converters/deit3_to_mmpretrain.py`` applied to Facebook's dict, bare (as that
script saves it) and nested under ``'state_dict'`` with ``'meta'`` (as mmcls's runner saves it).
Shape probes use small widths and depths; images stay 224 px (the patch grid is fixed).
"""
from __future__ import annotations

import functools
import io
import json
import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F

import models
from train_utils import DATA_DIR
from vit_fixtures import facebook_state_dict, mmcls_state_dict
from models import create_model, model_names
from models.vit import ARCHS, DropPath, VisionTransformer
from models.vit_layouts import detect_layout, to_timm_state_dict

pytestmark = pytest.mark.usefixtures("one_thread")

GOLDEN = json.loads((DATA_DIR / "golden_public.json").read_text())["models"]
# PARITY.md section 10.4: entries and parameters of timm's models with 1000 classes.
SIZES = {"deit_tiny_patch16_224": (152, 5_717_416), "deit_small_patch16_224": (152, 22_050_664),
         "deit3_small_patch16_224": (176, 22_059_496)}
SMALL = {"deit": dict(embed_dim=48, num_heads=3, num_classes=10, depth=3),
         "deit3": dict(embed_dim=48, num_heads=3, num_classes=10, depth=3, no_embed_class=True,
                       init_values=1e-6)}


def filled(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """``model`` with every entry random and O(1)-scaled, LayerScales far from their 1e-6."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.dim() >= 2:
                t.copy_(torch.randn(t.shape, generator=g) / math.sqrt(t[0].numel()))
            elif name.endswith(("weight", "gamma")):
                t.copy_(1 + 0.1 * torch.randn(t.shape, generator=g))
            else:
                t.copy_(0.1 * torch.randn(t.shape, generator=g))
    return model.eval()


@functools.lru_cache(maxsize=None)
def small(kind: str, seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    return filled(VisionTransformer(**SMALL[kind]), seed)


def images(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


def reference_forward(sd: dict, x: torch.Tensor, heads: int, no_embed_class: bool):
    """(features, logits) from PARITY.md 10.4, written with an explicit softmax attention."""
    b, d = x.shape[0], sd["cls_token"].shape[-1]
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=16)
    t = t.flatten(2).transpose(1, 2)
    cls = sd["cls_token"].expand(b, 1, d)
    t = torch.cat([cls, t + sd["pos_embed"]], 1) if no_embed_class else torch.cat([cls, t], 1) + sd["pos_embed"]
    ln = lambda v, k: F.layer_norm(v, (d,), sd[k + ".weight"], sd[k + ".bias"], eps=1e-6)  # noqa: E731
    lin = lambda v, k: F.linear(v, sd[k + ".weight"], sd[k + ".bias"])  # noqa: E731
    feats, depth = [], 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        p = f"blocks.{i}."
        q, k, v = lin(ln(t, p + "norm1"), p + "attn.qkv").view(b, -1, 3, heads, d // heads).unbind(2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        att = ((q @ k.transpose(-1, -2)) / math.sqrt(d // heads)).softmax(-1) @ v
        a = lin(att.transpose(1, 2).reshape(b, -1, d), p + "attn.proj")
        t = t + a * sd.get(p + "ls1.gamma", 1.0)
        m = lin(F.gelu(lin(ln(t, p + "norm2"), p + "mlp.fc1")), p + "mlp.fc2")
        t = t + m * sd.get(p + "ls2.gamma", 1.0)
        feats.append(t[:, 1:])
    t = ln(t, "norm")
    return feats[:2] + [t[:, 1:], t[:, 0]], lin(t[:, 0], "head")


# ------------------------------------------------------------------ registry and layout
def test_registry_round_trip():
    assert set(ARCHS) <= set(model_names(input_size=224))
    for name in ARCHS:
        assert models.input_size(name) == 224
        model = models.model_dict[name](num_classes=1000, drop_path_rate=0.1)
        assert isinstance(model, VisionTransformer) and model.head.out_features == 1000
    assert create_model("deit_tiny_patch16_224", 7).head.out_features == 7


@pytest.mark.parametrize("name", ARCHS)
def test_state_dict_is_timms(name):
    model = models.model_dict[name](num_classes=1000)
    got = [[k, list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in model.state_dict().items()]
    assert got == GOLDEN[name]["state_dict"]
    assert (len(got), sum(p.numel() for p in model.parameters())) == SIZES[name]


def test_initialisation_is_timms():
    model = models.model_dict["deit3_small_patch16_224"](num_classes=1000)
    assert torch.equal(model.blocks[5].ls2.gamma, torch.full((384,), 1e-6))
    assert model.cls_token.abs().max() < 1e-4 and 0.015 < model.pos_embed.std() < 0.025
    w = model.blocks[0].mlp.fc1.weight
    assert 0.018 < w.std() < 0.022 and w.abs().max() <= 2.0 and not model.head.bias.any()


# ------------------------------------------------------------------ forward contract
@pytest.mark.parametrize("kind", ["deit", "deit3"])
def test_forward_matches_functional_reference(kind):
    model, x = small(kind), images()
    with torch.no_grad():
        logits = model(x)
        feats, logits_f = model(x, is_feat=True)
    ref_feats, ref_logits = reference_forward(model.state_dict(), x, 3, kind == "deit3")
    assert logits.shape == (2, 10) and torch.equal(logits, logits_f)
    assert [tuple(f.shape) for f in feats] == [(2, 196, 48)] * 3 + [(2, 48)]
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    for got, want in zip(feats, ref_feats):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.head(feats[-1]), logits)


def test_full_size_feature_shapes():
    model = create_model("deit_tiny_patch16_224", 1000).eval()
    with torch.no_grad():
        feats, logits = model(images(1), is_feat=True)
    assert [tuple(f.shape) for f in feats] == [(1, 196, 192)] * 3 + [(1, 192)] and logits.shape == (1, 1000)
    assert models.feature_shapes(model, 224)[-1] == (2, 192)


def test_other_image_sizes_are_a_value_error():
    with pytest.raises(ValueError, match="224x224"):
        small("deit")(torch.zeros(1, 3, 32, 32))


# ------------------------------------------------------------------ stochastic depth
def test_drop_path_is_per_sample_and_train_only():
    x = torch.ones(64, 5, 3)
    layer = DropPath(0.25).train()
    y = layer(x)
    per_sample = y.flatten(1)
    assert ((per_sample == 0).all(1) | (per_sample == 1 / 0.75).all(1)).all()
    assert 0 < (per_sample[:, 0] == 0).sum() < 64
    assert layer.eval()(x) is x


def test_drop_path_rates_grow_linearly_and_only_act_in_training():
    model = VisionTransformer(**SMALL["deit3"], drop_path_rate=0.3)
    assert [blk.drop_path1.p for blk in model.blocks] == pytest.approx([0.0, 0.15, 0.3])
    model.load_state_dict(small("deit3").state_dict())
    x = images(2)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), small("deit3")(x))
        model.train()
        torch.manual_seed(3)
        a = model(x)
        torch.manual_seed(4)
        b = model(x)
    assert not torch.equal(a, b)


def test_drop_path_rate_out_of_range():
    with pytest.raises(ValueError, match="drop_path_rate"):
        VisionTransformer(**SMALL["deit"], drop_path_rate=1.0)


# ------------------------------------------------------------------ foreign weight files
def saved_and_loaded(obj) -> dict:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, map_location="cpu", weights_only=True)


def producer_files(model: VisionTransformer) -> dict[str, object]:
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    fb = facebook_state_dict(sd)
    mm = mmcls_state_dict(fb)
    return {
        "timm": sd,
        "timm_train": {"epoch": 9, "arch": "deit3_small_patch16_224", "state_dict": sd},
        "facebook": {"model": fb, "optimizer": {"state": {}, "param_groups": []}, "epoch": 299},
        "mmcls": {"meta": {"mmcls_version": "0.24.0", "CLASSES": ["tench", "goldfish"]}, "state_dict": mm},
        "mmcls_converted": mm,
    }


@pytest.mark.parametrize("kind", ["deit", "deit3"])
@pytest.mark.parametrize("producer", ["timm", "timm_train", "facebook", "mmcls", "mmcls_converted"])
def test_foreign_files_load_strictly_with_the_same_outputs(kind, producer):
    source = small(kind)
    obj = saved_and_loaded(producer_files(source)[producer])
    state = to_timm_state_dict(obj)
    layout = producer.split("_")[0]
    if (kind, layout) == ("deit", "facebook"):
        layout = "timm"   # Facebook's DeiT (not III) was trained with timm's own module names
    assert detect_layout(obj.get("state_dict", obj.get("model", obj))) == layout
    target = VisionTransformer(**SMALL[kind]).eval()
    target.load_state_dict(state, strict=True)
    x = images(1)
    with torch.no_grad():
        assert torch.equal(target(x), source(x))


def test_mmcls_deit3_small_teacher_loads_into_the_registered_model():
    """The table's teacher: mmcls's converted DeiT III-S file into deit3_small_patch16_224."""
    torch.manual_seed(0)
    source = filled(create_model("deit3_small_patch16_224", 1000), seed=5)
    mm = mmcls_state_dict(facebook_state_dict(source.state_dict()))
    assert mm["backbone.pos_embed"].shape == (1, 196, 384) and "backbone.layers.11.ffn.gamma2.weight" in mm
    target = create_model("deit3_small_patch16_224", 1000).eval()
    target.load_state_dict(to_timm_state_dict({"meta": {}, "state_dict": mm}), strict=True)
    x = images(1)
    with torch.no_grad():
        assert torch.equal(target(x), source(x))


def one_line_value_error(obj, match: str) -> None:
    with pytest.raises(ValueError, match=match) as err:
        to_timm_state_dict(obj)
    assert "\n" not in str(err.value)


def test_wrong_files_are_one_line_value_errors():
    mm = mmcls_state_dict(facebook_state_dict(small("deit3").state_dict()))
    one_line_value_error(create_model("resnet8", 100).state_dict(), "not a DeiT checkpoint: no cls_token")
    one_line_value_error({"model": create_model("resnet8", 100).state_dict()}, "not a DeiT")
    one_line_value_error({"epoch": 3, "best_acc": 1.0}, "holds no state dict")
    one_line_value_error([1, 2], "not a dict")
    incomplete = OrderedDict((k, v) for k, v in mm.items() if k != "backbone.ln1.weight")
    one_line_value_error({"state_dict": incomplete}, "mmcls checkpoint lacks 1 DeiT weights .*'norm.weight'")
    no_scale = OrderedDict((k, v) for k, v in mm.items() if k != "backbone.layers.2.attn.gamma1.weight")
    one_line_value_error(no_scale, "lacks 1 DeiT weights .*'blocks.2.ls1.gamma'")


def test_unknown_and_distilled_keys_are_refused_not_dropped():
    """An extra tensor means another network: loading around it would change the teacher."""
    mm = mmcls_state_dict(facebook_state_dict(small("deit").state_dict()))
    extra = {**mm, "data_preprocessor.mean": torch.zeros(3, 1, 1)}
    one_line_value_error({"state_dict": extra}, "mmcls checkpoint has 1 keys outside .*data_preprocessor.mean")
    dist = {**mm, "backbone.dist_token": torch.zeros(1, 1, 48)}
    one_line_value_error({"state_dict": dist}, "backbone.dist_token.*distilled DeiT")
    fb = {**small("deit").state_dict(), "head_dist.weight": torch.zeros(10, 48)}
    one_line_value_error({"model": fb}, "head_dist.weight.*distilled")


def test_shape_mismatch_is_left_to_the_strict_load():
    state = to_timm_state_dict(small("deit3").state_dict())
    with pytest.raises(RuntimeError, match="size mismatch"):
        VisionTransformer(**{**SMALL["deit3"], "embed_dim": 96}).load_state_dict(state, strict=True)
