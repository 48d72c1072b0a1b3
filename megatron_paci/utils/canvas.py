"""A tiny RGB raster canvas with a PNG writer, so the framework can draw loss curves and
pipeline timelines without depending on matplotlib or Pillow.

Coordinates are pixels with the origin at the top-left; x grows right, y grows down.
Rectangles are half-open: ``fill_rect(x0, y0, x1, y1)`` paints ``x0 <= x < x1`` and
``y0 <= y < y1``. Lines include both end points. Everything is clipped to the canvas.
"""

from __future__ import annotations

import os
import struct
import tempfile
import zlib
from collections.abc import Iterable, Sequence

import numpy as np

Color = tuple[int, int, int]

# Distinct colours for plot series / micro-batches; chosen to stay apart on white and to
# keep black text readable on most of them.
PALETTE: list[Color] = [
    (0, 114, 178),  # blue
    (230, 97, 0),  # orange
    (0, 158, 115),  # green
    (204, 51, 51),  # red
    (117, 84, 181),  # purple
    (140, 86, 60),  # brown
    (214, 90, 170),  # pink
    (110, 110, 110),  # grey
    (170, 160, 0),  # olive
    (0, 170, 200),  # cyan
    (30, 40, 120),  # navy
    (250, 180, 40),  # gold
]

