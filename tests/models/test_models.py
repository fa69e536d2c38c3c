"""Model zoo: registry, forward contract, feature quirks and checkpoint layout.

Parametrised over the registry; expected layouts come from the spec copy in
``tests/data/golden_public.json`` (numeric parity is tested in ``test_parity.py``).
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
from train_utils import DATA_DIR
from models import create_model, feature_shapes, model_names, register_model
from models.ShuffleNetv1 import ShuffleBlock

GOLDEN = json.loads((DATA_DIR / "golden_public.json").read_text())["models"]
NAMES = model_names(input_size=32)  # the CIFAR networks; ImageNet ones: test_models_imagenet.py
SHUFFLENETS = {"ShuffleV1", "ShuffleV2"}


def expected_num_features(name: str) -> int:
    return 6 if name in ("ResNet50", "MobileNetV2") or name.startswith("vgg") else 5


def classifier(model: nn.Module) -> nn.Linear:
    """The linear layer that turns the pooled feature into logits (the model's last one)."""
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def module_paths(model: nn.Module, mods) -> list[str | None]:
    paths = {id(m): name for name, m in model.named_modules()}
    return [paths.get(id(m)) for m in mods]


@functools.lru_cache(maxsize=None)
def eval_run(name: str):
    """(model, logits, feats, preact feats, logits of both feature calls) for one fixed batch."""
    torch.manual_seed(0)
    model = create_model(name, 100).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(x)
        feats, logits_f = model(x, is_feat=True)
        pre, logits_p = model(x, is_feat=True, preact=True)
    return model, logits, list(feats), list(pre), (logits_f, logits_p)


def test_registry_matches_spec():
    """Every golden network is registered at its input size (the ViTs' records say 1000
    classes: they are ImageNet networks)."""
    imagenet = {n for n, rec in GOLDEN.items() if rec.get("num_classes", 100) == 1000}
    assert NAMES == sorted(set(GOLDEN) - imagenet)
    assert imagenet <= set(model_names(input_size=224))
    assert set(models.model_dict) == set(NAMES) | set(model_names(input_size=224))


def test_unknown_model_raises_keyerror_listing_choices():
    with pytest.raises(KeyError, match="unknown model 'resnet9'; choose from .*resnet8"):
        create_model("resnet9", 100)


def test_register_model_rejects_duplicates():
    with pytest.raises(ValueError, match="registered twice"):
        register_model("resnet8")(lambda num_classes=100: nn.Identity())
    assert models.model_dict["resnet8"] is models.resnet.resnet8


def test_num_classes_is_honoured():
    model = create_model("resnet8", 10).eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_matches_reference_layout(name):
    model = models.model_dict[name](num_classes=100)
    got = [[k, list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in model.state_dict().items()]
    assert got == GOLDEN[name]["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == GOLDEN[name]["num_params"]


@pytest.mark.parametrize("name", NAMES)
def test_building_prints_nothing(name, capsys):
    models.model_dict[name](num_classes=100)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("name", NAMES)
def test_forward_contract(name):
    model, logits, feats, pre, (logits_f, logits_p) = eval_run(name)
    assert logits.shape == (2, 100)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits_f, logits)
    torch.testing.assert_close(logits_p, logits)

    golden = GOLDEN[name]["outputs"]["x1234"]
    for kind, fs in (("feat", feats), ("preact", pre)):
        assert len(fs) == expected_num_features(name), kind
        assert [list(f.shape[1:]) for f in fs] == [g["shape"][1:] for g in golden[kind]["features"]], kind
        assert all(f.shape[0] == 2 and torch.isfinite(f).all() for f in fs), kind
    # The last feature is the pooled vector that feeds the classifier.
    assert feats[-1].dim() == 2
    with torch.no_grad():
        torch.testing.assert_close(classifier(model)(feats[-1]), logits)
    torch.testing.assert_close(pre[-1], feats[-1])


@pytest.mark.parametrize("name", NAMES)
def test_preact_features_follow_the_reference(name):
    """How each family's ``preact=True`` features relate to its normal ones (PARITY.md §8)."""
    model, _, feats, pre, _ = eval_run(name)
    torch.testing.assert_close(pre[0], feats[0])
    middle = range(1, len(feats) - 1)
    with torch.no_grad():
        if name == "MobileNetV2":  # preact is ignored
            for i in middle:
                torch.testing.assert_close(pre[i], feats[i])
        elif name.startswith("wrn"):  # the batch norm that follows each group
            for i, bn in zip(middle, model.get_bn_before_relu()):
                torch.testing.assert_close(pre[i], bn(feats[i]))
        elif name == "ShuffleV2":  # before the last ReLU and before the channel shuffle
            for i in middle:
                torch.testing.assert_close(feats[i], ShuffleBlock(2)(F.relu(pre[i])))
        else:  # the stage output before its final ReLU
            for i in middle:
                assert (pre[i] < 0).any(), i
                torch.testing.assert_close(feats[i], F.relu(pre[i]))


@pytest.mark.parametrize("name", NAMES)
def test_feature_and_bn_modules_sit_where_the_reference_has_them(name):
    model = eval_run(name)[0]
    ref = GOLDEN[name]
    feat_m = model.get_feat_modules()
    assert isinstance(feat_m, nn.ModuleList)
    assert module_paths(model, feat_m) == [m["path"] for m in ref["get_feat_modules"]["modules"]]
    if name in SHUFFLENETS:
        with pytest.raises(NotImplementedError):
            model.get_bn_before_relu()
        return
    bns = model.get_bn_before_relu()
    assert all(isinstance(bn, nn.BatchNorm2d) for bn in bns)
    assert module_paths(model, bns) == [m["path"] for m in ref["get_bn_before_relu"]["modules"]]


@pytest.mark.parametrize("name", NAMES)
def test_train_step_reaches_every_parameter(name):
    torch.manual_seed(0)
    model = create_model(name, 100).train()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    feats, logits = model(x, is_feat=True, preact=True)
    (logits.sum() + sum(f.mean() for f in feats)).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_feature_shapes_probes_in_eval_and_restores_modes():
    model = create_model("resnet8", 100).train()
    model.layer2.eval()  # a mixed state (e.g. a frozen part) must survive the probe
    before = {k: v.clone() for k, v in model.state_dict().items()}
    shapes = feature_shapes(model)
    assert shapes == [torch.Size(s) for s in ([2, 16, 32, 32], [2, 16, 32, 32], [2, 32, 16, 16],
                                              [2, 64, 8, 8], [2, 64])]
    assert all(isinstance(s, torch.Size) for s in shapes)
    assert model.training and model.layer1.training and not model.layer2.training
    assert not model.layer2[0].training
    for k, v in model.state_dict().items():  # no BatchNorm statistics moved
        assert torch.equal(v, before[k]), k
    assert feature_shapes(model, preact=True) == shapes


def test_feature_shapes_follows_image_size_for_vgg():
    # pool3 is applied only to 64x64 inputs: at 32x32 blocks 3 and 4 share the 4x4 size.
    model = create_model("vgg8", 100).eval()
    assert [tuple(s) for s in feature_shapes(model)] == [
        (2, 64, 32, 32), (2, 128, 16, 16), (2, 256, 8, 8), (2, 512, 4, 4), (2, 512, 4, 4), (2, 512)]
    assert [tuple(s) for s in feature_shapes(model, image_size=64)] == [
        (2, 64, 64, 64), (2, 128, 32, 32), (2, 256, 16, 16), (2, 512, 8, 8), (2, 512, 4, 4), (2, 512)]
    assert not model.training


def test_checkpoint_round_trip_with_weights_only():
    src = create_model("wrn_16_1", 100)
    buf = io.BytesIO()
    torch.save({"model": src.state_dict(), "epoch": 1, "best_acc": 0.0}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    dst = create_model("wrn_16_1", 100)
    dst.load_state_dict(ckpt["model"])
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
