"""Batched RandAugment, random erasing and mixup/CutMix against timm's definitions.

Each RandAugment op is checked against timm's op and level function, transcribed here with PIL
and numpy (``timm/data/auto_augment.py`` v1.0.28), on small random images. The tensor ops
use PIL's own arithmetic (blend truncation, rgb2l, the a = -1 cubic of PIL's transforms), so
every op, geometric ones included, must match PIL exactly (the test images are noise, the
hardest case for interpolation). Distributions are checked with fixed seeds at alpha = 0.001
(a pass is stable; a wrong distribution fails by far more than the margin).
"""
from __future__ import annotations

import math
import random
import statistics
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps
from scipy import stats

from dataset.augment_recipe import DEIT, TrainAugment
from dataset.imagenet_batches import augment_views
from dataset.imagenet_decode import decode_file
from dataset.imagenet_loader import ImageFolderLoader, UndecodableImageWarning, load_imagenet
from dataset.imagenet_transforms import (IMAGENET_MEAN, IMAGENET_STD, block_uniforms,
                                         draw_uniforms, flip_normalize, flips, resize,
                                         train_views)
from dataset.mixup import Mixup, sample_beta, sample_gamma
from dataset.randaugment import (OPS, RAND_INCREASING_TRANSFORMS, RAND_TRANSFORMS, RandAugment,
                                 RandAugmentConfig, choices, draw_rand_augment, mean_fill,
                                 parse_rand_augment, rand_augment)
from dataset.random_erasing import RandomErasing
from imagenet_fixtures import make_tiny_imagenet

pytestmark = pytest.mark.usefixtures("one_thread")

KS_C = 1.9495  # two-sample KS critical constant at alpha 0.001
Z_999 = 3.2905
FILL = mean_fill(IMAGENET_MEAN)


def images(n=12, size=32, seed=0):
    rng = np.random.default_rng(seed)
    arrays = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    arrays[0, :, :, 1] = 77  # a flat channel (autocontrast and equalize leave it)
    arrays[1] = rng.integers(100, 103, (size, size, 3))  # three grey levels
    return arrays, torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous()


# --- timm's ops and level functions, transcribed with PIL ---------------------------------

def _lut(img, lut):
    return img.point(lut * 3)


def timm_op(name, img, m, negate, resample):
    """timm's ``AugmentOp`` body for a fixed magnitude ``m`` and sign."""
    level = m / 10.0
    sign = -1.0 if negate else 1.0
    affine = dict(resample=resample, fillcolor=FILL)
    w, h = img.size
    if name == "AutoContrast":
        return ImageOps.autocontrast(img)
    if name == "Equalize":
        return ImageOps.equalize(img)
    if name == "Invert":
        return ImageOps.invert(img)
    if name == "Rotate":
        return img.rotate(sign * level * 30.0, **affine)
    if name.startswith("Posterize"):
        bits = int(level * 4)
        bits = 4 - bits if name.endswith("Increasing") else bits
        if bits >= 8:
            return img
        # Pillow >= 11 refuses bits=0 in ImageOps.posterize; its LUT (all zero) is this one.
        return _lut(img, [i & ~(2 ** (8 - bits) - 1) for i in range(256)])
    if name.startswith("Solarize") and name != "SolarizeAdd":
        threshold = min(256, int(level * 256))
        threshold = 256 - threshold if name.endswith("Increasing") else threshold
        return ImageOps.solarize(img, threshold)
    if name == "SolarizeAdd":
        add = min(128, int(level * 110))
        return _lut(img, [min(255, i + add) if i < 128 else i for i in range(256)])
    for enhancer in ("Color", "Contrast", "Brightness", "Sharpness"):
        if name.startswith(enhancer):
            factor = (max(0.1, 1.0 + sign * level * 0.9) if name.endswith("Increasing")
                      else level * 1.8 + 0.1)
            return getattr(ImageEnhance, enhancer)(img).enhance(factor)
    shift = sign * level * 0.45
    data = {"ShearX": (1, sign * level * 0.3, 0, 0, 1, 0),
            "ShearY": (1, 0, 0, sign * level * 0.3, 1, 0),
            "TranslateXRel": (1, 0, shift * w, 0, 1, 0),
            "TranslateYRel": (1, 0, 0, 0, 1, shift * h)}[name]
    return img.transform(img.size, Image.AFFINE, data, **affine)


def forced(n, sign_u, interp_u=0.1):
    """Uniforms that make every image run op 0 of a one-op config with the given sign."""
    u = torch.full((n, 5), 0.1, dtype=torch.float64)
    u[:, 3], u[:, 4] = sign_u, interp_u
    return u


