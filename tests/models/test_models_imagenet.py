"""ImageNet networks: torchvision's / mdistiller's layouts, the feature contract, the registry.

Expected layouts come from ``tests/data/imagenet_layouts.json``, written from torchvision's
``torchvision/models/resnet.py`` and mdistiller's ``mdistiller/models/imagenet/mobilenetv1.py``
(see its ``_source``). Forwards are checked against functional re-implementations written here
from the same sources. Most probes run at 64 px (only structure matters there); two run at 224.
"""
from __future__ import annotations

import functools
import io
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import models
from errors import UserError
from helper.checkpoint import load_weights
from train_utils import DATA_DIR
from imagenet_fixtures import TORCHVISION_FILES, published_state_dict
from models import create_model, feature_shapes, model_names

DATA = DATA_DIR
LAYOUTS = json.loads((DATA / "imagenet_layouts.json").read_text())["models"]
GOLDEN = json.loads((DATA / "golden_public.json").read_text())["models"]
CIFAR = sorted(n for n, rec in GOLDEN.items() if rec.get("num_classes", 100) == 100)
VITS = sorted(n for n, rec in GOLDEN.items() if rec.get("num_classes", 100) == 1000)
STRONGER = ["resnet101", "resnet152"]  # the stronger teachers (torchvision's layout, as resnet50's)
NAMES = sorted(LAYOUTS)
ALL_224 = sorted([*LAYOUTS, *VITS, *STRONGER])  # every network for 224-pixel images
RESNET_BLOCKS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3), "resnet50": (3, 4, 6, 3)}
# Stage widths (stem first) and the depthwise strides of mdistiller's MobileNetV1.
WIDTHS = {"resnet18": (64, 64, 128, 256, 512), "resnet34": (64, 64, 128, 256, 512),
          "resnet50": (64, 256, 512, 1024, 2048), "mobilenet_v1": (32, 128, 256, 512, 1024)}
MOBILENET_STRIDES = (1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1)
MOBILENET_STAGE_ENDS = (3, 5, 11, 13)


def module_paths(model: nn.Module, mods) -> list[str | None]:
    paths = {id(m): name for name, m in model.named_modules()}
    return [paths.get(id(m)) for m in mods]


@functools.lru_cache(maxsize=None)
def built(name: str) -> nn.Module:
    torch.manual_seed(0)
    return create_model(name, 1000).eval()


@functools.lru_cache(maxsize=None)
def loaded_run(name: str, size: int = 64):
    """(model with the published-layout state dict, x, logits, feats, preact feats)."""
    model = create_model(name, 1000)
    model.load_state_dict(published_state_dict(name), strict=True)
    model.eval()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(x)
        feats, logits_f = model(x, is_feat=True)
        pre, logits_p = model(x, is_feat=True, preact=True)
    torch.testing.assert_close(logits_f, logits)
    torch.testing.assert_close(logits_p, logits)
    return model, x, logits, list(feats), list(pre)


# ---------------------------------------------------------------- independent references
def _bn(x, sd, p):
    return F.batch_norm(x, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"],
                        sd[f"{p}.bias"], training=False, eps=1e-5)


def reference_resnet(sd, x, blocks, bottleneck):
    """torchvision's ResNet forward as a chain of functional ops; returns (logits, feats, pre)."""
    x = F.relu(_bn(F.conv2d(x, sd["conv1.weight"], stride=2, padding=3), sd, "bn1"))
    feats, pre = [x], [x]
    x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
    for li, n in enumerate(blocks, 1):
        for b in range(n):
            p, s = f"layer{li}.{b}", 2 if li > 1 and b == 0 else 1
            if bottleneck:   # v1.5: the stride sits on the 3x3 convolution
                out = F.relu(_bn(F.conv2d(x, sd[f"{p}.conv1.weight"]), sd, f"{p}.bn1"))
                out = F.relu(_bn(F.conv2d(out, sd[f"{p}.conv2.weight"], stride=s, padding=1), sd, f"{p}.bn2"))
                out = _bn(F.conv2d(out, sd[f"{p}.conv3.weight"]), sd, f"{p}.bn3")
            else:
                out = F.relu(_bn(F.conv2d(x, sd[f"{p}.conv1.weight"], stride=s, padding=1), sd, f"{p}.bn1"))
                out = _bn(F.conv2d(out, sd[f"{p}.conv2.weight"], padding=1), sd, f"{p}.bn2")
            shortcut = x
            if f"{p}.downsample.0.weight" in sd:
                shortcut = _bn(F.conv2d(x, sd[f"{p}.downsample.0.weight"], stride=s), sd, f"{p}.downsample.1")
            summed = out + shortcut
            x = F.relu(summed)
        feats.append(x)
        pre.append(summed)
    pooled = x.mean(dim=(2, 3))
    return F.linear(pooled, sd["fc.weight"], sd["fc.bias"]), feats + [pooled], pre + [pooled]


