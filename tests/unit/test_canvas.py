"""Tests for the dependency-free canvas / PNG writer and the plots built on it.

PNG bytes are checked by parsing them by hand (not with decode_png), so the encoder is
judged against the PNG spec rather than against itself.
"""

from __future__ import annotations

import math
import os
import shutil
import struct
import subprocess
import zlib

import numpy as np
import pytest

from megatron_paci.utils.canvas import (
    FONT_CHARS,
    PALETTE,
    PNG_SIGNATURE,
    Canvas,
    decode_png,
    encode_png,
    text_mask,
)
from megatron_paci.utils.plots import (
    format_tick,
    line_plot,
    log_ticks,
    nice_step,
    nice_ticks,
    timeline_plot,
)

WHITE = (255, 255, 255)


def _chunks(data: bytes) -> list[tuple[bytes, bytes, int]]:
    """Split PNG bytes into (type, body, stored_crc), by hand."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    out, pos = [], 8
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n : pos + 12 + n])
        out.append((kind, body, crc))
        pos += 12 + n
    assert pos == len(data)
    return out


# ---------------------------------------------------------------------------------------
# PNG
# ---------------------------------------------------------------------------------------
def test_encode_png_structure_by_hand() -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(7, 11, 3), dtype=np.uint8)
    data = encode_png(img)
    chunks = _chunks(data)
    assert [k for k, _, _ in chunks][0] == b"IHDR"
    assert chunks[-1][0] == b"IEND" and chunks[-1][1] == b""
    for kind, body, crc in chunks:
        assert zlib.crc32(kind + body) & 0xFFFFFFFF == crc, kind
    w, h, depth, ctype, comp, filt, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (w, h) == (11, 7)
    assert (depth, ctype, comp, filt, interlace) == (8, 2, 0, 0, 0)
    idat = b"".join(body for kind, body, _ in chunks if kind == b"IDAT")
    expected = b"".join(b"\x00" + img[r].tobytes() for r in range(7))
    assert zlib.decompress(idat) == expected


@pytest.mark.parametrize("shape", [(1, 1, 3), (5, 3, 3), (64, 97, 3)])
def test_png_roundtrip_random(shape: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    img = rng.integers(0, 256, size=shape, dtype=np.uint8)
    out = decode_png(encode_png(img))
    assert out.dtype == np.uint8 and out.shape == shape
    np.testing.assert_array_equal(out, img)


def test_decode_rejects_corruption() -> None:
    data = bytearray(encode_png(np.zeros((4, 4, 3), dtype=np.uint8)))
    data[20] ^= 0xFF  # inside IHDR body -> CRC mismatch
    with pytest.raises(ValueError, match="CRC"):
        decode_png(bytes(data))
    with pytest.raises(ValueError, match="signature"):
        decode_png(b"GIF89a" + bytes(20))


def test_encode_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        encode_png(np.zeros((4, 4), dtype=np.uint8))
    with pytest.raises(ValueError):
        encode_png(np.zeros((4, 4, 3), dtype=np.float32))


def test_save_png_atomic_and_recognised(tmp_path) -> None:
    c = Canvas(9, 5, background=(10, 20, 30))
    path = tmp_path / "sub" / "img.png"
    c.save_png(str(path))
    assert sorted(os.listdir(path.parent)) == ["img.png"]  # no temp file left behind
    data = path.read_bytes()
    # The same magic check `file`/imghdr do: 8-byte signature then an IHDR chunk.
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    img = decode_png(data)
    assert img.shape == (5, 9, 3) and (img == np.array([10, 20, 30], np.uint8)).all()
    if shutil.which("file"):  # an independent reader, when the system has one
        out = subprocess.run(["file", str(path)], capture_output=True, text=True).stdout
        assert "PNG image data, 9 x 5, 8-bit/color RGB" in out


# ---------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------
def _ink(c: Canvas, bg=WHITE) -> np.ndarray:
    return np.any(c.pixels != np.array(bg, np.uint8), axis=-1)


def test_fill_rect_exact_and_clipped() -> None:
    c = Canvas(20, 10)
    c.fill_rect(3, 2, 7, 5, (255, 0, 0))
    want = np.zeros((10, 20), bool)
    want[2:5, 3:7] = True
    np.testing.assert_array_equal(_ink(c), want)
    assert (c.pixels[want] == [255, 0, 0]).all()

    c = Canvas(20, 10)
    c.fill_rect(15, -100, 1000, 3, (0, 0, 255))  # clipped on three sides
    c.fill_rect(-50, -50, -10, -10, (0, 0, 255))  # fully outside: no-op
    c.fill_rect(5, 8, 2, 6, (0, 0, 255))  # swapped corners
    want = np.zeros((10, 20), bool)
    want[0:3, 15:20] = True
    want[6:8, 2:5] = True
    np.testing.assert_array_equal(_ink(c), want)


def test_rect_outline() -> None:
    c = Canvas(12, 12)
    c.rect_outline(2, 3, 9, 10, (0, 0, 0), width=2)
    want = np.zeros((12, 12), bool)
    want[3:10, 2:9] = True
    want[5:8, 4:7] = False
    np.testing.assert_array_equal(_ink(c), want)


def test_lines_set_expected_pixels() -> None:
    c = Canvas(16, 16)
    c.line(2, 5, 10, 5, (0, 0, 0))
    want = np.zeros((16, 16), bool)
    want[5, 2:11] = True
    np.testing.assert_array_equal(_ink(c), want)

    c = Canvas(16, 16)
    c.line(7, 12, 7, 1, (0, 0, 0))  # vertical, drawn upwards
    want = np.zeros((16, 16), bool)
    want[1:13, 7] = True
    np.testing.assert_array_equal(_ink(c), want)

    c = Canvas(16, 16)
    c.line(12, 1, 3, 10, (0, 0, 0))  # anti-diagonal
    want = np.zeros((16, 16), bool)
    for i in range(10):
        want[1 + i, 12 - i] = True
    np.testing.assert_array_equal(_ink(c), want)


def test_line_shallow_slope_is_connected_and_hits_ends() -> None:
    c = Canvas(30, 10)
    c.line(1, 1, 25, 7, (0, 0, 0))
    ink = _ink(c)
    assert ink[1, 1] and ink[7, 25]
    cols = np.flatnonzero(ink.any(axis=0))
    np.testing.assert_array_equal(cols, np.arange(1, 26))  # one pixel per column
    assert (ink.sum(axis=0)[1:26] == 1).all()
    ys = [np.flatnonzero(ink[:, x])[0] for x in range(1, 26)]
    assert all(0 <= b - a <= 1 for a, b in zip(ys, ys[1:], strict=False))


def test_line_clipping_and_width() -> None:
    c = Canvas(10, 10)
    c.line(-1e9, 4, 1e9, 4, (0, 0, 0))  # huge coordinates are clipped, not rasterised
    want = np.zeros((10, 10), bool)
    want[4, :] = True
    np.testing.assert_array_equal(_ink(c), want)

    c = Canvas(10, 10)
    c.line(2, 4, 7, 4, (0, 0, 0), width=3)
    want = np.zeros((10, 10), bool)
    want[3:6, 1:9] = True
    np.testing.assert_array_equal(_ink(c), want)


def test_polyline_matches_segments() -> None:
    pts = [(1, 1), (30, 3), (12, 25), (12, 25), (-20, 40), (35, 35)]
    a = Canvas(32, 32)
    a.polyline(pts, (0, 0, 0), width=2)
    b = Canvas(32, 32)
    for p, q in zip(pts, pts[1:], strict=False):
        b.line(*p, *q, (0, 0, 0), width=2)
    np.testing.assert_array_equal(a.pixels, b.pixels)
    c = Canvas(8, 8)
    c.polyline([(3, 4)], (0, 0, 0))
    assert _ink(c).sum() == 1 and _ink(c)[4, 3]


# ---------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------
def test_font_covers_required_characters() -> None:
    required = (
        "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz .,:;-+/()[]=%_'!?<>*#"
    )
    assert set(required) <= set(FONT_CHARS)
    # Every visible glyph has ink and no two glyphs are identical.
    masks = {ch: text_mask(ch).tobytes() for ch in required if ch != " "}
    assert all(any(m) for m in masks.values())
    assert len(set(masks.values())) == len(masks)


@pytest.mark.parametrize("scale", [1, 2, 3])
def test_text_bounding_box_and_width(scale: int) -> None:
    s = "Loss (iter) 3.14 OK"
    c = Canvas(400, 60)
    x, y = 17, 9
    c.text(x, y, s, (200, 0, 0), scale=scale)
    w = Canvas.text_width(s, scale)
    assert w == (6 * len(s) - 1) * scale
    ys, xs = np.nonzero(_ink(c))
    assert xs.min() == x and xs.max() == x + w - 1  # 'L' and 'K' touch both edges
    assert ys.min() == y and ys.max() <= y + Canvas.text_height(scale) - 1
    assert (c.pixels[ys, xs] == [200, 0, 0]).all()


def test_text_anchor_descender_and_rotation() -> None:
    s = "gap"
    w = Canvas.text_width(s, 2)
    for anchor, left in (("left", 50), ("center", 50 - w // 2), ("right", 50 - w)):
        c = Canvas(120, 40)
        c.text(50, 5, s, anchor=anchor, scale=2)
        xs = np.nonzero(_ink(c))[1]
        assert xs.min() >= left and xs.max() <= left + w - 1, anchor
    # Descenders hang below the 7-row body, at most 2*scale rows.
    c = Canvas(120, 40)
    c.text(5, 5, "gy", scale=2)
    assert np.nonzero(_ink(c))[0].max() == 5 + 9 * 2 - 1
    # Rotated text: tall and narrow, width = body height.
    c = Canvas(40, 120)
    c.text(5, 10, "ABC", rotate=True)
    ys, xs = np.nonzero(_ink(c))
    assert xs.min() == 5 and xs.max() == 5 + 7 - 1
    assert ys.min() == 10 and ys.max() == 10 + Canvas.text_width("ABC") - 1


def test_text_clipped_and_unknown_chars() -> None:
    c = Canvas(10, 5)
    c.text(-3, -2, "WWWW\u00e9", scale=2)  # partly off canvas, unknown char -> '?'
    assert _ink(c).any()
    assert Canvas.text_width("") == 0


# ---------------------------------------------------------------------------------------
# Ticks
# ---------------------------------------------------------------------------------------
def test_nice_ticks() -> None:
    assert nice_step(10, 5) == 2
    assert nice_step(0.7, 7) == 0.1
    assert nice_ticks(0, 10, 5) == [0, 2, 4, 6, 8, 10]
    assert nice_ticks(-0.03, 0.31, 4) == [0.0, 0.1, 0.2, 0.3]
    assert nice_ticks(2.2, 14.1, 6) == [4, 6, 8, 10, 12, 14]
    for lo, hi in [(0.001, 0.0037), (-5e6, 3e7), (9.9, 10.1)]:
        t = nice_ticks(lo, hi, 6)
        assert 2 <= len(t) <= 7 and all(lo <= v <= hi for v in t)
        step = t[1] - t[0]
        mant = step / 10 ** math.floor(math.log10(step))
        assert any(abs(mant - m) < 1e-9 for m in (1, 2, 5))
    # Few decades: 1/2/5 per decade; more: decades only; many: every n-th decade.
    assert log_ticks(-2, 0, 8) == [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1]
    assert log_ticks(-3, 1) == [0.001, 0.01, 0.1, 1, 10]
    assert log_ticks(-6, 6) == [10.0**k for k in range(-6, 7)][::2]
    assert format_tick(0.30000000000000004, 0.1) == "0.3"
    assert format_tick(1500, 500) == "1500"
    assert format_tick(2e-5) == "2e-5" and format_tick(3e7) == "3e7"


# ---------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------
def _near(img: np.ndarray, x: float, y: float, color, r: int = 1, tol: int = 0) -> bool:
    xi, yi = int(math.floor(x + 0.5)), int(math.floor(y + 0.5))
    patch = img[max(yi - r, 0) : yi + r + 1, max(xi - r, 0) : xi + r + 1].astype(int)
    return bool((np.abs(patch - np.array(color)).max(axis=-1) <= tol).any())


def test_line_plot_draws_series_at_mapped_points(tmp_path) -> None:
    it = list(range(0, 1001, 10))
    train = [8.0 * math.exp(-i / 200) + 2.0 for i in it]
    train[30] = float("nan")  # skipped, not fatal
    train[31] = float("inf")
    val_x, val_y = [0, 500, 1000], [9.5, 2.6, 2.2]
    path = str(tmp_path / "loss.png")
    area = line_plot(
        path,
        {"train": (it, train), "val": (val_x, val_y), "one": ([700], [6.0])},
        title="loss",
        xlabel="iteration",
        ylabel="loss",
    )
    img = decode_png(open(path, "rb").read())
    assert img.shape == (500, 800, 3)
    blue, orange, green = PALETTE[0], PALETTE[1], PALETTE[2]
    for col in (blue, orange, green):
        assert (img == np.array(col, np.uint8)).all(axis=-1).sum() > 10
    # Data points land where the returned mapping says.
    assert _near(img, *area.to_px(100, train[10]), blue)
    assert _near(img, *area.to_px(800, train[80]), blue)
    assert _near(img, *area.to_px(500, 2.6), orange)
    assert _near(img, *area.to_px(700, 6.0), green)  # single point -> small square
    # The whole data range is inside the plotting rectangle.
    for x, y in [(0, 10.0), (1000, 2.0)]:
        px, py = area.to_px(x, y)
        assert area.left <= px <= area.right and area.top <= py <= area.bottom


def test_line_plot_degenerate_inputs(tmp_path) -> None:
    path = str(tmp_path / "flat.png")
    area = line_plot(path, {"flat": ([0, 1, 2], [3.0, 3.0, 3.0])})
    assert area.y_lo < 3.0 < area.y_hi and area.x_lo < 0 and area.x_hi > 2
    img = decode_png(open(path, "rb").read())
    assert _near(img, *area.to_px(1, 3.0), PALETTE[0])
    line_plot(str(tmp_path / "empty.png"), {"nan": ([0, 1], [math.nan, math.inf])})
    line_plot(str(tmp_path / "none.png"), {})
    area = line_plot(str(tmp_path / "log.png"), {"l": ([1, 2, 3], [10.0, 1.0, -1.0])}, log_y=True)
    img = decode_png(open(tmp_path / "log.png", "rb").read())
    assert _near(img, *area.to_px(2, 1.0), PALETTE[0])
    assert area.y_px(10.0) < area.y_px(1.0)


def test_timeline_plot_box_in_row(tmp_path) -> None:
    rows = ["stage 0", "stage 1", "stage 2"]
    red, teal = (220, 40, 40), (0, 150, 140)
    boxes = [(0, 0.0, 2.0, red, "F0"), (1, 2.0, 5.0, teal, "B0"), (2, 5.0, 6.0, red, "F1")]
    markers = [(0, 6.5, "opt"), (2, 6.5, "opt")]
    path = str(tmp_path / "tl.png")
    area = timeline_plot(path, rows, boxes, markers, title="1F1B")
    img = decode_png(open(path, "rb").read())
    # The teal box fills its row band between its start and end times.
    y0, y1 = area.box_band(1)
    x0, x1 = area.t_px(2.0), area.t_px(5.0)
    is_teal = (img == np.array(teal, np.uint8)).all(axis=-1)
    ys, xs = np.nonzero(is_teal)
    assert len(xs) > 0.5 * (x1 - x0) * (y1 - y0)  # mostly solid (a label sits inside)
    assert xs.min() >= x0 - 1 and xs.max() <= x1 + 1
    assert ys.min() >= y0 and ys.max() < y1
    ry0, ry1 = area.row_band(1)
    assert ry0 <= y0 < y1 <= ry1
    assert is_teal[int((y0 + y1) / 2) - 8, int(x0) + 3]
    # Other rows hold no teal; red appears in rows 0 and 2 only.
    is_red = (img == np.array(red, np.uint8)).all(axis=-1)
    assert not is_red[area.row_band(1)[0] : area.row_band(1)[1]].any()
    assert is_red[area.row_band(0)[0] : area.row_band(0)[1]].any()
    assert is_red[area.row_band(2)[0] : area.row_band(2)[1]].any()
    # The optimizer marker is a dark bar at its time in row 0.
    mx = int(area.t_px(6.5))
    r0, r1 = area.row_band(0)
    assert (img[r0 + 5 : r1 - 15, mx] < 60).all()


def test_timeline_plot_validates(tmp_path) -> None:
    with pytest.raises(ValueError):
        timeline_plot(str(tmp_path / "x.png"), ["a"], [(1, 0.0, 1.0, (0, 0, 0), "")])
    with pytest.raises(ValueError):
        timeline_plot(str(tmp_path / "x.png"), ["a"], [(0, 2.0, 1.0, (0, 0, 0), "")])
    timeline_plot(str(tmp_path / "empty.png"), ["a", "b"], [])