# ---------------------------------------------------------------------------------------
# 5x7 bitmap font. Each glyph is 7 rows of 5 columns above the baseline; '#' is ink.
# Lower-case g j p q y add 2 descender rows below the baseline, so the text block is 9 rows
# tall while ``text_height`` (used for alignment) stays the 7-row body.
# ---------------------------------------------------------------------------------------
_GLYPH_ROWS: dict[str, str] = {
    " ": "..... ..... ..... ..... ..... ..... .....",
    "0": ".###. #...# #..## #.#.# ##..# #...# .###.",
    "1": "..#.. .##.. ..#.. ..#.. ..#.. ..#.. .###.",
    "2": ".###. #...# ....# ...#. ..#.. .#... #####",
    "3": "##### ...#. ..#.. ...#. ....# #...# .###.",
    "4": "...#. ..##. .#.#. #..#. ##### ...#. ...#.",
    "5": "##### #.... ####. ....# ....# #...# .###.",
    "6": "..##. .#... #.... ####. #...# #...# .###.",
    "7": "##### ....# ...#. ..#.. .#... .#... .#...",
    "8": ".###. #...# #...# .###. #...# #...# .###.",
    "9": ".###. #...# #...# .#### ....# ...#. .##..",
    "A": ".###. #...# #...# ##### #...# #...# #...#",
    "B": "####. #...# #...# ####. #...# #...# ####.",
    "C": ".###. #...# #.... #.... #.... #...# .###.",
    "D": "###.. #..#. #...# #...# #...# #..#. ###..",
    "E": "##### #.... #.... ####. #.... #.... #####",
    "F": "##### #.... #.... ####. #.... #.... #....",
    "G": ".###. #...# #.... #.### #...# #...# .####",
    "H": "#...# #...# #...# ##### #...# #...# #...#",
    "I": ".###. ..#.. ..#.. ..#.. ..#.. ..#.. .###.",
    "J": "..### ...#. ...#. ...#. ...#. #..#. .##..",
    "K": "#...# #..#. #.#.. ##... #.#.. #..#. #...#",
    "L": "#.... #.... #.... #.... #.... #.... #####",
    "M": "#...# ##.## #.#.# #.#.# #...# #...# #...#",
    "N": "#...# #...# ##..# #.#.# #..## #...# #...#",
    "O": ".###. #...# #...# #...# #...# #...# .###.",
    "P": "####. #...# #...# ####. #.... #.... #....",
    "Q": ".###. #...# #...# #...# #.#.# #..#. .##.#",
    "R": "####. #...# #...# ####. #.#.. #..#. #...#",
    "S": ".#### #.... #.... .###. ....# ....# ####.",
    "T": "##### ..#.. ..#.. ..#.. ..#.. ..#.. ..#..",
    "U": "#...# #...# #...# #...# #...# #...# .###.",
    "V": "#...# #...# #...# #...# #...# .#.#. ..#..",
    "W": "#...# #...# #...# #.#.# #.#.# #.#.# .#.#.",
    "X": "#...# #...# .#.#. ..#.. .#.#. #...# #...#",
    "Y": "#...# #...# .#.#. ..#.. ..#.. ..#.. ..#..",
    "Z": "##### ....# ...#. ..#.. .#... #.... #####",
    "a": "..... ..... .###. ....# .#### #...# .####",
    "b": "#.... #.... #.##. ##..# #...# #...# ####.",
    "c": "..... ..... .###. #.... #.... #...# .###.",
    "d": "....# ....# .##.# #..## #...# #...# .####",
    "e": "..... ..... .###. #...# ##### #.... .###.",
    "f": "..##. .#..# .#... ###.. .#... .#... .#...",
    "g": "..... ..... .#### #...# #...# #...# .#### ....# .###.",
    "h": "#.... #.... #.##. ##..# #...# #...# #...#",
    "i": "..#.. ..... .##.. ..#.. ..#.. ..#.. .###.",
    "j": "...#. ..... ..##. ...#. ...#. ...#. ...#. #..#. .##..",
    "k": "#.... #.... #..#. #.#.. ##... #.#.. #..#.",
    "l": ".##.. ..#.. ..#.. ..#.. ..#.. ..#.. .###.",
    "m": "..... ..... ##.#. #.#.# #.#.# #...# #...#",
    "n": "..... ..... #.##. ##..# #...# #...# #...#",
    "o": "..... ..... .###. #...# #...# #...# .###.",
    "p": "..... ..... ####. #...# #...# #...# ####. #.... #....",
    "q": "..... ..... .#### #...# #...# #...# .#### ....# ....#",
    "r": "..... ..... #.##. ##..# #.... #.... #....",
    "s": "..... ..... .#### #.... .###. ....# ####.",
    "t": ".#... .#... ###.. .#... .#... .#..# ..##.",
    "u": "..... ..... #...# #...# #...# #..## .##.#",
    "v": "..... ..... #...# #...# #...# .#.#. ..#..",
    "w": "..... ..... #...# #...# #.#.# #.#.# .#.#.",
    "x": "..... ..... #...# .#.#. ..#.. .#.#. #...#",
    "y": "..... ..... #...# #...# #...# #...# .#### ....# .###.",
    "z": "..... ..... ##### ...#. ..#.. .#... #####",
    ".": "..... ..... ..... ..... ..... .##.. .##..",
    ",": "..... ..... ..... ..... .##.. ..#.. .#...",
    ":": "..... .##.. .##.. ..... .##.. .##.. .....",
    ";": "..... .##.. .##.. ..... .##.. ..#.. .#...",
    "-": "..... ..... ..... ##### ..... ..... .....",
    "+": "..... ..#.. ..#.. ##### ..#.. ..#.. .....",
    "/": "..... ....# ...#. ..#.. .#... #.... .....",
    "(": "...#. ..#.. .#... .#... .#... ..#.. ...#.",
    ")": ".#... ..#.. ...#. ...#. ...#. ..#.. .#...",
    "[": ".###. .#... .#... .#... .#... .#... .###.",
    "]": ".###. ...#. ...#. ...#. ...#. ...#. .###.",
    "=": "..... ..... ##### ..... ##### ..... .....",
    "%": "##... ##..# ...#. ..#.. .#... #..## ...##",
    "_": "..... ..... ..... ..... ..... ..... #####",
    "'": "..#.. ..#.. .#... ..... ..... ..... .....",
    "!": "..#.. ..#.. ..#.. ..#.. ..#.. ..... ..#..",
    "?": ".###. #...# ....# ...#. ..#.. ..... ..#..",
    "<": "...#. ..#.. .#... #.... .#... ..#.. ...#.",
    ">": ".#... ..#.. ...#. ....# ...#. ..#.. .#...",
    "*": "..... ..#.. #.#.# .###. #.#.# ..#.. .....",
    "#": ".#.#. .#.#. ##### .#.#. ##### .#.#. .#.#.",
}

GLYPH_W = 5
GLYPH_H = 7  # body height: rows above the baseline
GLYPH_DESCENT = 2  # extra rows below the baseline (g j p q y)
_ADVANCE = GLYPH_W + 1  # one blank column between glyphs


def _parse_glyph(rows: str) -> np.ndarray:
    lines = rows.split()
    assert len(lines) in (GLYPH_H, GLYPH_H + GLYPH_DESCENT), rows
    assert all(len(r) == GLYPH_W for r in lines), rows
    lines += ["." * GLYPH_W] * (GLYPH_H + GLYPH_DESCENT - len(lines))
    return np.array([[c == "#" for c in r] for r in lines], dtype=bool)


