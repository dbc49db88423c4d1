"""Inspection panels: quasi-superpixels by level, CAM heat maps, label maps, and the titled
panel row of one image (:func:`render`)."""
from __future__ import annotations

import numpy as np

from pipeline.data.imageio import VOC_PALETTE
from pipeline.seeds.sams import image_scores

#: Grey gap between panels, in pixels.
PANEL_GAP = 4
#: Weight of the colour layer over the image in overlays.
OVERLAY_WEIGHT = 0.5


def mask_colours(n: int, seed: int = 0) -> np.ndarray:
    """(n, 3) uint8 random but deterministic colours, one per mask."""
    return np.random.default_rng(seed).integers(40, 256, (n, 3), dtype=np.uint8)


def masks_panel(image: np.ndarray, masks: np.ndarray, seed: int = 0) -> np.ndarray:
    """Masks (S, H, W) painted in order (later on top), each in its colour, over a dimmed image."""
    out = (image.astype(np.float32) * 0.3).astype(np.uint8)
    if masks.shape[0] == 0:
        return out
    colours = mask_colours(masks.shape[0], seed)
    # Index of the last covering mask: first hit of the reversed stack.
    last = masks.shape[0] - 1 - np.argmax(masks[::-1], axis=0)
    covered = masks.any(axis=0)
    blend = _blend(image, colours[last])
    return np.where(covered[..., None], blend, out)


def jet(x: np.ndarray) -> np.ndarray:
    """Jet-like colour map of values in [0, 1] -> (..., 3) uint8 (blue low, red high)."""
    x = np.clip(x, 0.0, 1.0)[..., None]
    rgb = np.clip(1.5 - np.abs(4.0 * x - np.array([3.0, 2.0, 1.0])), 0.0, 1.0)
    return (rgb * 255).astype(np.uint8)


def cam_panel(image: np.ndarray, score: np.ndarray) -> np.ndarray:
    """The max over classes of the §3 scores (P, H, W) as a jet overlay (no class: all blue)."""
    top = score.max(axis=0) if score.shape[0] else np.zeros(image.shape[:2], np.float32)
    return _blend(image, jet(top))


def label_panel(label: np.ndarray) -> np.ndarray:
    """A label map (H, W) uint8 in VOC colours (255 in VOC's boundary colour)."""
    return VOC_PALETTE[label]


def hstack_panels(panels: list[np.ndarray]) -> np.ndarray:
    """Panels of equal height side by side with grey gaps."""
    h = panels[0].shape[0]
    gap = np.full((h, PANEL_GAP, 3), 128, np.uint8)
    parts = []
    for i, p in enumerate(panels):
        if i:
            parts.append(gap)
        parts.append(p)
    return np.concatenate(parts, axis=1)


def _blend(image: np.ndarray, colour: np.ndarray) -> np.ndarray:
    mixed = (1 - OVERLAY_WEIGHT) * image.astype(np.float32) + OVERLAY_WEIGHT * colour
    return mixed.astype(np.uint8)


# -- titled panels, label overlays and a class legend (PIL only draws the text) ------------------

#: Height of a panel's title strip and of a legend row, in pixels.
TITLE_HEIGHT = 16
#: Colour of the ignore label (255) in overlays: VOC's boundary colour.
IGNORE_RGB = np.array([224, 224, 192], np.uint8)


def _font(size: int = 11):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def label_overlay(image: np.ndarray, label: np.ndarray, weight: float = 0.6) -> np.ndarray:
    """Class colours (VOC palette) blended over the image; background pixels show the image
    dimmed, so objects stand out and their outlines can be judged against the photo."""
    colours = VOC_PALETTE[label].astype(np.float32)
    base = image.astype(np.float32)
    fg = (1 - weight) * base + weight * colours
    out = np.where((label > 0)[..., None], fg, 0.55 * base)
    return out.astype(np.uint8)


