"""Pictures a command writes: labelled sample grids, one PNG per image in class folders, and animated GIFs."""
from __future__ import annotations

from pathlib import Path

from utils import UserError, check_output_folder


def crop_padding(images, pad: int):
    """Images (..., H, W) without ``pad`` pixels on each side (unchanged for 0): what the likelihood scores of
    MNIST's padded 32x32, and so what pictures show."""
    return images[..., pad:images.shape[-2] - pad, pad:images.shape[-1] - pad] if pad else images


def labelled_grid(images, nrow: int, row_labels: list[str] | None = None, col_labels: list[str] | None = None):
    """uint8 images (N, C, H, W) as a PIL picture: a grid ``nrow`` images wide, upscaled so that small images
    (8x8 digits) stay visible, with optional text left of each row and above each column."""
    import torch
    from PIL import Image, ImageDraw, ImageFont
    from torchvision.utils import make_grid

    scale = max(1, 32 // images.shape[-1])
    x = images.float() / 255.0
    if scale > 1:
        x = torch.nn.functional.interpolate(x, scale_factor=scale, mode="nearest")
    grid = make_grid(x, nrow=nrow, padding=2, pad_value=0.5)
    picture = Image.fromarray(grid.mul(255).add(0.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())
    if not row_labels and not col_labels:
        return picture
    font = ImageFont.load_default()
    text_w = lambda t: font.getbbox(t)[2]  # noqa: E731
    text_h = max(font.getbbox(t)[3] for t in [*(row_labels or []), *(col_labels or []), "Ag"])
    left = max(map(text_w, row_labels)) + 8 if row_labels else 0
    top = text_h + 6 if col_labels else 0
    canvas = Image.new("RGB", (picture.width + left, picture.height + top), "white")
    canvas.paste(picture, (left, top))
    draw = ImageDraw.Draw(canvas)
    cell_h, cell_w = images.shape[-2] * scale + 2, images.shape[-1] * scale + 2
    for r, text in enumerate(row_labels or []):
        draw.text((left - 4 - text_w(text), top + 2 + r * cell_h + (cell_h - text_h) // 2), text, fill="black",
                  font=font)
    for c, text in enumerate(col_labels or []):
        draw.text((left + 2 + c * cell_w + (cell_w - text_w(text)) // 2, 2), text, fill="black", font=font)
    return canvas


def save_grid(images, path, nrow: int, row_labels: list[str] | None = None,
              col_labels: list[str] | None = None) -> None:
    """Save uint8 images (N, C, H, W) as a PNG grid (see labelled_grid)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    labelled_grid(images, nrow, row_labels, col_labels).save(path)


def folder_name(text: str) -> str:
    """A class name as a folder name on every file system: runs of characters other than letters, digits and
    ``._=-`` become one underscore ("Smiling,Male=0" -> "Smiling_Male=0")."""
    import re

    return re.sub(r"[^A-Za-z0-9._=-]+", "_", text).strip("_") or "_"


def check_empty_folder(root, flag: str) -> None:
    """Before any work: refuse a folder that already holds files (writing into it could overwrite earlier samples
    or mix two runs' images under one manifest), and create it, so that an unwritable place fails now rather
    than after the sampling."""
    root = check_output_folder(root, flag, empty=True)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create {flag} {root}: {err.strerror or err}") from None


def save_image_folder(images, folders: list[str], root, records: list[dict]) -> Path:
    """Each uint8 image (N, C, H, W) as its own PNG at its native size, ``ROOT/FOLDER/00001.png`` numbered from 1
    within each folder (the layout torchvision's ImageFolder and FID tools read), and ``ROOT/manifest.csv``: a row
    per image with its file and the fields of its record. Returns the manifest's path."""
    import csv

    from PIL import Image

    root = Path(root)
    counts: dict[str, int] = {}
    rows = []
    digits = max(5, len(str(len(images))))
    try:
        for image, folder, record in zip(images, folders, records):
            counts[folder] = counts.get(folder, 0) + 1
            name = Path(folder) / f"{counts[folder]:0{digits}d}.png"
            (root / folder).mkdir(parents=True, exist_ok=True)
            array = image.permute(1, 2, 0).numpy()
            Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(root / name)
            rows.append({"file": name.as_posix(), **record})
        manifest = root / "manifest.csv"
        with open(manifest, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    except OSError as err:
        raise UserError(f"cannot write into {root}: {err.strerror or err}") from None
    return manifest


def save_gif(frames: list, path, fps: float) -> None:
    """Write PIL pictures as an animated GIF that loops forever."""
    import imageio.v3 as iio
    import numpy as np

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(path, np.stack([np.asarray(f.convert("RGB")) for f in frames]), extension=".gif",
                duration=1000.0 / fps, loop=0)