_GLYPHS: dict[str, np.ndarray] = {ch: _parse_glyph(rows) for ch, rows in _GLYPH_ROWS.items()}
FONT_CHARS: str = "".join(_GLYPHS)


def _rgb(color: Sequence[int]) -> np.ndarray:
    c = np.asarray(color, dtype=np.int64).reshape(-1)
    if c.shape != (3,):
        raise ValueError(f"colour must be an (r, g, b) triple, got {color!r}")
    return np.clip(c, 0, 255).astype(np.uint8)


def _round(v: float) -> int:
    """Round half up, so pixel centres do not depend on banker's rounding."""
    return int(np.floor(float(v) + 0.5))


def text_mask(s: str, scale: int = 1) -> np.ndarray:
    """Boolean ink mask [(7 + 2) * scale, text_width] for ``s`` (body rows, then descender
    rows); unknown characters draw as '?'."""
    if scale < 1:
        raise ValueError("scale must be >= 1")
    rows = GLYPH_H + GLYPH_DESCENT
    if not s:
        return np.zeros((rows * scale, 0), dtype=bool)
    mask = np.zeros((rows, _ADVANCE * len(s) - 1), dtype=bool)
    for i, ch in enumerate(s):
        mask[:, i * _ADVANCE : i * _ADVANCE + GLYPH_W] = _GLYPHS.get(ch, _GLYPHS["?"])
    if scale > 1:
        mask = np.repeat(np.repeat(mask, scale, axis=0), scale, axis=1)
    return mask


def _clip_segment(
    x0: float, y0: float, x1: float, y1: float, xmin: float, ymin: float, xmax: float, ymax: float
) -> tuple[float, float, float, float] | None:
    """Liang-Barsky: keep only the part of the segment inside the box (None if none).

    Needed so that a line to a far-away point does not rasterise millions of pixels.
    """
    dx, dy = x1 - x0, y1 - y0
    t0, t1 = 0.0, 1.0
    for p, q in ((-dx, x0 - xmin), (dx, xmax - x0), (-dy, y0 - ymin), (dy, ymax - y0)):
        if p == 0:
            if q < 0:
                return None
            continue
        t = q / p
        if p < 0:
            if t > t1:
                return None
            t0 = max(t0, t)
        else:
            if t < t0:
                return None
            t1 = min(t1, t)
    if t0 == 0.0 and t1 == 1.0:
        return x0, y0, x1, y1
    return x0 + t0 * dx, y0 + t0 * dy, x0 + t1 * dx, y0 + t1 * dy


