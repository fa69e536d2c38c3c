"""Image decoding: PIL on the CPU (always available), nvJPEG on a CUDA device when it imports.

PIL decodes anything ``ImageFolder`` accepts and converts it to RGB, so ILSVRC's grayscale
and CMYK JPEGs and its PNG named ``.JPEG`` come out as ``[3, H, W]`` uint8. The GPU decoder
(``torchvision.io.decode_jpeg(..., device="cuda")``) is only handed 3-component Huffman JPEGs,
recognised from the frame header by :func:`jpeg_frame`; everything else, and any file nvJPEG
refuses, is decoded by PIL. A file that neither can decode raises :class:`DecodeError`.
"""
from __future__ import annotations

import io
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

# What PIL raises on a file it cannot read: unidentified/truncated (OSError), bad values,
# broken headers (SyntaxError, EOFError in some plugins), decompression bombs.
_PIL_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
_GPU_FRAMES = (0xC0, 0xC1, 0xC2)  # baseline, extended sequential, progressive (Huffman)


class DecodeError(Exception):
    """An image that cannot be decoded; the message says why."""


def _pil_to_tensor(handle: Union[str, io.BytesIO]) -> torch.Tensor:
    try:
        with Image.open(handle) as image:
            pixels = np.array(image.convert("RGB"))  # [H, W, 3] uint8, a writable copy
    except _PIL_ERRORS as err:
        raise DecodeError(f"{type(err).__name__}: {err}") from None
    return torch.from_numpy(pixels).permute(2, 0, 1)  # channels-last strides, no copy


def decode_file(path: str) -> torch.Tensor:
    """Decodes an image file with PIL: ``[3, H, W]`` uint8 RGB, CPU.

    Raises:
        DecodeError: unreadable or undecodable file.
    """
    return _pil_to_tensor(path)


def decode_bytes(data: Union[bytes, torch.Tensor]) -> torch.Tensor:
    """Decodes an encoded image held in memory with PIL: ``[3, H, W]`` uint8 RGB, CPU."""
    if isinstance(data, torch.Tensor):
        data = data.cpu().numpy().tobytes()
    return _pil_to_tensor(io.BytesIO(data))


def read_bytes(path: str) -> bytes:
    """The file's bytes. Raises :class:`DecodeError` when it cannot be read."""
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as err:
        raise DecodeError(f"{type(err).__name__}: {err}") from None


def jpeg_frame(data: bytes) -> Optional[tuple[int, int]]:
    """``(SOF marker, number of components)`` from a JPEG's frame header, or None.

    None when ``data`` is not a JPEG (e.g. a PNG named ``.JPEG``) or the header cannot be
    parsed before the first scan. Reads only the marker segments, not the image data.
    """
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    i = 2
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        if marker in (0xDA, 0xD9):  # start of scan or end of image before any frame
            return None
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return (marker, data[i + 9]) if i + 10 <= n else None
        i += 2 + ((data[i + 2] << 8) | data[i + 3])
    return None


def gpu_decodable(data: bytes) -> bool:
    """Whether nvJPEG should be given ``data``: a 3-component baseline or progressive JPEG.

    Grayscale and CMYK/YCCK JPEGs and non-JPEG files go to PIL instead.
    """
    frame = jpeg_frame(data)
    return frame is not None and frame[0] in _GPU_FRAMES and frame[1] == 3 and not adobe_rgb(data)


def adobe_rgb(data: bytes) -> bool:
    """Whether an Adobe APP14 segment before the first scan says the three components are RGB
    (transform 0), not YCbCr: nvJPEG would convert them as YCbCr; PIL reads the flag."""
    i, n = 2, len(data)
    while i + 4 <= n and data[i] == 0xFF and data[i + 1] not in (0xDA, 0xD9):
        length = (data[i + 2] << 8) | data[i + 3]
        if data[i + 1] == 0xEE and data[i + 4:i + 9] == b"Adobe" and i + 15 < n:
            return data[i + 15] == 0
        i += 2 + length
    return False


def nvjpeg_available(device: Union[str, torch.device]) -> bool:
    """True when ``device`` is CUDA and ``torchvision.io.decode_jpeg`` imports."""
    if torch.device(device).type != "cuda":
        return False
    try:
        from torchvision.io import ImageReadMode, decode_jpeg  # noqa: F401
    except (ImportError, OSError, RuntimeError, AttributeError):  # absent or a broken build
        return False
    return True


class BatchDecoder:
    """Decodes encoded images in the main process onto ``device``.

    On CUDA with torchvision, one batched nvJPEG call; when it fails (one bad file fails the
    whole call), each image is retried alone, and an image nvJPEG refuses falls back to PIL.
    Elsewhere (the CPU tests, or CUDA without torchvision) PIL decodes every image and the
    result is moved to ``device``.

    Args:
        device: where the decoded images should live.
        use_nvjpeg: try nvJPEG (only honoured where :func:`nvjpeg_available`).
    """

    def __init__(self, device: Union[str, torch.device], use_nvjpeg: bool = True) -> None:
        self.device = torch.device(device)
        self.use_nvjpeg = use_nvjpeg and nvjpeg_available(self.device)

    def decode(self, encoded: Sequence[torch.Tensor]
               ) -> list[Union[torch.Tensor, DecodeError]]:
        """Decodes 1-D uint8 CPU tensors of file bytes.

        Returns:
            Per input, ``[3, H, W]`` uint8 RGB on the device, or the :class:`DecodeError`
            that explains why it could not be decoded.
        """
        if not encoded:
            return []
        if self.use_nvjpeg:
            try:
                return list(self._nvjpeg(list(encoded)))
            except (RuntimeError, ValueError):
                return [self._one(data) for data in encoded]
        return [self._pil(data) for data in encoded]

    def _nvjpeg(self, encoded):
        from torchvision.io import ImageReadMode, decode_jpeg
        return decode_jpeg(encoded, device=self.device, mode=ImageReadMode.RGB)

    def _one(self, data: torch.Tensor) -> Union[torch.Tensor, DecodeError]:
        try:
            return self._nvjpeg([data])[0]
        except (RuntimeError, ValueError):
            return self._pil(data)

    def _pil(self, data: torch.Tensor) -> Union[torch.Tensor, DecodeError]:
        try:
            return decode_bytes(data).to(self.device)
        except DecodeError as err:
            return err