def reference_mobilenet(sd, x):
    """mdistiller's MobileNetV1 forward as functional ops; returns (logits, feats, pre)."""
    x = F.relu(_bn(F.conv2d(x, sd["model.0.0.weight"], stride=2, padding=1), sd, "model.0.1"))
    feats, pre = [x], [x]
    for i, s in enumerate(MOBILENET_STRIDES, 1):
        w = sd[f"model.{i}.0.weight"]
        x = F.relu(_bn(F.conv2d(x, w, stride=s, padding=1, groups=w.shape[0]), sd, f"model.{i}.1"))
        y = _bn(F.conv2d(x, sd[f"model.{i}.3.weight"]), sd, f"model.{i}.4")
        x = F.relu(y)
        if i in MOBILENET_STAGE_ENDS:
            feats.append(x)
            pre.append(y)
    pooled = x.mean(dim=(2, 3))
    return F.linear(pooled, sd["fc.weight"], sd["fc.bias"]), feats + [pooled], pre + [pooled]


# ---------------------------------------------------------------- registry
def test_registry_knows_each_models_input_size():
    assert set(models.model_dict) == set(CIFAR) | set(ALL_224)
    assert model_names(input_size=224) == ALL_224
    assert model_names(input_size=32) == CIFAR
    assert model_names() == sorted(CIFAR + ALL_224)
    for name in models.model_dict:
        assert models.input_size(name) == (224 if name in ALL_224 else 32), name


def test_input_size_of_unknown_model_lists_choices():
    with pytest.raises(KeyError, match="unknown model 'resnet200'; choose from .*mobilenet_v1"):
        models.input_size("resnet200")


@pytest.mark.parametrize("name, blocks, params", [("resnet101", (3, 4, 23, 3), 44_549_160),
                                                  ("resnet152", (3, 8, 36, 3), 60_192_808)])
def test_stronger_teachers_have_torchvisions_layout(name, blocks, params):
    """resnet101/152: torchvision's parameter counts, and resnet50's key scheme with more
    bottlenecks in the stages (torchvision's ``layer3.22.conv3.weight``...)."""
    model = create_model(name, 1000)
    assert sum(p.numel() for p in model.parameters()) == params
    keys = model.state_dict().keys()
    for stage, count in enumerate(blocks, start=1):
        assert f"layer{stage}.{count - 1}.conv3.weight" in keys and f"layer{stage}.{count}.conv1.weight" not in keys
    r50 = {k for k in create_model("resnet50", 1000).state_dict() if not k.startswith("layer")}
    assert r50 == {k for k in keys if not k.startswith("layer")}


def test_num_classes_is_honoured():
    model = create_model("mobilenet_v1", 10).eval()
    assert model.fc.out_features == 10
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 10)


