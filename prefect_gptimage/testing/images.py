"""Real, cheap images for the fal emulator.

Every generated image is a genuine PNG, JPEG or WebP of the requested size, so download and
verification code is exercised for real. Images differ visibly between prompts and indexes
(colour and layout come from a hash of prompt and index) but there are only a few variants per
(size, format, background), and encoded bytes are cached, so thousands of requests stay cheap.

A prompt that quotes text (``a sign that says "OPEN"``, or “curly quotes”) gets that text drawn
legibly on a light panel across the image, large and dark, in Pillow's bundled font (no system
font needed), so OCR can read it back. :func:`misspell` alters one letter of it at a given rate,
which is how the emulator lets an OCR gate be tested. Prompts without quotes draw no text.

Example:
    >>> factory = ImageFactory()
    >>> data = factory.render(1024, 1024, "png", transparent=False, variant=variant_for("a cat", 0))
    >>> data[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
    True
"""

from __future__ import annotations

import hashlib
import io
import string
import threading
import zlib
from collections import OrderedDict

from PIL import Image, ImageDraw, ImageFont

from prefect_gptimage.quality.text import quoted_text

__all__ = [
    "OTHER_FORMAT",
    "VARIANTS",
    "ImageFactory",
    "encode",
    "is_image",
    "misspell",
    "quoted_text",
    "resolve_size",
    "sniff_format",
    "variant_for",
]

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


def misspell(text: str, rate: float, key: str) -> str:
    """``text`` with one letter swapped or replaced, with probability ``rate``; else ``text``.

    Deterministic: the roll, the letter and the change all come from a hash of ``key``, so the
    same key always gives the same answer. A swap exchanges a letter with the next one (when they
    differ); a replacement puts another letter, in the same case, in its place.

    Example:
        >>> misspell("GRAND OPENING", 0.0, "k")
        'GRAND OPENING'
        >>> misspell("GRAND OPENING", 1.0, "k") != "GRAND OPENING"
        True
    """
    positions = [i for i, ch in enumerate(text) if ch.isascii() and ch.isalpha()]
    if not positions or rate <= 0:
        return text
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
    if int.from_bytes(digest[:8], "big") / 2**64 >= rate:
        return text
    pos = positions[int.from_bytes(digest[8:12], "big") % len(positions)]
    chars = list(text)
    swap_with = pos + 1
    if digest[12] % 2 and swap_with in positions and chars[swap_with].lower() != chars[pos].lower():
        chars[pos], chars[swap_with] = chars[swap_with], chars[pos]
        return "".join(chars)
    letters = [c for c in string.ascii_lowercase if c != chars[pos].lower()]
    new = letters[digest[13] % len(letters)]
    chars[pos] = new.upper() if chars[pos].isupper() else new
    return "".join(chars)


#: Widest a line of drawn text may be, as a fraction of the image width.
_TEXT_WIDTH = 0.7


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled font at ``size`` px (FreeType), or its small bitmap font without it."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1, or built without FreeType
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: object, max_width: int) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and draw.textlength(candidate, font=font) <= max_width:  # type: ignore[arg-type]
            lines[-1] = candidate
        else:
            lines.append(word)
    return lines


def _draw_text(img: Image.Image, text: str) -> Image.Image:
    """Draw ``text`` dark on a light panel, as large as fits (at most ~1/9 of the height)."""
    width, height = img.size
    draw = ImageDraw.Draw(img)
    size = max(12, height // 9)
    while True:
        font = _font(size)
        lines = _wrap(draw, text, font, int(width * _TEXT_WIDTH))
        line_height = int(size * 1.3)
        widest = max(draw.textlength(line, font=font) for line in lines)  # type: ignore[arg-type]
        fits = widest <= width * _TEXT_WIDTH and line_height * len(lines) <= height * 0.8
        if fits or size <= 12:
            break
        size = int(size * 0.85)
    if not isinstance(font, ImageFont.FreeTypeFont) and size > 11:
        return _draw_text_scaled(img, lines)
    block = line_height * len(lines)
    top = (height - block) // 2
    pad = size // 2
    draw.rectangle(
        (width // 20, top - pad, width - width // 20, top + block + pad), fill=(246, 244, 238, 255)
    )
    for k, line in enumerate(lines):
        draw.text(
            (width // 2, top + k * line_height + line_height // 2),
            line,
            font=font,
            fill=(20, 20, 24, 255),
            anchor="mm",
        )
    return img


def _draw_text_scaled(img: Image.Image, lines: list[str]) -> Image.Image:
    """Without FreeType: the bitmap font drawn small, then scaled up to a legible size."""
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    boxes = [probe.textbbox((0, 0), line, font=font) for line in lines]
    w = int(max(b[2] for b in boxes)) + 4
    h = 14 * len(lines) + 4
    small = Image.new("L", (w, h), 238)
    draw = ImageDraw.Draw(small)
    for k, line in enumerate(lines):
        draw.text((2, 2 + 14 * k), line, font=font, fill=20)
    scale = max(1, min(img.width * 9 // 10 // w, img.height * 8 // 10 // h))
    big = small.resize((w * scale, h * scale), Image.Resampling.NEAREST).convert(img.mode)
    img.paste(big, ((img.width - big.width) // 2, (img.height - big.height) // 2))
    return img


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


_Key = tuple[int, int, str, bool, int, str]


class ImageFactory:
    """Renders and caches encoded images; safe to call from many threads at once.

    Concurrent callers asking for the same image wait for one encoder instead of all encoding.
    Images with text are many and distinct, so at most ``max_text_entries`` of them are kept.
    """

    def __init__(self, max_entries: int = 256, max_text_entries: int = 32) -> None:
        self._max = max_entries
        self._max_text = max_text_entries
        self._lock = threading.Lock()
        self._cache: OrderedDict[_Key, bytes] = OrderedDict()
        self._key_locks: dict[_Key, threading.Lock] = {}

    def render(
        self,
        width: int,
        height: int,
        fmt: str,
        *,
        transparent: bool,
        variant: int,
        text: str = "",
    ) -> bytes:
        """Encoded bytes of a ``width`` x ``height`` image in ``fmt`` (png, jpeg or webp).

        ``text``, when given, is drawn legibly across the middle (see the module docs).
        """
        transparent = transparent and fmt != "jpeg"
        key: _Key = (width, height, fmt, transparent, variant % VARIANTS, text)
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
            img = _draw(width, height, transparent, variant)
            data = encode(_draw_text(img, text) if text else img, fmt)
            with self._lock:
                self._cache[key] = data
                self._evict_locked()
                self._key_locks.pop(key, None)
        return data

    def _evict_locked(self) -> None:
        while len(self._cache) > self._max:
            self._cache.popitem(last=False)
        with_text = [k for k in self._cache if k[5]]
        for k in with_text[: max(0, len(with_text) - self._max_text)]:
            del self._cache[k]