ALL_OPS = sorted(set(RAND_TRANSFORMS) | set(RAND_INCREASING_TRANSFORMS))


@pytest.mark.parametrize("name", ALL_OPS)
def test_each_op_equals_timm_with_pil(name):
    arrays, batch = images()
    signs = (False, True) if name in {"Rotate", "ShearX", "ShearY", "TranslateXRel",
                                      "TranslateYRel"} or name.endswith("Increasing") else (False,)
    interps = ("bilinear", "bicubic") if name in {"Rotate", "ShearX", "ShearY", "TranslateXRel",
                                                  "TranslateYRel"} else ("bilinear",)
    for m in (7.3, 10.0):  # 10: posterize keeps 0 bits, solarize thresholds reach the ends
        for negate in signs:
            for interp in interps:
                config = RandAugmentConfig(ops=(name,), num_layers=1, magnitude=m, prob=1.0,
                                           fill=FILL, interpolation=interp)
                ours = rand_augment(batch, forced(len(batch), 0.75 if negate else 0.25), config)
                resample = Image.BICUBIC if interp == "bicubic" else Image.BILINEAR
                ref = np.stack([np.asarray(timm_op(name, Image.fromarray(a), m, negate,
                                                   resample)) for a in arrays])
                assert np.array_equal(ours.permute(0, 2, 3, 1).numpy(), ref), (m, negate, interp)


def test_random_interpolation_picks_per_image():
    arrays, batch = images(8)
    u = forced(8, 0.25)
    u[:, 4] = torch.tensor([0.1, 0.9] * 4, dtype=torch.float64)  # bilinear, bicubic, ...
    config = RandAugmentConfig(ops=("Rotate",), num_layers=1, magnitude=8, prob=1.0, fill=FILL)
    ours = rand_augment(batch, u, config).permute(0, 2, 3, 1).numpy()
    for k, a in enumerate(arrays):
        resample = Image.BICUBIC if k % 2 else Image.BILINEAR
        assert np.array_equal(ours[k], np.asarray(timm_op("Rotate", Image.fromarray(a), 8, False,
                                                          resample)))


def test_batched_layers_equal_timm_applied_image_by_image():
    """The grouping by op (gather, apply, scatter back) over two layers, skipped ops included,
    against timm's per-image loop with its choices decoded from the same uniforms."""
    arrays, batch = images(40, 16, seed=3)
    config = parse_rand_augment("rand-m9-mstd0.5-inc1", IMAGENET_MEAN, "bicubic")
    u = draw_rand_augment(40, config, torch.Generator().manual_seed(5))
    ours = rand_augment(batch, u, config).permute(0, 2, 3, 1).numpy()
    normal = statistics.NormalDist().inv_cdf
    for k, a in enumerate(arrays):
        img = Image.fromarray(a)
        for layer in range(2):
            op, apply, mag, sign, _ = u[k, layer * 5:layer * 5 + 5].tolist()
            if apply > 0.5:
                continue
            m = min(10.0, max(0.0, 9 + 0.5 * normal(mag)))
            img = timm_op(config.ops[int(op * 15)], img, m, sign > 0.5, Image.BICUBIC)
        assert np.array_equal(ours[k], np.asarray(img)), k


def test_spec_parsing_follows_timm():
    config = parse_rand_augment("rand-m9-mstd0.5-inc1", IMAGENET_MEAN, "bicubic")
    assert config.ops == RAND_INCREASING_TRANSFORMS and len(config.ops) == 15
    assert (config.num_layers, config.magnitude, config.magnitude_std, config.prob) == (2, 9, 0.5,
                                                                                       0.5)
    assert config.magnitude_max == 10 and config.fill == (124, 116, 104)
    assert config.interpolation == "bicubic"
    other = parse_rand_augment("rand-n3-m7-mstd101-p0.3-mmax12", (0.5,) * 3)
    assert other.ops == RAND_TRANSFORMS and other.num_layers == 3 and other.magnitude == 7
    assert math.isinf(other.magnitude_std) and other.prob == 0.3 and other.magnitude_max == 12
    assert other.fill == (128, 128, 128)  # round(127.5) = 128, half to even
    for bad in ("augmix-m3", "rand-x3", "rand-m9-mstdabc1"):
        with pytest.raises(ValueError):
            parse_rand_augment(bad, IMAGENET_MEAN)
    assert set(OPS) == set(ALL_OPS)


