"""The on-device loader: reference augmentation statistics, exact pixels, order, resume."""
from __future__ import annotations

import io

import pytest
import torch

from dataset import CIFAR100_MEAN, CIFAR100_STD, DeviceLoader, augment, draw_augmentation
from dataset import normalize
from errors import UserError

MEAN, STD = CIFAR100_MEAN, CIFAR100_STD
# 0.999 quantiles of chi-square (computed with mpmath): a correct sampler fails 1 in 1000.
CHI2_999 = {1: 10.8276, 8: 26.1245, 80: 124.8392, 161: 222.1914}


def chi_square(counts: torch.Tensor) -> float:
    """Pearson statistic of ``counts`` against the uniform distribution over its cells."""
    counts = counts.double().flatten()
    expected = counts.sum() / counts.numel()
    return float(((counts - expected) ** 2 / expected).sum())


def reference_normalise(x: torch.Tensor) -> torch.Tensor:
    """``(x / 255 - mean) / std`` written out, on a ``[B, 3, H, W]`` tensor."""
    mean = torch.tensor(MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float32).view(1, 3, 1, 1)
    return (x.float() / 255 - mean) / std


def random_images(n: int, seed: int = 0, size: int = 32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=gen, dtype=torch.uint8)


def position_images(n: int) -> torch.Tensor:
    """Channel 0 holds row + 1, channel 1 col + 1, channel 2 a marker: crops reveal offsets."""
    rows = torch.arange(1, 33, dtype=torch.uint8)
    image = torch.stack([rows[:, None].expand(32, 32), rows[None, :].expand(32, 32),
                         torch.full((32, 32), 200, dtype=torch.uint8)])
    return image.expand(n, 3, 32, 32).contiguous()


