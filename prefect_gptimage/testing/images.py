"""Real, cheap images for the fal emulator.

Every generated image is a genuine PNG, JPEG or WebP of the requested size, so download and
verification code is exercised for real. Images differ visibly between prompts and indexes
(colour and layout come from a hash of prompt and index) but there are only a few variants per
(size, format, background), and encoded bytes are cached, so thousands of requests stay cheap.

Example:
    >>> factory = ImageFactory()
    >>> data = factory.render(1024, 1024, "png", transparent=False, variant=variant_for("a cat", 0))
    >>> data[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
    True
"""

from __future__ import annotations

import io
import threading
import zlib
from collections import OrderedDict

from PIL import Image, ImageDraw

#: How many visually different images exist per (size, format, background).
VARIANTS = 8

_PALETTE: tuple[tuple[int, int, int], ...] = (
    (231, 76, 60),
    (46, 204, 113),
    (52, 152, 219),
    (241, 196, 15),
    (155, 89, 182),
    (26, 188, 156),
    (230, 126, 34),
    (236, 240, 241),
)

#: Formats the emulator serves, with the one "wrong_format" faults swap in.
OTHER_FORMAT: dict[str, str] = {"png": "jpeg", "jpeg": "png", "webp": "png"}


def resolve_size(image_size: str) -> tuple[int, int]:
    """``"1536x1024"`` → ``(1536, 1024)``; the edit endpoint's ``auto`` → ``(1024, 1024)``."""
    if image_size == "auto":
        return 1024, 1024
    width, _, height = image_size.partition("x")
    return int(width), int(height)


def variant_for(prompt: str, index: int) -> int:
    """A stable small number picking colour and layout for image ``index`` of ``prompt``."""
    return zlib.crc32(f"{prompt}\x00{index}".encode()) % VARIANTS


def sniff_format(data: bytes) -> str | None:
    """Image format from magic bytes: ``png``, ``jpeg``, ``webp``, ``gif`` or None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    return None


def is_image(data: bytes) -> bool:
    """True when ``data`` is an image Pillow can parse (header and structure checked)."""
    if sniff_format(data) is None:
        return False
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
    except Exception:
        return False
    return True


def _draw(width: int, height: int, transparent: bool, variant: int) -> Image.Image:
    colour = _PALETTE[variant % len(_PALETTE)]
    accent = _PALETTE[(variant + 3) % len(_PALETTE)]
    if transparent:
        img = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    else:
        dark = tuple(c // 4 for c in colour)
        mask = Image.linear_gradient("L").resize((width, height))
        if variant % 2:
            mask = mask.transpose(Image.Transpose.ROTATE_180)
        img = Image.composite(
            Image.new("RGB", (width, height), colour), Image.new("RGB", (width, height), dark), mask
        )
    draw = ImageDraw.Draw(img)
    unit = min(width, height) // 8
    cx = width * (2 + variant % 5) // 8
    cy = height * (2 + (variant * 3) % 5) // 8
    fill = (*accent, 255) if transparent else accent
    draw.ellipse((cx - 2 * unit, cy - 2 * unit, cx + 2 * unit, cy + 2 * unit), fill=fill)
    for k in range(1 + variant % 3):
        x0 = (k + 1) * width // 5
        box = (x0, height - 2 * unit, x0 + unit, height - unit)
        draw.rectangle(box, fill=(*colour, 255) if transparent else (255, 255, 255))
    return img


def encode(img: Image.Image, fmt: str) -> bytes:
    """Encode fast: low PNG compression, WebP method 0; JPEG drops any alpha."""
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, format="PNG", compress_level=1)
    elif fmt == "jpeg":
        img.convert("RGB").save(buf, format="JPEG", quality=85)
    elif fmt == "webp":
        img.save(buf, format="WEBP", quality=80, method=0)
    else:
        raise ValueError(f"unsupported format {fmt!r}")
    return buf.getvalue()


_Key = tuple[int, int, str, bool, int]


class ImageFactory:
    """Renders and caches encoded images; safe to call from many threads at once.

    Concurrent callers asking for the same image wait for one encoder instead of all encoding.
    """

    def __init__(self, max_entries: int = 256) -> None:
        self._max = max_entries
        self._lock = threading.Lock()
        self._cache: OrderedDict[_Key, bytes] = OrderedDict()
        self._key_locks: dict[_Key, threading.Lock] = {}

    def render(
        self, width: int, height: int, fmt: str, *, transparent: bool, variant: int
    ) -> bytes:
        """Encoded bytes of a ``width`` x ``height`` image in ``fmt`` (png, jpeg or webp)."""
        transparent = transparent and fmt != "jpeg"
        key: _Key = (width, height, fmt, transparent, variant % VARIANTS)
        with self._lock:
            data = self._cache.get(key)
            if data is not None:
                self._cache.move_to_end(key)
                return data
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                data = self._cache.get(key)
            if data is not None:
                return data
            data = encode(_draw(width, height, transparent, variant), fmt)
            with self._lock:
                self._cache[key] = data
                while len(self._cache) > self._max:
                    self._cache.popitem(last=False)
                self._key_locks.pop(key, None)
        return data