def test_choices_follow_timms_distribution():
    config = parse_rand_augment("rand-m9-mstd0.5-inc1", IMAGENET_MEAN, "random")
    n = 30_000
    u = draw_rand_augment(n, config, torch.Generator().manual_seed(0)).view(n, 2, 5)
    drawn = choices(u[:, 0], config)
    counts = torch.bincount(drawn.op, minlength=15).double()
    chi2 = float(((counts - n / 15) ** 2 / (n / 15)).sum())
    assert chi2 < stats.chi2.ppf(0.999, 14)
    for flag in (drawn.applied, drawn.negate, drawn.bicubic):
        assert abs(float(flag.double().mean()) - 0.5) < Z_999 * math.sqrt(0.25 / n)
    # Magnitudes: N(9, 0.5) clipped to [0, 10], against numpy's normal sampler.
    ref = np.clip(np.random.default_rng(1).normal(9, 0.5, n), 0, 10)
    ks = stats.ks_2samp(drawn.magnitude.numpy(), ref).statistic
    assert ks < KS_C * math.sqrt(2 / n)
    at_max = float((drawn.magnitude == 10).double().mean())
    p = 1 - stats.norm.cdf(2.0)
    assert abs(at_max - p) < Z_999 * math.sqrt(p * (1 - p) / n)
    # mstd > 100: uniform on [0, m].
    uniform = parse_rand_augment("rand-m9-mstd200", IMAGENET_MEAN)
    mags = choices(u[:, 1], uniform).magnitude.numpy()
    assert stats.kstest(mags, stats.uniform(0, 9).cdf).statistic < KS_C / math.sqrt(n)


def test_rand_augment_is_seeded():
    _, batch = images(16)
    config = parse_rand_augment("rand-m9-mstd0.5-inc1", IMAGENET_MEAN, "bicubic")
    run = lambda seed: RandAugment(config)(batch, torch.Generator().manual_seed(seed))  # noqa
    assert torch.equal(run(3), run(3)) and not torch.equal(run(3), run(4))
    assert torch.equal(batch, images(16)[1])  # the input is left alone


# --- random erasing -------------------------------------------------------------------------

def timm_erase_boxes(height, width, draw, p=0.25, count=1, min_area=0.02, max_area=1 / 3,
                     log_ratio=(math.log(0.3), math.log(1 / 0.3))):
    """timm's ``RandomErasing._erase`` box placement (one count), random source injected."""
    if draw() > p:
        return []
    area = height * width
    for _ in range(10):
        target = (min_area + (max_area - min_area) * draw()) * area / count
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * draw())
        h, w = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        top_u, left_u = draw(), draw()
        if w < width and h < height:
            return [(int(top_u * (height - h + 1)), int(left_u * (width - w + 1)), h, w)]
    return []


def test_erasing_boxes_equal_timm_on_the_same_uniforms():
    erasing = RandomErasing(probability=0.25, mode="pixel")
    u = torch.rand(3000, erasing.uniforms_per_image, generator=torch.Generator().manual_seed(0),
                   dtype=torch.float64)
    for height, width in ((32, 32), (12, 40)):  # a narrow image makes some tries fail
        boxes = erasing.boxes(u, height, width)
        for k in range(len(u)):
            row = u[k].tolist()
            seq = iter([row[0]] + row[2:])
            ref = timm_erase_boxes(height, width, lambda: next(seq))
            got = [tuple(b) for b in boxes[k].tolist() if b[2] > 0]
            assert got == ref, k


def test_erasing_statistics():
    erasing = RandomErasing(probability=0.25, mode="pixel")
    n, size = 4000, 224
    boxes = erasing.boxes(torch.rand(n, erasing.uniforms_per_image, dtype=torch.float64,
                                     generator=torch.Generator().manual_seed(1)), size, size)[:, 0]
    erased = boxes[:, 2] > 0
    assert abs(float(erased.double().mean()) - 0.25) < Z_999 * math.sqrt(0.25 * 0.75 / n)
    rng = random.Random(2)
    ref = [b[0] for b in (timm_erase_boxes(size, size, rng.random) for _ in range(n)) if b]
    ref_t = torch.tensor(ref, dtype=torch.float64)
    ours = boxes[erased].double()
    crit = KS_C * math.sqrt((len(ours) + len(ref)) / (len(ours) * len(ref)))
    for stat in (lambda b: b[:, 2] * b[:, 3] / size ** 2, lambda b: torch.log(b[:, 2] / b[:, 3]),
                 lambda b: b[:, 0] / (size - b[:, 2] + 1)):
        assert stats.ks_2samp(stat(ours).numpy(), stat(ref_t).numpy()).statistic < crit
    area = ours[:, 2] * ours[:, 3] / size ** 2
    assert float(area.min()) > 0.019 and float(area.max()) < 0.34


