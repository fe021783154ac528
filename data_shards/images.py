"""Image operations shared by builder and loaders: re-encoding (fast) or checked originals (exact), CLIP's resize/crop, augmentation."""

from __future__ import annotations

import io
import math
import random

import numpy as np
from PIL import Image

BICUBIC = Image.Resampling.BICUBIC


def decode(data: bytes, draft_size: int | None = None) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    if draft_size is not None and img.format == "JPEG":
        # JPEG DCT scaling: decode big originals at >= the size we keep, much faster than a full decode.
        img.draft("RGB", (draft_size, draft_size))
    img.load()
    return img if img.mode == "RGB" else img.convert("RGB")


def resize_shorter(img: Image.Image, size: int) -> Image.Image:
    """torchvision's Resize(size) with an int: the shorter side becomes `size`, the longer keeps the ratio."""
    w, h = img.size
    if min(w, h) == size:
        return img
    if w <= h:
        new = (size, int(size * h / w))
    else:
        new = (int(size * w / h), size)
    return img.resize(new, BICUBIC)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    if (w, h) == (size, size):
        return img
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def eval_view(img: Image.Image, size: int) -> Image.Image:
    """CLIP's test transform before ToTensor: Resize(size, bicubic) then CenterCrop(size)."""
    return center_crop(resize_shorter(img, size), size)


def encode_stored(data: bytes, mode: str, size: int, quality: int) -> tuple[bytes, int, int]:
    """Re-encode once for storage: `eval` pre-crops to the evaluation size; `train` caps the shorter side
    at `size` (never upscaling) so RandomResizedCrop still has pixels to crop from."""
    img = decode(data, draft_size=size)
    if mode == "eval":
        img = eval_view(img, size)
    elif min(img.size) > size:
        img = resize_shorter(img, size)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue(), img.size[0], img.size[1]


# PIL format -> the tar member extension an original is stored under in exact mode (MPO: camera JPEGs).
FORMAT_EXTS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "GIF": "gif", "TIFF": "tiff"}


def check_original(data: bytes) -> str:
    """Decode an original fully (as CoOp's loader will, to RGB) to prove it readable; return its extension.
    Exact mode stores these bytes untouched, so every pixel a trial sees comes from the user's own file."""
    img = Image.open(io.BytesIO(data))
    fmt = img.format or ""
    img.load()
    if img.mode != "RGB":
        img.convert("RGB")
    return FORMAT_EXTS.get(fmt, fmt.lower() or "img")


def sample_seed(seed: int, epoch: int, key: str) -> int:
    """Per-sample augmentation seed from (trial seed, epoch, sample key): independent of worker count."""
    import hashlib

    return int.from_bytes(hashlib.blake2b(f"{seed}:{epoch}:{key}".encode(), digest_size=8).digest(), "little")


def crop_box(w: int, h: int, rng: random.Random, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params (same search and fallback), drawing from a per-sample RNG."""
    area = w * h
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = rng.randint(0, h - ch), rng.randint(0, w - cw)
            return left, top, left + cw, top + ch
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        ch, cw = h, int(round(h * ratio[1]))
    else:
        cw, ch = w, h
    top, left = (h - ch) // 2, (w - cw) // 2
    return left, top, left + cw, top + ch


def random_resized_crop(img: Image.Image, size: int, rng: random.Random) -> Image.Image:
    """torchvision's F.resized_crop on a PIL image: crop, then resize the crop. (PIL's resize(box=...) is not
    the same: its filter reads pixels outside the box at the crop's edges.)"""
    return img.crop(crop_box(img.size[0], img.size[1], rng)).resize((size, size), BICUBIC)


def train_array(data: bytes, size: int, seed: int) -> np.ndarray:
    """CLIP/CoOp train transform before normalisation: RandomResizedCrop(bicubic) + horizontal flip."""
    rng = random.Random(seed)
    img = random_resized_crop(decode(data), size, rng)
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(img, dtype=np.uint8)


def eval_array(data: bytes, size: int) -> np.ndarray:
    return np.asarray(eval_view(decode(data), size), dtype=np.uint8)