# ---------------------------------------------------------------- layouts and loading
@pytest.mark.parametrize("name", NAMES)
def test_state_dict_matches_published_layout(name):
    model = built(name)
    got = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    assert got == LAYOUTS[name]["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == LAYOUTS[name]["num_params"]


def test_parameter_counts_are_torchvisions():
    # torchvision's documented counts (ImageNet-1k weights' "num_params").
    assert {n: LAYOUTS[n]["num_params"] for n in RESNET_BLOCKS} == {
        "resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032}


@pytest.mark.parametrize("name", NAMES)
def test_published_file_loads_strictly(name):
    """A file made as the published one was (a plain dict; torchvision's without BatchNorm
    counters), reloaded with weights_only: torch's strict load and ours both take it."""
    buf = io.BytesIO()
    torch.save(published_state_dict(name), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert type(state) is dict and not hasattr(state, "_metadata")
    counters = [k for k in layout_keys(name) if k.endswith(".num_batches_tracked")]
    assert counters and (all(k not in state for k in counters) if name in TORCHVISION_FILES
                         else all(k in state for k in counters))
    for load in (lambda m: m.load_state_dict(dict(state), strict=True),
                 lambda m: load_weights(m, state, name, "file.pth")):
        model = create_model(name, 1000)
        load(model)
        for k, v in model.state_dict().items():
            assert torch.equal(v, state[k]) if k in state else (k in counters and v.item() == 0), k


def layout_keys(name: str) -> list[str]:
    return [key for key, _ in LAYOUTS[name]["state_dict"]]


def _without(state: dict, key: str) -> dict:
    return {k: v for k, v in state.items() if k != key}


def test_only_missing_counters_are_forgiven():
    """torchvision's files lack every num_batches_tracked; any other gap is still an error."""
    model = create_model("resnet18", 1000)
    plain = published_state_dict("resnet18")
    load_weights(model, plain, "resnet18", "r18.pth")
    # our own state_dict() carries _metadata (BatchNorm version 2), which makes torch's strict
    # load refuse missing counters; ours fills them either way
    ours = model.state_dict()
    for key in [k for k in ours if k.endswith("num_batches_tracked")]:
        del ours[key]
    assert ours._metadata["bn1"]["version"] == 2
    with pytest.raises(RuntimeError, match="num_batches_tracked"):
        create_model("resnet18", 1000).load_state_dict(ours, strict=True)
    load_weights(create_model("resnet18", 1000), ours, "resnet18", "r18.pth")
    for broken, fragment in [(_without(plain, "bn1.running_mean"), "1 missing keys (e.g. bn1.running_mean)"),
                             ({**plain, "fc.extra": torch.zeros(1)}, "1 unexpected keys (e.g. fc.extra)"),
                             ({**plain, "bn1.running_var": torch.ones(3)}, "1 shape mismatches (e.g. bn1.running_var")]:
        with pytest.raises(UserError) as err:
            load_weights(create_model("resnet18", 1000), broken, "resnet18", "r18.pth")
        assert str(err.value) == f"checkpoint r18.pth does not match architecture resnet18: {fragment}" \
            if "shape" not in fragment else fragment in str(err.value)
        assert "\n" not in str(err.value)


def test_another_class_count_is_said_in_classes():
    with pytest.raises(UserError) as err:
        load_weights(create_model("resnet18", 2), published_state_dict("resnet18", num_classes=3), "resnet18", "t.pth")
    assert str(err.value) == ("checkpoint t.pth is a resnet18 with another classifier: "
                              "the teacher has 3 classes, the data 2")


def test_saved_state_dict_round_trips_with_the_same_outputs():
    model, x, logits, _, _ = loaded_run("resnet18")
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "epoch": 1, "best_acc": 0.0}, buf)
    buf.seek(0)
    fresh = create_model("resnet18", 1000)
    fresh.load_state_dict(torch.load(buf, weights_only=True)["model"], strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), logits, rtol=0, atol=0)


def test_default_init_is_torchvisions_and_mdistillers():
    resnet = built("resnet18")
    assert torch.equal(resnet.layer1[0].bn2.weight, torch.ones(64))  # no zero-init residual
    std = resnet.layer3[0].conv1.weight.std().item()   # He normal, fan-out: sqrt(2 / (256 * 9))
    assert abs(std - (2 / (256 * 9)) ** 0.5) < 0.05 * std
    conv = built("mobilenet_v1").model[13][3].weight   # PyTorch default: U(+-1/sqrt(fan_in))
    assert conv.abs().max().item() <= 1 / 1024 ** 0.5 and conv.std().item() < 0.7 / 1024 ** 0.5


# ---------------------------------------------------------------- forward
@pytest.mark.parametrize("name", NAMES)
def test_forward_matches_functional_reference(name):
    model, x, logits, feats, pre = loaded_run(name)
    sd = published_state_dict(name)
    if name == "mobilenet_v1":
        ref = reference_mobilenet(sd, x)
    else:
        ref = reference_resnet(sd, x, RESNET_BLOCKS[name], bottleneck=name == "resnet50")
    tol = dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits, ref[0], **tol)
    assert len(feats) == len(ref[1]) == len(pre) == 6
    for got, want in zip(feats, ref[1]):
        torch.testing.assert_close(got, want, **tol)
    for got, want in zip(pre, ref[2]):
        torch.testing.assert_close(got, want, **tol)
    assert logits.std() > 0.1   # the comparison is not between near-constant tensors


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v1"])
def test_feature_shapes_at_224(name):
    w = WIDTHS[name]
    assert [tuple(s) for s in feature_shapes(built(name), image_size=224)] == [
        (2, w[0], 112, 112), (2, w[1], 56, 56), (2, w[2], 28, 28), (2, w[3], 14, 14), (2, w[4], 7, 7),
        (2, w[4])]