def test_erased_pixels_are_standard_normal_and_the_rest_untouched():
    gen = torch.Generator().manual_seed(3)
    batch = torch.zeros(64, 3, 24, 24)
    out = RandomErasing(probability=1.0, mode="pixel")(batch, gen)
    changed = out != 0
    assert changed.any(dim=1).flatten(1).any(dim=1).float().mean() > 0.9  # nearly all erased
    values = out[changed]
    assert abs(float(values.mean())) < Z_999 / math.sqrt(len(values))
    assert abs(float(values.std()) - 1) < 0.02
    rand = RandomErasing(probability=1.0, mode="rand")(torch.zeros(8, 3, 24, 24),
                                                       torch.Generator().manual_seed(0))
    for image in rand:  # one colour per channel inside the box
        for channel in image:
            inside = channel[channel != 0]
            assert len(inside) == 0 or torch.all(inside == inside[0])
    run = lambda seed: RandomErasing(0.5, mode="pixel")(  # noqa: E731
        torch.zeros(16, 3, 8, 8), torch.Generator().manual_seed(seed))
    assert torch.equal(run(5), run(5)) and not torch.equal(run(5), run(6))


# --- mixup / CutMix -------------------------------------------------------------------------

def test_gamma_and_beta_samplers():
    gen = torch.Generator().manual_seed(0)
    for shape in (0.8, 3.0):
        draws = np.array([sample_gamma(shape, gen) for _ in range(3000)])
        assert stats.kstest(draws, stats.gamma(shape).cdf).statistic < KS_C / math.sqrt(3000)
    draws = np.array([sample_beta(0.8, gen) for _ in range(3000)])
    assert stats.kstest(draws, stats.beta(0.8, 0.8).cdf).statistic < KS_C / math.sqrt(3000)


def test_mixup_lambda_and_switch_distribution():
    gen = torch.Generator().manual_seed(1)
    both = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, num_classes=5)
    params = [both.params(gen) for _ in range(3000)]
    cut = np.array([c for _, c in params])
    assert abs(cut.mean() - 0.5) < Z_999 * math.sqrt(0.25 / len(cut))
    lam_mix = np.array([lam for lam, c in params if not c])
    lam_cut = np.array([lam for lam, c in params if c])
    assert stats.kstest(lam_mix, stats.beta(0.8, 0.8).cdf).statistic < KS_C / math.sqrt(
        len(lam_mix))
    assert stats.kstest(lam_cut, stats.uniform.cdf).statistic < KS_C / math.sqrt(len(lam_cut))
    never = Mixup(mixup_alpha=0.8, prob=0.0, num_classes=5)
    assert never.params(gen) == (1.0, False)


def test_mixed_batches_and_targets_agree():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, 3, 16, 16)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    smoothing, k = 0.1, 5
    one_hot = torch.full((6, k), smoothing / k).scatter_(1, labels.view(-1, 1),
                                                         1 - smoothing + smoothing / k)
    seen = set()
    for _ in range(40):
        for cutmix in (False, True):
            mix = Mixup(mixup_alpha=0.0 if cutmix else 0.8, cutmix_alpha=1.0 if cutmix else 0.0,
                        label_smoothing=smoothing, num_classes=k)
            out, targets = mix(x.clone(), labels, gen)
            assert targets.shape == (6, k) and torch.allclose(targets.sum(1), torch.ones(6))
            # Sample 1 (label 1) is mixed with sample 4 (label 4): its class-1 score gives lam.
            lam = float((targets[1, 1] - one_hot[4, 1]) / (one_hot[1, 1] - one_hot[4, 1]))
            torch.testing.assert_close(targets, lam * one_hot + (1 - lam) * one_hot.flip(0))
            if cutmix:
                pasted = (out != x).any(dim=1)[0]
                kept = 1 - float(pasted.double().mean())
                assert abs(kept - lam) < 1e-6 or float(pasted.sum()) == 0
                assert torch.equal(out[pasted.expand(6, 3, -1, -1)],
                                   x.flip(0)[pasted.expand(6, 3, -1, -1)])
            else:
                torch.testing.assert_close(out, x * lam + x.flip(0) * (1 - lam))
            seen.add((cutmix, lam != 1.0))
    assert {(False, True), (True, True)} <= seen
    run = lambda seed: Mixup(0.8, 1.0, num_classes=k)(  # noqa: E731
        x.clone(), labels, torch.Generator().manual_seed(seed))
    assert all(torch.equal(a, b) for a, b in zip(run(7), run(7)))


