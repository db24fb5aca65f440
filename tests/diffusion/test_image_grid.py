"""PNG grids of DDPO samples (rlhf_cli/diffusion/grid.py): size, layout, clamping, labels, atomic save."""

import numpy as np
import pytest
import torch
from PIL import Image

from rlhf_cli.diffusion.grid import GAP, image_grid, label_band_height, save_grid, tile_origin


def solid_batch(n: int, size: int = 8) -> torch.Tensor:
    """(n, 3, size, size): image k is one solid colour, distinct for every k < 64."""
    colours = torch.tensor([[(k % 4) / 3, (k // 4 % 4) / 3, (k // 16 % 4) / 3] for k in range(n)])
    return colours[:, :, None, None].expand(n, 3, size, size).clone()


def expected_size(n, columns, size, scale, band=0) -> tuple[int, int]:
    rows = -(-n // columns)
    return columns * size * scale + (columns + 1) * GAP, rows * (band + size * scale) + (rows + 1) * GAP


def tile_centre(grid: Image.Image, k: int, columns: int, tile: int, band: int = 0) -> tuple[int, int, int]:
    top, left = tile_origin(k, columns, tile, tile, band)
    return grid.getpixel((left + tile // 2, top + tile // 2))


def test_saved_grid_is_a_valid_png_of_the_computed_size(tmp_path):
    path = save_grid(solid_batch(7), tmp_path / "new" / "folder" / "step-10.png", columns=3, scale=2)
    assert path == tmp_path / "new" / "folder" / "step-10.png"
    with Image.open(path) as png:
        png.verify()
    with Image.open(path) as png:
        assert png.format == "PNG" and png.mode == "RGB"
        assert png.size == expected_size(7, 3, size=8, scale=2)
    assert [p.name for p in path.parent.iterdir()] == ["step-10.png"]  # no temporary file left behind


def test_each_tile_holds_its_image_upscaled_row_major():
    images = solid_batch(10)
    grid = image_grid(images, columns=4, scale=3)
    tile = 8 * 3
    for k in range(10):
        want = tuple(round(v * 255) for v in images[k, :, 0, 0].tolist())
        top, left = tile_origin(k, 4, tile, tile)
        block = np.asarray(grid)[top : top + tile, left : left + tile]
        assert (block == want).all(), k  # the whole tile, edge to edge: nearest-neighbour, no blur
    # the two missing tiles of the last row and the gaps stay white
    assert tile_centre(grid, 10, 4, tile) == (255, 255, 255)
    assert grid.getpixel((GAP + tile, GAP + tile // 2)) == (255, 255, 255)


def test_a_tile_keeps_the_pixels_of_a_patterned_image():
    image = torch.rand(1, 3, 5, 7, generator=torch.Generator().manual_seed(0))
    grid = np.asarray(image_grid(image, columns=1, scale=2))
    tile = grid[GAP : GAP + 10, GAP : GAP + 14]
    want = (image[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    assert np.array_equal(tile[::2, ::2], want) and np.array_equal(tile[1::2, 1::2], want)


def test_values_outside_the_unit_range_are_clamped_and_nan_is_black():
    images = torch.tensor([2.0, -1.0, float("nan"), float("inf")])[:, None, None, None].expand(4, 3, 2, 2)
    grid = image_grid(images, columns=4, scale=1)
    assert [tile_centre(grid, k, 4, 2) for k in range(4)] == [
        (255, 255, 255), (0, 0, 0), (0, 0, 0), (255, 255, 255)
    ]


def test_more_columns_than_images_makes_one_row_of_them():
    assert image_grid(solid_batch(3), columns=8, scale=1).size == expected_size(3, 3, size=8, scale=1)


def test_row_labels_add_a_band_above_each_row_with_text():
    images = solid_batch(6)
    labels = ["a red circle on a white background", "a blue square " * 20]  # the second is cut
    grid = image_grid(images, columns=3, row_labels=labels, scale=4)
    band = label_band_height()
    assert band > 0
    assert grid.size == expected_size(6, 3, size=8, scale=4, band=band)
    for k in range(6):
        assert tile_centre(grid, k, 3, 32, band) == tuple(round(v * 255) for v in images[k, :, 0, 0].tolist())
    for row in range(2):
        top = GAP + row * (band + 32 + GAP)
        text = np.asarray(grid)[top : top + band, GAP:-GAP]
        assert (text < 128).any(), row  # some dark text pixels in each row's band


def test_an_empty_label_leaves_its_band_blank():
    grid = image_grid(solid_batch(2), columns=2, row_labels=[""], scale=2)
    band = label_band_height()
    assert (np.asarray(grid)[GAP : GAP + band] == 255).all()


@pytest.mark.parametrize(
    ("images", "kwargs"),
    [
        (torch.zeros(3, 8, 8), {"columns": 2}),  # no batch dimension
        (torch.zeros(2, 1, 8, 8), {"columns": 2}),  # not RGB
        (torch.zeros(0, 3, 8, 8), {"columns": 2}),  # empty
        (torch.zeros(2, 3, 8, 8), {"columns": 0}),
        (torch.zeros(2, 3, 8, 8), {"columns": 2, "scale": 0}),
        (torch.zeros(4, 3, 8, 8), {"columns": 2, "row_labels": ["only one"]}),
    ],
)
def test_bad_inputs_raise_value_error(images, kwargs):
    with pytest.raises(ValueError):
        image_grid(images, **kwargs)


def test_a_numpy_batch_works_too():
    grid = image_grid(np.full((2, 3, 4, 4), 0.5, dtype=np.float32), columns=2, scale=1)
    assert tile_centre(grid, 1, 2, 4) == (128, 128, 128)
