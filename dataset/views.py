"""View ids: one integer per training view the CIFAR loader can produce.

With RandomCrop(padding=p) and a horizontal flip, a training image ``index`` is seen through
one of ``(2p + 1)² × 2`` views (162 for p = 4): crop offsets ``dx, dy`` in ``0 .. 2p`` and a
flip in ``{0, 1}``. The loader reports each sample's view as

    view = ((index · S + dy) · S + dx) · 2 + flip        with S = 2p + 1

so the views of image ``index`` are the consecutive ids ``index · V .. index · V + V - 1``
(``V`` = :func:`views_per_image`), and a table of per-view values has one row per id.
"""
from __future__ import annotations

import torch


def views_per_image(pad: int) -> int:
    """``V = (2 · pad + 1)² · 2``: the distinct crops and flips of one image (162 for pad 4)."""
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    side = 2 * pad + 1
    return side * side * 2


def encode_views(index: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, flip: torch.Tensor,
                 pad: int) -> torch.Tensor:
    """``[B]`` int64 view ids of samples ``index [B]`` cropped at ``dx, dy [B]`` (pixels,
    ``0 .. 2·pad``) and flipped where ``flip [B]`` (bool or 0/1); on ``index``'s device."""
    side = 2 * pad + 1
    return ((index.long() * side + dy.long()) * side + dx.long()) * 2 + flip.long()


def decode_views(views: torch.Tensor, pad: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of :func:`encode_views`: ``(index, dx, dy, flip)``, each ``[B]``, int64
    except ``flip`` (bool)."""
    side = 2 * pad + 1
    views = views.long()
    flip = (views % 2).bool()
    rest = views // 2
    dx = rest % side
    rest = rest // side
    return rest // side, dx, rest % side, flip