def recover_draws(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reads ``(dx, dy, flip)`` back from crops of :func:`position_images`."""
    mean = torch.tensor(MEAN[:2]).view(1, 2, 1)
    std = torch.tensor(STD[:2]).view(1, 2, 1)
    centre = out[:, :2, 16, 16:18]  # never padding: |offset - 4| <= 4 < 16
    pixels = ((centre * std + mean) * 255).round().long() - 1  # [B, 2 (row, col), 2]
    row, col, col_right = pixels[:, 0, 0], pixels[:, 1, 0], pixels[:, 1, 1]
    flip = col_right < col
    dy = row - 16 + 4
    dx = torch.where(flip, col - 15 + 4, col - 16 + 4)
    return dx, dy, flip


def run_epoch(loader: DeviceLoader) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    return [tuple(t.clone() for t in batch) for batch in loader]


# --- augmentation ---------------------------------------------------------------------------

def test_draw_distribution_matches_the_reference():
    gen = torch.Generator().manual_seed(1234)
    dx, dy, flip = draw_augmentation(40_500, gen, "cpu")
    assert dx.dtype == dy.dtype == torch.int64 and flip.dtype == torch.bool
    assert int(dx.min()) == 0 and int(dx.max()) == 8 and int(dy.min()) == 0 and int(dy.max()) == 8
    assert chi_square(torch.bincount(dx, minlength=9)) < CHI2_999[8]
    assert chi_square(torch.bincount(dy, minlength=9)) < CHI2_999[8]
    assert chi_square(torch.bincount(flip.long(), minlength=2)) < CHI2_999[1]
    # Uniform over all 81 (dx, dy) cells: uniform margins and independence together.
    assert chi_square(torch.bincount(dx * 9 + dy, minlength=81)) < CHI2_999[80]
    # ... and over all 162 (dx, dy, flip) combinations: flips independent of offsets.
    assert chi_square(torch.bincount(dx * 18 + dy * 2 + flip.long(), minlength=162)) < CHI2_999[161]


def test_known_crop_reproduces_the_right_pixels():
    image = random_images(1, seed=3)
    for dx, dy in [(0, 0), (3, 6), (8, 8), (8, 1), (4, 4)]:
        out = augment(image, torch.tensor([dx]), torch.tensor([dy]), torch.tensor([False]),
                      MEAN, STD)
        expected = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
        for i in range(32):
            for j in range(32):
                y, x = i + dy - 4, j + dx - 4
                if 0 <= y < 32 and 0 <= x < 32:
                    expected[0, :, i, j] = image[0, :, y, x]
        torch.testing.assert_close(out, reference_normalise(expected), rtol=0, atol=1e-6)
        # With the crop at (4, 4), the result is the image itself.
        if (dx, dy) == (4, 4):
            torch.testing.assert_close(out, reference_normalise(image), rtol=0, atol=1e-6)


def test_padding_is_exactly_the_normalised_zero():
    images = torch.full((2, 3, 32, 32), 255, dtype=torch.uint8)
    out = augment(images, torch.tensor([0, 8]), torch.tensor([0, 8]), torch.tensor([False, True]),
                  MEAN, STD)
    zero = reference_normalise(torch.zeros(1, 3, 1, 1))[0, :, 0, 0]  # -mean / std
    for c in range(3):
        assert (out[0, c, :4, :] == zero[c]).all() and (out[0, c, :, :4] == zero[c]).all()
        assert (out[1, c, -4:, :] == zero[c]).all() and (out[1, c, :, :4] == zero[c]).all()
        assert (out[0, c, 4:, 4:] != zero[c]).all()
    assert int((out == zero.view(1, 3, 1, 1)).sum()) == 2 * 3 * (32 * 32 - 28 * 28)


def test_flip_mirrors_the_crop():
    images = random_images(9, seed=4)
    dx, dy = torch.arange(9), torch.arange(9).flip(0)
    plain = augment(images, dx, dy, torch.zeros(9, dtype=torch.bool), MEAN, STD)
    flipped = augment(images, dx, dy, torch.ones(9, dtype=torch.bool), MEAN, STD)
    torch.testing.assert_close(flipped, plain.flip(-1), rtol=0, atol=1e-6)
    assert not torch.equal(flipped, plain)


def test_channels_last_has_the_same_values():
    images = random_images(5, seed=5)
    draws = draw_augmentation(5, torch.Generator().manual_seed(0))
    a = augment(images, *draws, MEAN, STD)
    b = augment(images, *draws, MEAN, STD, memory_format=torch.channels_last)
    assert b.is_contiguous(memory_format=torch.channels_last) and not b.is_contiguous()
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    torch.testing.assert_close(normalize(images, MEAN, STD), reference_normalise(images),
                               rtol=0, atol=1e-6)


# --- the loader -----------------------------------------------------------------------------

def test_loader_draws_have_the_reference_distribution():
    images, labels = position_images(500), torch.zeros(500, dtype=torch.long)
    loader = DeviceLoader(images, labels, 128, MEAN, STD, train=True, seed=7)
    draws = []
    for epoch in range(16):
        for out, _, index in loader:
            dx, dy, flip = recover_draws(out)
            if epoch == 0:  # every pixel is the reference augmentation with those draws
                expected = augment(images[index], dx, dy, flip, MEAN, STD)
                assert float((out - expected).abs().max()) <= 1e-6
            draws.append(torch.stack([dx, dy, flip.long()]))
    dx, dy, flip = torch.cat(draws, dim=1)
    assert chi_square(torch.bincount(dx, minlength=9)) < CHI2_999[8]
    assert chi_square(torch.bincount(dy, minlength=9)) < CHI2_999[8]
    assert chi_square(torch.bincount(flip, minlength=2)) < CHI2_999[1]
    assert chi_square(torch.bincount(dx * 9 + dy, minlength=81)) < CHI2_999[80]


def test_every_index_once_per_epoch_with_last_partial_batch():
    images, labels = random_images(103), torch.arange(103) % 7
    loader = DeviceLoader(images, labels, 10, MEAN, STD, train=True, seed=0)
    assert len(loader) == 11
    for _ in range(2):
        batches = run_epoch(loader)
        assert [len(b[0]) for b in batches] == [10] * 10 + [3]
        index = torch.cat([b[2] for b in batches])
        assert torch.equal(index.sort().values, torch.arange(103))
        for out, lab, idx in batches:
            assert out.dtype == torch.float32 and out.shape[1:] == (3, 32, 32)
            assert lab.dtype == idx.dtype == torch.int64 and torch.equal(lab, labels[idx])
    dropping = DeviceLoader(images, labels, 10, MEAN, STD, train=True, seed=0, drop_last=True)
    assert len(dropping) == 10 and [len(b[0]) for b in run_epoch(dropping)] == [10] * 10


@pytest.mark.parametrize("n", [104, 103])
def test_two_ranks_share_one_permutation(n):
    images, labels = random_images(n), torch.arange(n)
    single = torch.cat([b[2] for b in DeviceLoader(images, labels, 8, MEAN, STD, True, 3)])
    ranks = [DeviceLoader(images, labels, 8, MEAN, STD, True, 3, rank=r, world_size=2)
             for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 7
    shards = [run_epoch(loader) for loader in ranks]
    index = [torch.cat([b[2] for b in shard]) for shard in shards]
    padded = torch.cat([single, single[: 2 * 52 - n]])
    assert torch.equal(index[0], padded[0::2]) and torch.equal(index[1], padded[1::2])
    union = torch.cat(index)
    assert torch.equal(torch.unique(union), torch.arange(n)) and len(union) == 104


def test_ranks_draw_different_augmentations():
    images, labels = position_images(64), torch.arange(64)
    draws = []
    for rank in range(2):
        loader = DeviceLoader(images, labels, 32, MEAN, STD, True, 3, rank=rank, world_size=2)
        out, _, _ = next(iter(loader))
        draws.append(torch.stack(recover_draws(out)[:2]))
    assert (draws[0] != draws[1]).any(dim=0).float().mean() > 0.5


def test_resume_between_epochs_is_exact():
    images, labels = random_images(50), torch.arange(50)
    make = lambda: DeviceLoader(images, labels, 16, MEAN, STD, train=True, seed=11)  # noqa: E731
    run = make()
    epoch1 = run_epoch(run)
    buffer = io.BytesIO()
    torch.save(run.state_dict(), buffer)
    epoch2 = run_epoch(run)
    assert not torch.equal(epoch1[0][2], epoch2[0][2])  # a new permutation each epoch

    resumed = make()
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for a, b in zip(epoch2, run_epoch(resumed)):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    fresh = run_epoch(make())  # without the state, a new loader repeats epoch 1
    assert all(torch.equal(x, y) for x, y in zip(fresh[0], epoch1[0]))


def test_rank_zero_state_resumes_another_rank():
    images, labels = random_images(40), torch.arange(40)
    ranks = [DeviceLoader(images, labels, 8, MEAN, STD, True, 5, rank=r, world_size=2)
             for r in range(2)]
    for loader in ranks:
        run_epoch(loader)
    saved = ranks[0].state_dict()
    expected = run_epoch(ranks[1])
    resumed = DeviceLoader(images, labels, 8, MEAN, STD, True, 5, rank=1, world_size=2)
    resumed.load_state_dict(saved)
    for a, b in zip(expected, run_epoch(resumed)):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    other_seed = DeviceLoader(images, labels, 8, MEAN, STD, True, 6)
    with pytest.raises(UserError, match="--seed 5"):
        other_seed.load_state_dict(saved)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_test_mode_is_plain_normalisation_in_order(memory_format):
    images, labels = random_images(23, seed=9), torch.arange(23) * 2
    loader = DeviceLoader(images, labels, 5, MEAN, STD, train=False, seed=0,
                          memory_format=memory_format)
    for _ in range(2):  # every epoch identical
        batches = run_epoch(loader)
        assert [len(b[0]) for b in batches] == [5, 5, 5, 5, 3]
        out = torch.cat([b[0] for b in batches])
        assert torch.equal(torch.cat([b[2] for b in batches]), torch.arange(23))
        assert torch.equal(torch.cat([b[1] for b in batches]), labels)
        torch.testing.assert_close(out, reference_normalise(images), rtol=0, atol=1e-6)
        assert batches[0][0].is_contiguous(memory_format=memory_format)
    shard = DeviceLoader(images, labels, 5, MEAN, STD, False, 0, rank=1, world_size=2)
    assert torch.equal(torch.cat([b[2] for b in shard]), torch.arange(1, 23, 2))


def test_channels_last_loader_matches_contiguous():
    images, labels = random_images(30), torch.arange(30)
    a = run_epoch(DeviceLoader(images, labels, 8, MEAN, STD, True, 2))
    b = run_epoch(DeviceLoader(images, labels, 8, MEAN, STD, True, 2,
                               memory_format=torch.channels_last))
    for x, y in zip(a, b):
        assert y[0].is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(x[0], y[0], rtol=0, atol=1e-6)
        assert torch.equal(x[2], y[2])


def test_bad_arguments_are_refused():
    images, labels = random_images(4), torch.arange(4)
    with pytest.raises(ValueError, match="uint8"):
        DeviceLoader(images.float(), labels, 2, MEAN, STD, True, 0)
    with pytest.raises(ValueError, match="rank"):
        DeviceLoader(images, labels, 2, MEAN, STD, True, 0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="3 values"):
        DeviceLoader(images, labels, 2, MEAN[:2], STD, True, 0)
    with pytest.raises(ValueError, match="0..8"):
        augment(images[:1], torch.tensor([9]), torch.tensor([0]), torch.tensor([False]), MEAN, STD)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_loader_matches_the_cpu_reference():
    images, labels = position_images(64), torch.arange(64)
    loader = DeviceLoader(images.cuda(), labels.cuda(), 16, MEAN, STD, True, 0)
    draws = []
    for out, lab, index in loader:
        assert out.is_cuda and lab.is_cuda and index.is_cuda
        out, index = out.cpu(), index.cpu()
        dx, dy, flip = recover_draws(out)
        torch.testing.assert_close(out, augment(images[index], dx, dy, flip, MEAN, STD),
                                   rtol=0, atol=1e-6)
        assert torch.equal(lab.cpu(), labels[index])
        draws.append(dx * 18 + dy * 2 + flip.long())
    assert len(torch.unique(torch.cat(draws))) > 40  # the draws really vary
    random = random_images(8)
    draws = draw_augmentation(8, torch.Generator().manual_seed(1))
    torch.testing.assert_close(augment(random.cuda(), *draws, MEAN, STD).cpu(),
                               augment(random, *draws, MEAN, STD), rtol=0, atol=1e-6)