# --- the loader -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return load_imagenet(make_tiny_imagenet(str(tmp_path_factory.mktemp("imagenet"))).root)


def quiet(loader):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndecodableImageWarning)
        return [tuple(t.clone() for t in batch) for batch in loader]


def test_deit_loader_is_the_pipeline_step_by_step(data):
    """Crop (bicubic) -> flip -> RandAugment -> normalise -> erase -> mix, with the draws the
    loader documents, and the same batches whether the worker or the main process decodes."""
    size, batch = 64, 6
    make = lambda decode: ImageFolderLoader(  # noqa: E731
        data.folder.train, batch, train=True, seed=3, decode=decode, size=size,
        interpolation="bicubic", augment=DEIT, num_classes=data.num_classes)
    got = quiet(make("workers"))
    assert all(torch.equal(a, b) for x, y in zip(got, quiet(make("device")), strict=True)
               for a, b in zip(x, y))
    loader = make("workers")
    order = loader.order(0)
    position = {int(i): p for p, i in enumerate(order)}
    config = DEIT.rand_augment_config(IMAGENET_MEAN, "bicubic")
    erase_gen = torch.Generator().manual_seed(_seed(3, "erase"))
    mix_gen = torch.Generator().manual_seed(_seed(3, "mix"))
    for images, targets, index in got:
        p = [position[i] for i in index.tolist()]
        u = torch.cat([draw_uniforms(3, 0, 0, q, q + 1) for q in p])
        a = torch.cat([block_uniforms("randaugment", 10, 3, 0, 0, q, q + 1) for q in p])
        crops = train_views([decode_file(data.folder.train.path(i)) for i in index.tolist()],
                            u, size, "bicubic")
        pixels, flip = augment_views(crops, flips(u), a, config)
        expected = DEIT.erasing()(flip_normalize(pixels, flip), erase_gen)
        expected, soft = DEIT.mixing(data.num_classes)(
            expected, data.train_labels[index], mix_gen)
        assert torch.equal(images, expected) and torch.equal(targets, soft)
        assert targets.shape == (len(index), 3) and torch.allclose(targets.sum(1),
                                                                   torch.ones(len(index)))


def _seed(seed, tag):
    from dataset.sharding import derive_seed
    return derive_seed(seed, tag, 0, 0)


def test_deit_eval_is_bicubic_256_then_centre_224(data):
    loader = ImageFolderLoader(data.folder.val, 4, train=False, seed=0, interpolation="bicubic")
    for images, _, index in quiet(loader):
        for image, i in zip(images, index.tolist()):
            source = decode_file(data.folder.val.path(i))
            h, w = source.shape[-2:]
            new = (256, int(256 * w / h)) if h <= w else (int(256 * h / w), 256)
            pil = Image.fromarray(source.permute(1, 2, 0).numpy()).resize(new[::-1],
                                                                          Image.BICUBIC)
            top, left = round((new[0] - 224) / 2), round((new[1] - 224) / 2)
            ref = torch.from_numpy(np.array(pil)[top:top + 224, left:left + 224]).permute(2, 0, 1)
            got = image * torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255 + torch.tensor(
                IMAGENET_MEAN).view(3, 1, 1) * 255
            assert float((got - ref.float()).abs().max()) <= 1 + 1e-3  # PIL's fixed point


def test_float_bicubic_resize_runs_two_passes_like_pil():
    image = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 30, 40),
                                                               dtype=np.uint8))
    for height, width in ((60, 90), (17, 23)):
        pil = np.asarray(Image.fromarray(image.permute(1, 2, 0).numpy()).resize(
            (width, height), Image.BICUBIC)).astype(np.int64)
        for uint8_kernel in (True, False):
            ours = resize(image, height, width, uint8_kernel, "bicubic").permute(1, 2, 0)
            assert np.abs(ours.numpy().astype(np.int64) - pil).max() <= 1


def test_bad_augment_options_are_refused(data):
    with pytest.raises(ValueError, match="num_classes"):
        ImageFolderLoader(data.folder.train, 4, True, 0, augment=TrainAugment(mixup=0.8))
    with pytest.raises(ValueError, match="training"):
        ImageFolderLoader(data.folder.val, 4, False, 0, augment=DEIT)
    with pytest.raises(ValueError, match="interpolation"):
        ImageFolderLoader(data.folder.val, 4, False, 0, interpolation="lanczos")
    for bad in (dict(reprob=2.0), dict(remode="noise"), dict(rand_augment="rand-q3")):
        with pytest.raises(ValueError):
            TrainAugment(**bad)