@pytest.mark.parametrize("name", NAMES)
def test_feature_shapes_scale_with_the_input(name):
    w = WIDTHS[name]
    assert [tuple(f.shape) for f in loaded_run(name)[3]] == [
        (2, w[0], 32, 32), (2, w[1], 16, 16), (2, w[2], 8, 8), (2, w[3], 4, 4), (2, w[4], 2, 2), (2, w[4])]


@pytest.mark.parametrize("name", NAMES)
def test_preact_features_are_the_stage_outputs_before_relu(name):
    model, _, logits, feats, pre = loaded_run(name)
    torch.testing.assert_close(pre[0], feats[0])   # the stem, as in the CIFAR models
    torch.testing.assert_close(pre[-1], feats[-1])
    for i in range(1, 5):
        assert (pre[i] < 0).any(), i
        torch.testing.assert_close(feats[i], F.relu(pre[i]))
    with torch.no_grad():
        torch.testing.assert_close(model.fc(feats[-1]), logits)


@pytest.mark.parametrize("name", NAMES)
def test_bn_before_relu_closes_each_stage(name):
    model, x, _, feats, pre = loaded_run(name)
    bns = model.get_bn_before_relu()
    blocks = RESNET_BLOCKS.get(name)
    if blocks is None:
        want = [f"model.{i}.4" for i in MOBILENET_STAGE_ENDS]
    else:
        last = "bn3" if name == "resnet50" else "bn2"
        want = [f"layer{li}.{n - 1}.{last}" for li, n in enumerate(blocks, 1)]
    assert module_paths(model, bns) == want
    assert all(isinstance(bn, nn.BatchNorm2d) for bn in bns)
    assert [bn.num_features for bn in bns] == [f.shape[1] for f in feats[1:5]]
    if name == "mobilenet_v1":   # no shortcut: the batch norm's output is the pre-activation
        seen = []
        hooks = [bn.register_forward_hook(lambda m, i, o: seen.append(o.clone())) for bn in bns]
        with torch.no_grad():
            model(x)
        for h in hooks:
            h.remove()
        for got, want_t in zip(seen, pre[1:5]):
            torch.testing.assert_close(got, want_t)


@pytest.mark.parametrize("name", NAMES)
def test_feat_modules_cover_stem_and_stages(name):
    model = built(name)
    want = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    if name == "mobilenet_v1":
        want = [f"model.{i}" for i in range(14)]
    feat_m = model.get_feat_modules()
    assert isinstance(feat_m, nn.ModuleList)
    assert module_paths(model, feat_m) == want
    trainable = {id(p) for p in feat_m.parameters()}
    assert [n for n, p in model.named_parameters() if id(p) not in trainable] == ["fc.weight", "fc.bias"]


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenet_v1"])
def test_train_step_reaches_every_parameter(name):
    torch.manual_seed(0)
    model = create_model(name, 10).train()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    feats, logits = model(x, is_feat=True, preact=True)
    (logits.sum() + sum(f.mean() for f in feats)).backward()
    assert not [n for n, p in model.named_parameters() if p.grad is None]
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_building_prints_nothing(name, capsys):
    create_model(name, 1000)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("name", sorted(RESNET_BLOCKS))
def test_torchvision_weights_load_and_agree(name):
    """Where torchvision is installed: its own module's state dict loads strictly, same forward."""
    tv_models = pytest.importorskip("torchvision.models")
    theirs = getattr(tv_models, name)(weights=None).eval()
    state = theirs.state_dict()
    assert [[k, list(v.shape)] for k, v in state.items()] == LAYOUTS[name]["state_dict"]
    ours = create_model(name, 1000)
    ours.load_state_dict(state, strict=True)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), theirs(x), rtol=1e-4, atol=1e-5)
