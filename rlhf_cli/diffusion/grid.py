"""PNG grids of sampled images, for looking at what a DDPO run draws as it trains.

Layout: tiles row-major, ``columns`` per row, a ``GAP``-pixel white gap between tiles and around the
edge. Tiles are upscaled ``scale`` times with nearest-neighbour (a 32 x 32 sample is too small to
judge, and smoothing would hide exactly the pixels being judged). With ``row_labels`` each row gets a
white band above it holding its label in black (one label per row, because the natural grid is one
prompt per row with seeds across), wrapped to the row's width and cut to ``MAX_LABEL_LINES`` lines.
"""

import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

GAP = 2  # white pixels between tiles and around the edge
MAX_LABEL_LINES = 2
LABEL_PAD = 2  # white pixels above and below the label text in its band
_WHITE, _BLACK = (255, 255, 255), (0, 0, 0)


def image_grid(
    images: torch.Tensor | np.ndarray,
    columns: int,
    row_labels: list[str] | None = None,
    scale: int = 4,
) -> Image.Image:
    """images (N, 3, H, W) float in [0, 1] -> one RGB image of ceil(N / columns) rows.

    Values outside [0, 1] are clamped and NaN drawn as 0 (black), so a diverged sample still shows.
    Columns beyond N are dropped (a grid of 3 images with columns=8 is 3 wide). Raises ValueError on
    a wrong shape, columns or scale < 1, or a label count other than the number of rows.
    """
    tiles = _to_uint8_tiles(images, scale)  # (N, H*scale, W*scale, 3)
    columns = _check_layout(len(tiles), columns, row_labels)
    rows = math.ceil(len(tiles) / columns)
    font = ImageFont.load_default()
    band = label_band_height(font) if row_labels is not None else 0
    canvas = _paste_tiles(tiles, columns, rows, band)
    grid = Image.fromarray(canvas)
    if row_labels is not None:
        _draw_labels(grid, row_labels, tiles.shape[1] + band, band, font)
    return grid


def save_grid(
    images: torch.Tensor | np.ndarray,
    path: str | Path,
    columns: int,
    row_labels: list[str] | None = None,
    scale: int = 4,
) -> Path:
    """Write `image_grid(...)` as a PNG at `path`, creating its folder.

    Written to a temporary file beside it and moved into place, so a reader (or a crash mid-write)
    never sees half a PNG.
    """
    grid = image_grid(images, columns, row_labels=row_labels, scale=scale)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            grid.save(file, format="PNG")
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return path


def label_band_height(font: ImageFont.ImageFont | ImageFont.FreeTypeFont | None = None) -> int:
    """Pixels of the band above each row when there are labels: room for MAX_LABEL_LINES lines."""
    font = font or ImageFont.load_default()
    return MAX_LABEL_LINES * _line_height(font) + 2 * LABEL_PAD


def _to_uint8_tiles(images: torch.Tensor | np.ndarray, scale: int) -> np.ndarray:
    """(N, 3, H, W) float -> uint8 (N, H*scale, W*scale, 3), clamped, NaN -> 0, nearest-upscaled."""
    images = torch.as_tensor(images)
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty (N, 3, H, W) batch, got shape {tuple(images.shape)}")
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be an integer >= 1, got {scale!r}")
    pixels = torch.nan_to_num(images.detach().to("cpu", torch.float32), nan=0.0).clamp(0.0, 1.0)
    pixels = (pixels * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return pixels.repeat(scale, axis=1).repeat(scale, axis=2)


def _check_layout(count: int, columns: int, row_labels: list[str] | None) -> int:
    """The number of columns actually used; checks the labels match the rows."""
    if isinstance(columns, bool) or not isinstance(columns, int) or columns < 1:
        raise ValueError(f"columns must be an integer >= 1, got {columns!r}")
    columns = min(columns, count)
    rows = math.ceil(count / columns)
    if row_labels is not None and len(row_labels) != rows:
        raise ValueError(f"got {len(row_labels)} row labels for {rows} rows ({count} images, {columns} columns)")
    return columns


def _paste_tiles(tiles: np.ndarray, columns: int, rows: int, band: int) -> np.ndarray:
    """A white canvas (height, width, 3) with tile k at row k // columns, column k % columns."""
    _, tile_h, tile_w, _ = tiles.shape
    width = columns * tile_w + (columns + 1) * GAP
    height = rows * (band + tile_h) + (rows + 1) * GAP
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    for k, tile in enumerate(tiles):
        top, left = tile_origin(k, columns, tile_h, tile_w, band)
        canvas[top : top + tile_h, left : left + tile_w] = tile
    return canvas


def tile_origin(k: int, columns: int, tile_h: int, tile_w: int, band: int = 0) -> tuple[int, int]:
    """(top, left) pixel of tile k in the grid, for tiles of (tile_h, tile_w) upscaled pixels."""
    row, column = divmod(k, columns)
    top = GAP + row * (band + tile_h + GAP) + band
    left = GAP + column * (tile_w + GAP)
    return top, left


def _draw_labels(grid: Image.Image, labels: list[str], row_pitch: int, band: int, font) -> None:
    """Each row's label, wrapped to the grid's width, in the band above the row."""
    draw = ImageDraw.Draw(grid)
    width = grid.width - 2 * GAP
    for row, label in enumerate(labels):
        top = GAP + row * (row_pitch + GAP) + LABEL_PAD
        for i, line in enumerate(_wrap(str(label), width, font)):
            draw.text((GAP, top + i * _line_height(font)), line, fill=_BLACK, font=font)


def _wrap(text: str, width: int, font) -> list[str]:
    """Greedy word wrap to `width` pixels, at most MAX_LABEL_LINES lines; cut text ends in '...'."""
    words = text.split()
    lines: list[str] = []
    while words and len(lines) < MAX_LABEL_LINES:
        line = words.pop(0)
        while words and font.getlength(f"{line} {words[0]}") <= width:
            line = f"{line} {words.pop(0)}"
        lines.append(line)
    if words:  # text left over: the last line runs on into it and is cut with '...'
        lines[-1] = f"{lines[-1]} {' '.join(words)}"
    return [_ellipsize(line, width, font) for line in lines]


def _ellipsize(text: str, width: int, font) -> str:
    """`text` if it fits in `width` pixels, else its longest prefix that fits followed by '...'."""
    if font.getlength(text) <= width:
        return text
    text = text[:width]  # every glyph is at least a pixel wide: the rest can never fit
    while text and font.getlength(text.rstrip() + "...") > width:
        text = text[:-1]
    return text.rstrip() + "..."


def _line_height(font) -> int:
    """Pixels from one text line to the next: the font's ascent + descent (both fonts Pillow may load)."""
    if hasattr(font, "getmetrics"):
        ascent, descent = font.getmetrics()
        return ascent + descent
    left, top, right, bottom = font.getbbox("Ag")
    return bottom