def titled(panel: np.ndarray, title: str) -> np.ndarray:
    """``panel`` with a white title strip above it (the title clipped to the panel's width)."""
    from PIL import Image, ImageDraw

    strip = Image.new("RGB", (panel.shape[1], TITLE_HEIGHT), (255, 255, 255))
    ImageDraw.Draw(strip).text((3, 2), title, fill=(0, 0, 0), font=_font())
    return np.concatenate([np.asarray(strip), panel], axis=0)


def legend(width: int, entries: list[tuple[str, np.ndarray]]) -> np.ndarray:
    """Rows of colour swatches with their names, wrapped to ``width`` pixels."""
    from PIL import Image, ImageDraw

    font = _font()
    cells = [(name, tuple(int(c) for c in rgb), int(font.getlength(name)) + 22) for name, rgb in entries]
    rows, row, used = [], [], 0
    for cell in cells:
        if row and used + cell[2] > width:
            rows.append(row)
            row, used = [], 0
        row.append(cell)
        used += cell[2]
    rows.append(row)
    img = Image.new("RGB", (width, TITLE_HEIGHT * len(rows) + 4), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for r, row in enumerate(rows):
        x, y = 3, 2 + r * TITLE_HEIGHT
        for name, rgb, cell_width in row:
            draw.rectangle((x, y + 2, x + 11, y + 12), fill=rgb, outline=(0, 0, 0))
            draw.text((x + 15, y + 1), name, fill=(0, 0, 0), font=font)
            x += cell_width
    return np.asarray(img)


def compose(panels: list[tuple[str, np.ndarray]], legend_entries: list[tuple[str, np.ndarray]]) -> np.ndarray:
    """Titled panels side by side, with the class legend underneath."""
    row = hstack_panels([titled(p, title) for title, p in panels])
    if not legend_entries:
        return row
    return np.concatenate([row, legend(row.shape[1], legend_entries)], axis=0)


LEVEL_TITLES = ("sub-parts (level 0)", "parts (level 1)", "wholes (level 2)")


def render(image: np.ndarray, qs: dict | None, cams: dict | None, seed: np.ndarray | None,
           gt: np.ndarray | None, prediction: np.ndarray | None, class_names: list[str],
           which: str = "fine") -> np.ndarray:
    """The titled panel row (and legend) of one image from whatever inputs exist.

    Panels, left to right: image | quasi-superpixels of level 0, 1, 2 (``qs``: a mask store's
    arrays; one random colour per mask, the same every run) | CAM (``cams``: a CAM store's
    arrays; max §3 score over classes, jet over the image) | seed | ground truth | prediction.
    Label maps are class-colour overlays, and a legend names the classes shown. A missing input
    (None) leaves its panel blank, or out for ground truth and prediction.
    """
    h, w = image.shape[:2]
    blank = np.zeros_like(image)
    panels = [("image", image)]
    for level, title in enumerate(LEVEL_TITLES):
        masks = np.zeros((0, h, w), bool)
        if qs is not None:
            masks = qs["masks"][qs["levels"] == level]
        panels.append((f"{title}: {len(masks)}", masks_panel(image, masks, seed=level)))
    score = np.zeros((0, h, w), np.float32)
    cam_title = "CAM"
    if cams is not None:
        key = "cam_caa" if "cam_caa" in cams else "cam"
        score = image_scores(cams[key], (h, w))
        cam_title = "CAM + CAA" if key == "cam_caa" else "CAM"
    panels.append((cam_title, cam_panel(image, score)))
    labels = [m for m in (seed, gt, prediction) if m is not None]
    # eval-split images have no seed (seeds are made for the train split): say so, not a black "seed"
    panels.append((f"{which} seed", label_overlay(image, seed)) if seed is not None
                  else (f"{which} seed: none", blank))
    if gt is not None:
        panels.append(("ground truth", label_overlay(image, gt)))
    if prediction is not None:
        panels.append(("prediction", label_overlay(image, prediction)))
    shown = sorted(set(np.unique(np.concatenate([m.ravel() for m in labels])).tolist()) if labels else set())
    names = ["background", *class_names]
    entries = [(names[v], VOC_PALETTE[v]) for v in shown if v < len(names)]
    if 255 in shown:
        entries.append(("ignore", IGNORE_RGB))
    return compose(panels, entries)