def _raster_segments(
    ax: np.ndarray, ay: np.ndarray, bx: np.ndarray, by: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Pixels of integer segments a->b (both ends included), one per major-axis step.

    Exact integer arithmetic up to the final division keeps horizontal, vertical and 45
    degree lines pixel-exact.
    """
    dx, dy = bx - ax, by - ay
    n = np.maximum(np.abs(dx), np.abs(dy)) + 1
    seg = np.repeat(np.arange(len(n)), n)
    k = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
    denom = np.maximum(n - 1, 1)[seg]
    xs = ax[seg] + np.floor(k * dx[seg] / denom + 0.5).astype(np.int64)
    ys = ay[seg] + np.floor(k * dy[seg] / denom + 0.5).astype(np.int64)
    return xs, ys


class Canvas:
    """RGB uint8 image ([H, W, 3], origin top-left) with a few clipped drawing primitives."""

    def __init__(self, width: int, height: int, background: Sequence[int] = (255, 255, 255)):
        if width <= 0 or height <= 0:
            raise ValueError(f"canvas size must be positive, got {width}x{height}")
        self.width = int(width)
        self.height = int(height)
        self.background: Color = tuple(int(c) for c in _rgb(background))  # type: ignore[assignment]
        self.pixels = np.empty((self.height, self.width, 3), dtype=np.uint8)
        self.pixels[:] = _rgb(background)

    # -- filled shapes ------------------------------------------------------------------
    def fill_rect(self, x0: float, y0: float, x1: float, y1: float, color: Sequence[int]) -> None:
        """Paint ``x0 <= x < x1``, ``y0 <= y < y1`` (corners may come in either order)."""
        xa, xb = sorted((_round(x0), _round(x1)))
        ya, yb = sorted((_round(y0), _round(y1)))
        xa, xb = max(xa, 0), min(xb, self.width)
        ya, yb = max(ya, 0), min(yb, self.height)
        if xa < xb and ya < yb:
            self.pixels[ya:yb, xa:xb] = _rgb(color)

    def rect_outline(
        self, x0: float, y0: float, x1: float, y1: float, color: Sequence[int], width: int = 1
    ) -> None:
        """Border of the same half-open rectangle as ``fill_rect``, ``width`` pixels inward."""
        xa, xb = sorted((_round(x0), _round(x1)))
        ya, yb = sorted((_round(y0), _round(y1)))
        w = max(int(width), 1)
        self.fill_rect(xa, ya, xb, min(ya + w, yb), color)  # top
        self.fill_rect(xa, max(yb - w, ya), xb, yb, color)  # bottom
        self.fill_rect(xa, ya, min(xa + w, xb), yb, color)  # left
        self.fill_rect(max(xb - w, xa), ya, xb, yb, color)  # right

    # -- lines --------------------------------------------------------------------------
    def _stamp(self, xs: np.ndarray, ys: np.ndarray, color: np.ndarray, width: int) -> None:
        """Set pixels (xs, ys), thickened to a width x width square, dropping off-canvas ones."""
        w = max(int(width), 1)
        lo = -((w - 1) // 2)
        for oy in range(lo, lo + w):
            for ox in range(lo, lo + w):
                px, py = xs + ox, ys + oy
                keep = (px >= 0) & (px < self.width) & (py >= 0) & (py < self.height)
                self.pixels[py[keep], px[keep]] = color

    def line(
        self, x0: float, y0: float, x1: float, y1: float, color: Sequence[int], width: int = 1
    ) -> None:
        """Straight line including both end points, one pixel per step along the major axis."""
        pad = max(int(width), 1) + 1
        clipped = _clip_segment(
            float(x0), float(y0), float(x1), float(y1),
            -pad, -pad, self.width - 1 + pad, self.height - 1 + pad,
        )  # fmt: skip
        if clipped is None:
            return
        ax, ay, bx, by = (_round(v) for v in clipped)
        xs, ys = _raster_segments(np.array([ax]), np.array([ay]), np.array([bx]), np.array([by]))
        self._stamp(xs, ys, _rgb(color), width)

    def polyline(
        self, points: Iterable[tuple[float, float]], color: Sequence[int], width: int = 1
    ) -> None:
        """Connected line segments through ``points`` (a single point is drawn as a dot)."""
        pts = np.asarray([(float(x), float(y)) for x, y in points], dtype=np.float64)
        if len(pts) == 0:
            return
        if len(pts) == 1:
            self.line(pts[0, 0], pts[0, 1], pts[0, 0], pts[0, 1], color, width)
            return
        # Segments well inside the canvas are rasterised together (fast for long loss
        # curves); the rest go through ``line`` so they get clipped.
        pad = max(int(width), 1) + 1
        a, b = pts[:-1], pts[1:]
        inside = np.all(
            (np.minimum(a, b) >= -pad)
            & (np.maximum(a, b) <= np.array([self.width - 1 + pad, self.height - 1 + pad])),
            axis=1,
        )
        ai = np.floor(a[inside] + 0.5).astype(np.int64)
        bi = np.floor(b[inside] + 0.5).astype(np.int64)
        if len(ai):
            xs, ys = _raster_segments(ai[:, 0], ai[:, 1], bi[:, 0], bi[:, 1])
            self._stamp(xs, ys, _rgb(color), width)
        for i in np.flatnonzero(~inside):
            self.line(a[i, 0], a[i, 1], b[i, 0], b[i, 1], color, width)

    # -- text ---------------------------------------------------------------------------
    @staticmethod
    def text_width(s: str, scale: int = 1) -> int:
        """Pixel width of ``s`` in the built-in font (no trailing gap)."""
        return (_ADVANCE * len(s) - 1) * scale if s else 0

    @staticmethod
    def text_height(scale: int = 1) -> int:
        """Height of the text body (cap height, top to baseline); g j p q y descend a further
        ``2 * scale`` pixels below it."""
        return GLYPH_H * scale

    def text(
        self,
        x: float,
        y: float,
        s: str,
        color: Sequence[int] = (0, 0, 0),
        scale: int = 1,
        anchor: str = "left",
        valign: str = "top",
        rotate: bool = False,
    ) -> None:
        """Draw ``s`` in the 5x7 font.

        ``anchor`` places the text's left edge / centre / right edge at ``x``; ``valign``
        ("top" | "middle" | "bottom") places the top / middle / baseline of the 7-row body at
        ``y`` (descenders hang below the baseline and do not count for alignment).
        ``rotate=True`` turns the text 90 degrees counter-clockwise (reads bottom to top,
        e.g. a y-axis label); anchor/valign then apply to the rotated block, whose body is
        on its left and descenders on its right.
        """
        mask = text_mask(s, scale)
        body = self.text_height(scale)
        if rotate:
            mask = np.rot90(mask)
        h, w = mask.shape
        if w == 0 or h == 0:
            return
        bw, bh = (body, h) if rotate else (w, body)
        offs_x = {"left": 0, "center": bw // 2, "right": bw}
        offs_y = {"top": 0, "middle": bh // 2, "bottom": bh}
        if anchor not in offs_x:
            raise ValueError(f"anchor must be left/center/right, got {anchor!r}")
        if valign not in offs_y:
            raise ValueError(f"valign must be top/middle/bottom, got {valign!r}")
        left = _round(x) - offs_x[anchor]
        top = _round(y) - offs_y[valign]
        # Clip the mask to the canvas.
        cx0, cy0 = max(left, 0), max(top, 0)
        cx1, cy1 = min(left + w, self.width), min(top + h, self.height)
        if cx0 >= cx1 or cy0 >= cy1:
            return
        sub = mask[cy0 - top : cy1 - top, cx0 - left : cx1 - left]
        view = self.pixels[cy0:cy1, cx0:cx1]
        view[sub] = _rgb(color)

    # -- output -------------------------------------------------------------------------
    def save_png(self, path: str) -> None:
        """Write the image as PNG atomically, so a reader never sees a half-written file."""
        write_bytes_atomic(path, encode_png(self.pixels))


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write to a temp file in the target directory, then ``os.replace`` it into place."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp_", suffix=".png")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------------------------------
# PNG encoding (8-bit truecolour, no interlace, filter type 0 on every row).
# ---------------------------------------------------------------------------------------
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def encode_png(pixels: np.ndarray) -> bytes:
    """PNG bytes for an [H, W, 3] uint8 image."""
    arr = np.asarray(pixels)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"expected a non-empty [H, W, 3] image, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {arr.dtype}")
    h, w, _ = arr.shape
    raw = np.zeros((h, 1 + 3 * w), dtype=np.uint8)  # column 0 = filter byte 0 ("None")
    raw[:, 1:] = arr.reshape(h, 3 * w)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8-bit, colour type 2 = RGB
    return b"".join(
        (
            PNG_SIGNATURE,
            _chunk(b"IHDR", ihdr),
            _chunk(b"IDAT", zlib.compress(raw.tobytes(), 6)),
            _chunk(b"IEND", b""),
        )
    )


def decode_png(data: bytes) -> np.ndarray:
    """Inverse of ``encode_png`` (8-bit RGB, filter 0 only); verifies CRCs. For tests/checks."""
    if data[:8] != PNG_SIGNATURE:
        raise ValueError("not a PNG (bad signature)")
    pos = 8
    header: tuple[int, ...] | None = None
    idat = bytearray()
    seen_end = False
    while pos < len(data):
        if pos + 8 > len(data):
            raise ValueError("truncated PNG chunk header")
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        crc_bytes = data[pos + 8 + length : pos + 12 + length]
        if len(body) != length or len(crc_bytes) != 4:
            raise ValueError(f"truncated PNG chunk {kind!r}")
        if zlib.crc32(kind + body) & 0xFFFFFFFF != struct.unpack(">I", crc_bytes)[0]:
            raise ValueError(f"CRC mismatch in PNG chunk {kind!r}")
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        elif kind == b"IEND":
            seen_end = True
            break
    if header is None or not seen_end:
        raise ValueError("PNG lacks IHDR or IEND")
    w, h, depth, ctype, comp, filt, interlace = header
    if (depth, ctype, comp, filt, interlace) != (8, 2, 0, 0, 0):
        raise ValueError(f"unsupported PNG format {header[2:]} (only 8-bit RGB, no interlace)")
    raw = np.frombuffer(zlib.decompress(bytes(idat)), dtype=np.uint8)
    if raw.size != h * (1 + 3 * w):
        raise ValueError("PNG image data has the wrong size")
    raw = raw.reshape(h, 1 + 3 * w)
    if np.any(raw[:, 0] != 0):
        raise ValueError("only PNG filter type 0 is supported")
    return raw[:, 1:].reshape(h, w, 3).copy()
