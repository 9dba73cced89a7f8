"""Validation grids: images in rows and columns, labelled (prompts above the columns, row names on the
left), saved as PNG and sent to the trackers that take images."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

logger = logging.getLogger(__name__)

PAD = 4  # px around a label
MAX_LABEL_LINES = 3  # a longer prompt is cut, ending with "..."
MIN_FONT, FONT_PER_CELL = 10, 16  # font size: a 16th of the cell width, at least 10 px
BACKGROUND, INK = (255, 255, 255), (0, 0, 0)


@dataclass
class Grid:
    """A labelled grid image and where each cell lies in it."""

    image: Image.Image
    boxes: list[list[tuple[int, int, int, int]]]  # [row][column] -> (left, top, right, bottom)

    def cell(self, row: int, column: int) -> Image.Image:
        """The image drawn in one cell."""
        return self.image.crop(self.boxes[row][column])


def _wrap(text: str, font: ImageFont.ImageFont, width: int, draw: ImageDraw.ImageDraw) -> list[str]:
    """Greedy word wrap of `text` into lines at most `width` px wide, at most MAX_LABEL_LINES lines."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    if len(lines) > MAX_LABEL_LINES:
        lines = lines[:MAX_LABEL_LINES]
        lines[-1] = lines[-1].rstrip(".") + "..."
    return lines or [""]


def labelled_grid(rows: list[list[Image.Image]], *, row_labels: list[str] | None = None,
                  column_labels: list[str] | None = None) -> Grid:
    """Paste equally sized images as a grid with a label column on the left and a label band on top.

    `rows[r][c]` is the image of row r, column c; `row_labels[r]` names row r, `column_labels[c]`
    column c (word-wrapped to the cell width). Either may be None (no band). Returns the grid with
    each cell's box. Raises ValueError for ragged rows or a label count that does not match.
    """
    width, height = rows[0][0].size
    columns = len(rows[0])
    if any(len(row) != columns for row in rows):
        raise ValueError("every row of a grid needs the same number of images")
    if row_labels is not None and len(row_labels) != len(rows):
        raise ValueError(f"{len(row_labels)} row labels for {len(rows)} rows")
    if column_labels is not None and len(column_labels) != columns:
        raise ValueError(f"{len(column_labels)} column labels for {columns} columns")
    font = ImageFont.load_default(size=max(MIN_FONT, width // FONT_PER_CELL))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_height = int(font.getbbox("Ag")[3]) + 2
    left = 0 if row_labels is None else int(max(measure.textlength(t, font=font) for t in row_labels)) + 2 * PAD
    wrapped = [_wrap(t, font, width - 2 * PAD, measure) for t in column_labels or []]
    top = 0 if column_labels is None else max(len(lines) for lines in wrapped) * line_height + 2 * PAD
    grid = Image.new("RGB", (left + columns * width, top + len(rows) * height), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    boxes = []
    for r, row in enumerate(rows):
        boxes.append([])
        for c, image in enumerate(row):
            box = (left + c * width, top + r * height, left + (c + 1) * width, top + (r + 1) * height)
            grid.paste(image.convert("RGB"), box[:2])
            boxes[-1].append(box)
        if row_labels is not None:
            draw.text((PAD, top + r * height + (height - line_height) // 2), row_labels[r], fill=INK, font=font)
    for c, lines in enumerate(wrapped):
        for i, line in enumerate(lines):
            draw.text((left + c * width + PAD, PAD + i * line_height), line, fill=INK, font=font)
    return Grid(grid, boxes)


def log_grid(accelerator, grid: Image.Image, tag: str, step: int) -> None:
    """Send the grid to every tracker that takes images (TensorBoard wants an NHWC batch)."""
    array = np.asarray(grid)  # [H, W, 3] uint8
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({tag: array[None]}, step, dataformats="NHWC")
        elif hasattr(tracker, "log_images"):
            tracker.log_images({tag: [array]}, step)
        else:
            logger.warning("tracker %s does not take images: the validation grid is only saved as a PNG", tracker.name)
