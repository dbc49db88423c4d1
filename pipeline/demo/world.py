"""The embedded demo's procedural world: objects built from parts and sub-parts in textured scenes.

Six object classes, each assembled from parts, some parts from sub-parts, so that SAM's three
levels (0 sub-part, 1 part, 2 whole) mean something:

    car     body (+ windows, headlight), two wheels (+ hubcaps)
    boat    hull (+ portholes), mast, sail (+ stripe)
    person  head (+ hair), torso (+ belt), two arms, two legs (+ shoes)
    flower  bloom (petals + centre), stem, two leaves
    fish    body (+ eye), tail, fin
    plane   fuselage (+ cockpit), two wings (+ engines), tail fin

What decides a class, locally (inside any 16-px patch of an object, as a tiny CLIP can learn it):
the main part's hue (each class has its own, +- 0.06 with saturation 0.5-0.95 and value
0.45-0.98) and the class's surface pattern, which every part without its own pattern repeats
(checks on a car, stripes on a hull and a boat's mast and sail, vertical stripes on a person's
clothes, dots on a flower, scales on a fish, stripes on a plane's fuselage and tail, chevrons on its
wings); sub-parts are plain and take contrasting colours. Shape then decides it globally.
Every sub-part is at least about 16 px across at SAM's 256-px input (``MIN_SUBPART_SQUARE``): the
builders draw them large enough on large objects, and a sub-part too small to hold that square
(on a small or occluded object) is not drawn and belongs to its part. Scenes are made of background regions named like
the VOC background prompts (sky, mountain, grass, water, road, wall), textured, with clutter and
distractor blobs that belong to no class; objects are 15-60 % of the image's short side, may
occlude each other, and images are 193-319 px per side, never a multiple of 16.

Everything derives from ``(seed, stream, index)`` through numpy's PCG64 and is computed with
``+ - * /``, ``sqrt`` and comparisons only (trigonometry only on scalars, via ``math``), so two
machines render byte-identical arrays. Streams keep the demo dataset (``DEMO_STREAM``) and the
images the demo models are trained on (``TRAINING_STREAM``) disjoint for every seed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

DEMO_CLASSES = ("car", "boat", "person", "flower", "fish", "plane")
"""Foreground classes, in label order (label c + 1 is class c)."""

BACKGROUND_KINDS = ("sky", "mountain", "grass", "water", "road", "wall")
"""Background regions; each name is one of the VOC background prompt names."""

DEMO_STREAM = 0
"""Stream of the demo dataset's images (train and val splits)."""
TRAINING_STREAM = 1
"""Stream of the images the demo CLIP and SAM are trained on (never in a demo split)."""

IGNORE = 255
SIZE_RANGE = (193, 319)
"""Inclusive range of image sides (multiples of 16 are skipped)."""
OBJECT_SIZE_RANGE = (0.15, 0.60)
"""Object extent as a fraction of the image's short side."""
MIN_VISIBLE = 0.55
"""An object placement is rejected when less than this fraction of it stays visible."""
SAM_INPUT_SIDE = 256
"""Long side of the demo SAM's input (``ResizeLongestSide``); sub-part sizes are measured there."""
MIN_SUBPART_SQUARE = 12
"""A sub-part must hold a square of this side (px at SAM's 256-px input; a 17-px disc holds one),
or it is not drawn: smaller ones are below what a 64 x 64 low-res mask resolves."""


@dataclass(frozen=True)
class WorldImage:
    """One rendered image with everything the demo needs."""

    image: np.ndarray
    """(H, W, 3) uint8 RGB."""
    label: np.ndarray
    """(H, W) uint8 semantic ground truth, VOC convention: 0 background, c + 1 class c, 255 on a
    band along object boundaries."""
    classes: tuple[int, ...]
    """Image-level labels: the 0-based classes with visible pixels, ascending."""
    whole: np.ndarray
    """(H, W) int32: id of the whole each pixel belongs to (object instance, distractor or
    background region); every pixel has one (ids start at 1)."""
    part: np.ndarray
    """(H, W) int32: id of the part under each pixel, 0 where the whole has no parts."""
    subpart: np.ndarray
    """(H, W) int32: id of the sub-part under each pixel, 0 where the part has none."""
    stuff: np.ndarray
    """(H, W) uint8: background kind (index into BACKGROUND_KINDS) of each pixel, 255 on objects
    and distractors."""
    instance_class: np.ndarray
    """(n_wholes + 1,) int16: class of each whole id (-1 for background regions and distractors)."""


# -- random helpers ---------------------------------------------------------------------------


def _rng(seed: int, stream: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(stream), int(index)])


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    """One HSV colour (h in [0, 1)) to RGB floats on 0-255 (scalar arithmetic only)."""
    i = int(h * 6.0) % 6
    f = h * 6.0 - math.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    r, g, b = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.array([r, g, b]) * 255.0


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    """Any colour: hue uniform, saturation and value spread wide (object parts)."""
    return _hsv_to_rgb(rng.random(), rng.uniform(0.15, 0.95), rng.uniform(0.2, 0.98))


# Typical hue of each class's main part (car, boat, person, flower, fish, plane): every instance
# takes it, +- 0.06 (neighbouring classes are at least 0.12 apart).
_CLASS_HUE = (0.0, 0.62, 0.33, 0.83, 0.12, 0.5)


def _class_colour(rng: np.random.Generator, cls: int) -> np.ndarray:
    hue = (_CLASS_HUE[cls] + rng.uniform(-0.06, 0.06)) % 1.0
    return _hsv_to_rgb(hue, rng.uniform(0.5, 0.95), rng.uniform(0.45, 0.98))


def _contrasting_colour(rng: np.random.Generator, other: np.ndarray, min_dist: float = 70.0) -> np.ndarray:
    """A random colour at least ``min_dist`` (RGB distance) away from ``other``."""
    best, best_d = None, -1.0
    for _ in range(12):
        c = _random_colour(rng)
        d = float(np.sqrt(((c - other) ** 2).sum()))
        if d >= min_dist:
            return c
        if d > best_d:
            best, best_d = c, d
    return best


def _value_noise(rng: np.random.Generator, h: int, w: int, cells_y: int, cells_x: int) -> np.ndarray:
    """Smooth noise in [0, 1]: a random (cells+1)² grid upsampled bilinearly (pure arithmetic)."""
    grid = rng.random((cells_y + 1, cells_x + 1))
    ys = np.arange(h) * (cells_y / max(h - 1, 1))
    xs = np.arange(w) * (cells_x / max(w - 1, 1))
    y0 = np.minimum(ys.astype(np.int64), cells_y - 1)
    x0 = np.minimum(xs.astype(np.int64), cells_x - 1)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    # smoothstep weights (no transcendental functions)
    fy, fx = fy * fy * (3 - 2 * fy), fx * fx * (3 - 2 * fx)
    a = grid[y0][:, x0]
    b = grid[y0][:, x0 + 1]
    c = grid[y0 + 1][:, x0]
    d = grid[y0 + 1][:, x0 + 1]
    return (a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy


def _triangle_wave(x: np.ndarray) -> np.ndarray:
    """Period-1 triangle wave in [0, 1] (a sine without trigonometry)."""
    f = x - np.floor(x)
    return np.abs(2.0 * f - 1.0)


# -- primitives in an object's local frame ------------------------------------------------------
# Local coordinates: the object spans about [-0.5, 0.5] on its longer axis, y points down.


def ellipse(cx, cy, rx, ry, angle=0.0):
    c, s = math.cos(angle), math.sin(angle)

    def inside(u, v):
        du, dv = u - cx, v - cy
        p = (du * c + dv * s) / rx
        q = (-du * s + dv * c) / ry
        return p * p + q * q <= 1.0
    return inside


def rrect(cx, cy, w, h, r=0.0, angle=0.0):
    """Rectangle of size w x h centred at (cx, cy), corners rounded with radius r."""
    c, s = math.cos(angle), math.sin(angle)
    r = min(r, w / 2, h / 2)

    def inside(u, v):
        du, dv = u - cx, v - cy
        p = np.abs(du * c + dv * s) - w / 2 + r
        q = np.abs(-du * s + dv * c) - h / 2 + r
        mp, mq = np.maximum(p, 0.0), np.maximum(q, 0.0)
        return (np.maximum(p, q) <= 0.0) | (mp * mp + mq * mq <= r * r)
    return inside


def polygon(points):
    """Convex polygon (vertices in either orientation)."""
    pts = [(float(x), float(y)) for x, y in points]
    area2 = sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1]))
    sign = 1.0 if area2 > 0 else -1.0

    def inside(u, v):
        ok = None
        for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1]):
            side = ((x1 - x0) * (v - y0) - (y1 - y0) * (u - x0)) * sign >= 0.0
            ok = side if ok is None else ok & side
        return ok
    return inside


def capsule(x0, y0, x1, y1, r):
    """Segment (x0, y0)-(x1, y1) thickened to radius r."""
    dx, dy = x1 - x0, y1 - y0
    ll = dx * dx + dy * dy or 1e-12

    def inside(u, v):
        t = np.clip(((u - x0) * dx + (v - y0) * dy) / ll, 0.0, 1.0)
        px, py = u - (x0 + t * dx), v - (y0 + t * dy)
        return px * px + py * py <= r * r
    return inside


def union(*shapes):
    def inside(u, v):
        out = shapes[0](u, v)
        for s in shapes[1:]:
            out = out | s(u, v)
        return out
    return inside


def minus(a, b):
    def inside(u, v):
        return a(u, v) & ~b(u, v)
    return inside


@dataclass
class Part:
    shape: Callable
    colour: np.ndarray
    subparts: list  # [(shape, colour)]
    pattern: Callable | None = None
    """Surface pattern: (u, v) -> brightness factor around 1 (the class's typical surface)."""


# Surface patterns of the classes' main parts, in the object's local frame. Colour is random per
# instance; the pattern (like planks on a hull or scales on a fish) is a local cue of the class,
# as surface texture is in real images.
def _stripes(period, vertical=False, depth=0.22):
    def f(u, v):
        return 1.0 + depth * (_triangle_wave((u if vertical else v) / period) - 0.5)
    return f


def _scales(period, depth=0.3):
    def f(u, v):
        return 1.0 + depth * (_triangle_wave(u / period + 0.5 * np.floor(v / period)) * _triangle_wave(v / period) - 0.25)
    return f


def _dots(period, depth=0.3):
    def f(u, v):
        a, b = _triangle_wave(u / period), _triangle_wave(v / period)
        return 1.0 + depth * ((a * a + b * b > 1.2) - 0.3)
    return f


def _checks(period, depth=0.5):
    def f(u, v):
        a = np.floor(u / period) + np.floor(v / period)
        return 1.0 + depth * ((a - 2 * np.floor(a / 2)) - 0.5)
    return f


def _chevrons(period, depth=0.25):
    def f(u, v):
        return 1.0 + depth * (_triangle_wave((u + np.abs(v)) / period) - 0.5)
    return f


# -- the six classes ------------------------------------------------------------------------------


def _car(rng):
    body_c = _class_colour(rng, 0)
    glass = _contrasting_colour(rng, body_c)
    tyre = _contrasting_colour(rng, body_c, 90)
    hub = _contrasting_colour(rng, tyre)
    length = rng.uniform(0.9, 1.0)
    h = rng.uniform(0.2, 0.28)
    cab_w, cab_top = rng.uniform(0.45, 0.62), rng.uniform(0.38, 0.5)
    cab_x = rng.uniform(-0.08, 0.08)
    base_y = 0.12
    body = union(
        rrect(0, base_y, length, h, r=0.06),
        polygon([(cab_x - cab_w / 2, base_y - h / 2 + 0.01), (cab_x + cab_w / 2, base_y - h / 2 + 0.01),
                 (cab_x + cab_w * 0.35, base_y - cab_top), (cab_x - cab_w * 0.35, base_y - cab_top)]),
    )
    win_top = base_y - cab_top + 0.04
    win_bot = base_y - h / 2 - 0.02
    windows = [
        (polygon([(cab_x - cab_w * 0.42, win_bot), (cab_x - 0.02, win_bot), (cab_x - 0.02, win_top),
                  (cab_x - cab_w * 0.3, win_top)]), glass),
        (polygon([(cab_x + 0.02, win_bot), (cab_x + cab_w * 0.42, win_bot), (cab_x + cab_w * 0.3, win_top),
                  (cab_x + 0.02, win_top)]), glass),
        (ellipse(length / 2 - 0.06, base_y - 0.02, 0.05, 0.04), _contrasting_colour(rng, body_c)),
    ]
    wr = rng.uniform(0.1, 0.14)
    wheel_x = length / 2 - wr - rng.uniform(0.04, 0.1)
    parts = [Part(body, body_c, windows, _checks(0.09))]
    for x in (-wheel_x, wheel_x):
        parts.append(Part(ellipse(x, base_y + h / 2, wr, wr), tyre, [(ellipse(x, base_y + h / 2, wr * 0.5, wr * 0.5), hub)]))
    return parts


def _boat(rng):
    hull_c = _class_colour(rng, 1)
    sail_c = _contrasting_colour(rng, hull_c)
    mast_c = _contrasting_colour(rng, sail_c)
    top_w, bot_w = rng.uniform(0.8, 1.0), rng.uniform(0.45, 0.65)
    hull_h = rng.uniform(0.22, 0.28)
    hull_top = 0.5 - hull_h
    hull = polygon([(-top_w / 2, hull_top), (top_w / 2, hull_top), (bot_w / 2, 0.5), (-bot_w / 2, 0.5)])
    holes = [(ellipse(x, hull_top + hull_h * 0.45, 0.08, 0.08), _contrasting_colour(rng, hull_c))
             for x in np.linspace(-top_w * 0.22, top_w * 0.22, 2)]
    mast_x = rng.uniform(-0.08, 0.08)
    mast = rrect(mast_x, (hull_top - 0.5) / 2, 0.05, hull_top + 0.5)
    sail_w = rng.uniform(0.3, 0.42)
    sail = polygon([(mast_x + 0.03, -0.45), (mast_x + 0.03, hull_top - 0.05), (mast_x + 0.03 + sail_w, hull_top - 0.05)])
    stripe = polygon([(mast_x + 0.03, hull_top - 0.3), (mast_x + 0.03, hull_top - 0.1),
                      (mast_x + 0.03 + sail_w * 0.87, hull_top - 0.1), (mast_x + 0.03 + sail_w * 0.45, hull_top - 0.3)])
    parts = [Part(hull, hull_c, holes, _stripes(0.08, depth=0.5)), Part(mast, mast_c, []),
             Part(minus(sail, mast), sail_c, [(stripe, _contrasting_colour(rng, sail_c))])]
    if rng.random() < 0.5:  # a jib in front of the mast
        jib = polygon([(mast_x - 0.03, -0.35), (mast_x - 0.03, hull_top - 0.05), (mast_x - 0.03 - sail_w * 0.6, hull_top - 0.05)])
        parts.append(Part(jib, _contrasting_colour(rng, hull_c), []))
    return parts


def _person(rng):
    skin = _random_colour(rng)
    shirt = _class_colour(rng, 2)
    trousers = _contrasting_colour(rng, shirt)
    head_r = rng.uniform(0.12, 0.15)
    head_y = -0.5 + head_r
    torso_top = head_y + head_r + 0.01
    torso_h = rng.uniform(0.3, 0.36)
    torso_w = rng.uniform(0.3, 0.38)
    hip_y = torso_top + torso_h
    hair = minus(ellipse(0, head_y - head_r * 0.35, head_r * 1.05, head_r * 0.75), rrect(0, head_y + head_r * 0.4, 1, head_r * 1.1))
    head = Part(ellipse(0, head_y, head_r * 0.9, head_r), skin, [(hair, _contrasting_colour(rng, skin))])
    belt = rrect(0, hip_y - 0.06, torso_w, 0.12)
    torso = Part(rrect(0, torso_top + torso_h / 2, torso_w, torso_h, r=0.05), shirt, [(belt, _contrasting_colour(rng, shirt))],
                 _stripes(0.08, vertical=True, depth=0.5))
    arm_r = rng.uniform(0.05, 0.065)
    parts = [head, torso]
    for side in (-1, 1):
        a = rng.uniform(0.1, 0.9)
        ex, ey = side * (torso_w / 2 + 0.05 + 0.12 * a), torso_top + 0.3 - 0.12 * a
        parts.append(Part(capsule(side * (torso_w / 2 + arm_r * 0.3), torso_top + 0.04, ex, ey, arm_r), shirt * 0.8 + skin * 0.2, []))
    leg_r = rng.uniform(0.07, 0.085)
    shoe_c = _contrasting_colour(rng, trousers)
    for side in (-1, 1):
        fx = side * rng.uniform(0.05, 0.16)
        shoe = ellipse(fx + side * 0.03, 0.5 - leg_r * 1.1, leg_r * 1.6, leg_r * 1.1)
        parts.append(Part(union(capsule(side * torso_w * 0.25, hip_y, fx, 0.5 - leg_r, leg_r), shoe), trousers, [(shoe, shoe_c)]))
    return parts


def _flower(rng):
    petal_c = _class_colour(rng, 3)
    centre_c = _contrasting_colour(rng, petal_c)
    stem_c = _contrasting_colour(rng, petal_c)
    bloom_y = rng.uniform(-0.27, -0.2)
    n = int(rng.integers(5, 9))
    pl, pw = rng.uniform(0.15, 0.2), rng.uniform(0.07, 0.1)
    phase = rng.uniform(0, 2 * math.pi)
    centre_r = rng.uniform(0.09, 0.12)
    petals = []
    for k in range(n):
        a = phase + 2 * math.pi * k / n
        d = centre_r + pl * 0.75
        petals.append((ellipse(d * math.cos(a), bloom_y + d * math.sin(a), pl, pw, a), petal_c))
    centre = ellipse(0, bloom_y, centre_r, centre_r)
    bloom = union(centre, *[p for p, _ in petals])
    # sub-parts: each petal outside the centre, and the centre itself
    subs = [(minus(p, centre), c) for p, c in petals] + [(centre, centre_c)]
    stem_r = rng.uniform(0.035, 0.045)
    bend = rng.uniform(-0.08, 0.08)
    stem = union(capsule(0, bloom_y, bend, 0.15, stem_r), capsule(bend, 0.15, 0, 0.5, stem_r))
    leaf_c = stem_c * 0.7 + _random_colour(rng) * 0.3
    leaves = []
    for side, y in ((-1, rng.uniform(0.15, 0.3)), (1, rng.uniform(0.2, 0.38))):
        lx = side * rng.uniform(0.1, 0.14)
        leaves.append(Part(minus(ellipse(lx + bend * 0.5, y, 0.1, 0.04, side * 0.5), stem), leaf_c, []))
    return [Part(minus(stem, bloom), stem_c, []), *leaves, Part(bloom, petal_c, subs, _dots(0.07, depth=0.5))]


def _fish(rng):
    body_c = _class_colour(rng, 4)
    fin_c = _contrasting_colour(rng, body_c)
    bl, bh = rng.uniform(0.32, 0.38), rng.uniform(0.18, 0.22)
    bx = rng.uniform(0.06, 0.1)
    body = ellipse(bx, 0, bl, bh)
    tail_x = bx - bl + 0.04
    tail_w = rng.uniform(0.18, 0.24)
    tail = minus(polygon([(tail_x, 0), (tail_x - tail_w, -bh * 1.1), (tail_x - tail_w * 0.8, 0), ]), body)
    tail2 = minus(polygon([(tail_x, 0), (tail_x - tail_w * 0.8, 0), (tail_x - tail_w, bh * 1.1)]), body)
    fin = minus(polygon([(bx - 0.12, -bh * 0.8), (bx + 0.1, -bh * 0.85), (bx - 0.12, -bh * 1.6)]), body)
    eye = ellipse(bx + bl * 0.55, -bh * 0.15, 0.09, 0.09)
    body_part = Part(body, body_c, [(eye, _contrasting_colour(rng, body_c, 100))], _scales(0.09, depth=0.5))
    return [Part(union(tail, tail2), fin_c, []), Part(fin, fin_c * 0.8 + body_c * 0.2, []), body_part]


def _plane(rng):
    body_c = _class_colour(rng, 5)
    wing_c = _contrasting_colour(rng, body_c, 50)
    fl, fr = rng.uniform(0.44, 0.5), rng.uniform(0.1, 0.12)
    fuselage = union(rrect(0, 0, fl * 2, fr * 2, r=fr), ellipse(fl - fr * 0.2, 0, fr * 1.6, fr))
    sweep = rng.uniform(0.05, 0.15)
    span = rng.uniform(0.38, 0.46)
    wx = rng.uniform(-0.02, 0.1)
    chord = rng.uniform(0.18, 0.24)
    eng_c = _contrasting_colour(rng, wing_c)
    parts = []
    for side in (-1, 1):
        wing = polygon([(wx + chord / 2, side * fr * 0.5), (wx - chord / 2, side * fr * 0.5),
                        (wx - chord / 2 - sweep, side * span), (wx - chord / 2 - sweep + chord * 0.5, side * span)])
        engine = ellipse(wx - sweep * 0.45, side * span * 0.6, 0.1, 0.07)
        parts.append(Part(minus(wing, fuselage), wing_c, [(minus(engine, fuselage), eng_c)], _chevrons(0.12, depth=0.5)))
    tail = polygon([(-fl + 0.02, 0), (-fl + 0.12, -fr), (-fl - 0.02, -0.2), (-fl - 0.08, -0.2)])
    tail2 = polygon([(-fl + 0.02, 0), (-fl + 0.12, fr), (-fl - 0.02, 0.2), (-fl - 0.08, 0.2)])
    parts.append(Part(minus(union(tail, tail2), fuselage), wing_c * 0.7 + body_c * 0.3, []))
    cockpit = ellipse(fl - fr * 0.5, 0, fr * 1.4, fr * 0.85)
    parts.append(Part(fuselage, body_c, [(cockpit, _contrasting_colour(rng, body_c))],
                      _stripes(0.08, vertical=True, depth=0.5)))
    return parts


_BUILDERS = (_car, _boat, _person, _flower, _fish, _plane)


def _with_class_pattern(parts: list[Part]) -> list[Part]:
    """Every part without a pattern takes the class's: that of the last patterned part (the main
    part; a plane's fuselage). The class is then recognisable on any of its parts."""
    main = [p.pattern for p in parts if p.pattern is not None][-1]
    for p in parts:
        if p.pattern is None:
            p.pattern = main
    return parts

# Plane is seen from above (any heading); the others stand upright and may tilt a little.
_MAX_TILT = (0.25, 0.2, 0.25, 0.35, 0.5, math.pi)


# -- backgrounds ----------------------------------------------------------------------------------


def _kind_colour(rng, kind: str) -> np.ndarray:
    """Usual colours of a background kind, with wide variation (and occasional outliers)."""
    if rng.random() < 0.12:
        return _random_colour(rng)
    hue, sat, val = {
        "sky": (rng.uniform(0.52, 0.64), rng.uniform(0.2, 0.7), rng.uniform(0.65, 1.0)),
        "mountain": (rng.uniform(0.0, 0.75), rng.uniform(0.05, 0.35), rng.uniform(0.3, 0.7)),
        "grass": (rng.uniform(0.17, 0.38), rng.uniform(0.35, 0.85), rng.uniform(0.3, 0.8)),
        "water": (rng.uniform(0.45, 0.62), rng.uniform(0.3, 0.8), rng.uniform(0.3, 0.85)),
        "road": (rng.uniform(0.0, 1.0), rng.uniform(0.0, 0.12), rng.uniform(0.2, 0.55)),
        "wall": (rng.uniform(0.0, 0.12), rng.uniform(0.2, 0.65), rng.uniform(0.4, 0.85)),
    }[kind]
    if kind == "sky" and rng.random() < 0.25:  # dusk or overcast
        hue, sat = rng.uniform(0.0, 0.12), rng.uniform(0.1, 0.5)
    return _hsv_to_rgb(hue, sat, val)


def _texture(rng, kind: str, h: int, w: int) -> np.ndarray:
    """(h, w, 3) float texture of one background kind over the whole canvas."""
    yy = np.arange(h, dtype=np.float64)[:, None]
    xx = np.arange(w, dtype=np.float64)[None, :]
    base = _kind_colour(rng, kind)
    other = _kind_colour(rng, kind)
    if kind == "sky":
        t = (yy / h) * np.ones((1, w))
        img = base * (1 - t[..., None]) + (base * 0.5 + 255 * 0.5) * t[..., None]
        clouds = _value_noise(rng, h, w, 3, 5)
        clouds = np.clip((clouds - rng.uniform(0.5, 0.7)) * 4.0, 0, 1)[..., None]
        img = img * (1 - 0.8 * clouds) + 245 * 0.8 * clouds
    elif kind == "mountain":
        n = _value_noise(rng, h, w, 12, 12)[..., None]
        img = base * (0.75 + 0.5 * n) + rng.normal(0, 6, (h, w, 1))
    elif kind == "grass":
        blades = _value_noise(rng, h, w, max(h // 4, 2), max(w // 2, 2))[..., None]
        patches = _value_noise(rng, h, w, 4, 4)[..., None]
        img = base * (0.6 + 0.6 * blades) * (0.85 + 0.3 * patches) + rng.normal(0, 8, (h, w, 3))
    elif kind == "water":
        wobble = _value_noise(rng, h, w, 4, 6) * rng.uniform(0.5, 2.0)
        period = rng.uniform(5, 12)
        waves = _triangle_wave(yy / period + wobble)[..., None]
        img = base * (0.8 + 0.35 * waves) + rng.normal(0, 4, (h, w, 3))
    elif kind == "road":
        img = base * (0.9 + 0.2 * _value_noise(rng, h, w, 20, 20)[..., None]) + rng.normal(0, 7, (h, w, 3))
        lane_y = rng.uniform(0.3, 0.7)
        dash = rng.uniform(14, 30)
        mark = (np.abs(yy / h - lane_y) < rng.uniform(0.008, 0.02)) & (_triangle_wave(xx / dash) > 0.5)
        paint = np.array([240.0, 240.0, 240.0]) if rng.random() < 0.6 else np.array([235.0, 200.0, 40.0])
        img = np.where(mark[..., None], paint, img)
    else:  # wall: bricks in offset rows
        bh = rng.uniform(8, 16)
        bw = bh * rng.uniform(1.8, 3.0)
        row = np.floor(yy / bh)
        shift = (row - 2 * np.floor(row / 2)) * 0.5  # odd rows shifted half a brick
        col = np.floor(xx / bw + shift)
        mortar = ((yy - row * bh) < 1.5) | ((xx / bw + shift - col) * bw < 1.5)
        brick_noise = _brick_jitter(rng, row, col)
        img = base * (0.85 + 0.3 * brick_noise)[..., None] + rng.normal(0, 5, (h, w, 3))
        img = np.where(mortar[..., None], other * 0.4 + 150 * 0.6, img)
    return img


def _brick_jitter(rng, row: np.ndarray, col: np.ndarray) -> np.ndarray:
    """A per-brick random value in [0, 1], by hashing (row, col) through a lookup table."""
    table = rng.random(4096)
    key = ((row.astype(np.int64) * 131 + col.astype(np.int64) * 31) % 4096 + 4096) % 4096
    return table[key]


def _layout(rng, h: int, w: int) -> np.ndarray:
    """(h, w) uint8 background kind map: an outdoor scene (sky over mountain / ground) or a wall."""
    yy = np.arange(h, dtype=np.float64)[:, None]
    xx = np.arange(w, dtype=np.float64)[None, :]
    kinds = np.zeros((h, w), np.uint8)
    K = {k: i for i, k in enumerate(BACKGROUND_KINDS)}
    horizon = h * rng.uniform(0.25, 0.65) + (xx - w / 2) * rng.uniform(-0.15, 0.15) \
        + (_value_noise(rng, 1, w, 1, 3)[0] - 0.5) * h * 0.08
    if rng.random() < 0.3:  # a wall above the ground instead of sky
        top = K["wall"]
    else:
        top = K["sky"]
    kinds[:] = top
    if top == K["sky"] and rng.random() < 0.45:
        ridge = horizon - h * rng.uniform(0.06, 0.22) * (0.4 + _value_noise(rng, 1, w, 1, int(rng.integers(3, 8)))[0])
        kinds[(yy >= ridge) & (yy < horizon)] = K["mountain"]
    ground = [K["grass"], K["water"], K["road"]][int(rng.integers(3))]
    kinds[yy >= horizon] = ground
    if rng.random() < 0.35:  # a second ground band (a road through grass, a shore...)
        second = [k for k in (K["grass"], K["water"], K["road"]) if k != ground][int(rng.integers(2))]
        a = horizon + (h - horizon) * rng.uniform(0.2, 0.6)
        b = a + h * rng.uniform(0.1, 0.25)
        kinds[(yy >= a) & (yy < b) & (yy >= horizon)] = second
    return kinds


def _shape_blob(rng) -> Callable:
    """A distractor shape in a unit frame: an irregular blob, a convex polygon or a ring."""
    r = rng.random()
    if r < 0.5:
        ells = [ellipse(rng.uniform(-0.2, 0.2), rng.uniform(-0.2, 0.2), rng.uniform(0.12, 0.3),
                        rng.uniform(0.12, 0.3), rng.uniform(0, math.pi)) for _ in range(int(rng.integers(2, 5)))]
        return union(*ells)
    if r < 0.8:
        n = int(rng.integers(3, 7))
        phase = rng.uniform(0, 2 * math.pi)
        rad = rng.uniform(0.3, 0.5)
        return polygon([(rad * math.cos(phase + 2 * math.pi * k / n), rad * math.sin(phase + 2 * math.pi * k / n))
                        for k in range(n)])
    return minus(ellipse(0, 0, 0.45, 0.45), ellipse(0, 0, rng.uniform(0.2, 0.32), rng.uniform(0.2, 0.32)))


# -- composition ----------------------------------------------------------------------------------


@dataclass
class _Placed:
    y0: int
    x0: int
    mask: np.ndarray          # (h, w) bool, the object's footprint in its box
    part_idx: np.ndarray      # (h, w) int32, 1-based part index, 0 outside
    sub_idx: np.ndarray       # (h, w) int32, 1-based sub-part index (global within object), 0 none
    colour: np.ndarray        # (h, w, 3) float
    plain: np.ndarray         # (h, w, 3) float: the colour with no sub-part drawn (their parts' colour)


def _holds_square(mask: np.ndarray, side: int) -> bool:
    """Whether ``mask`` contains a ``side`` x ``side`` square of True pixels (integral image)."""
    if side <= 1:
        return bool(mask.any())
    if mask.shape[0] < side or mask.shape[1] < side:
        return False
    c = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.int64)
    c[1:, 1:] = mask.cumsum(0).cumsum(1)
    win = c[side:, side:] - c[:-side, side:] - c[side:, :-side] + c[:-side, :-side]
    return bool((win == side * side).any())


def _min_subpart_side(canvas_hw: tuple[int, int]) -> int:
    """``MIN_SUBPART_SQUARE`` in pixels of an image of this size (SAM resizes its long side)."""
    return math.ceil(MIN_SUBPART_SQUARE * max(canvas_hw) / SAM_INPUT_SIDE)


def _render_object(rng, parts: list[Part], size: float, tilt: float, flip: bool, aspect: float,
                   canvas_hw: tuple[int, int], cy: float, cx: float) -> _Placed | None:
    h, w = canvas_hw
    half = size * 0.8 * max(aspect, 1 / aspect)  # the local frame's box, rotated, fits in this
    y0, y1 = max(int(cy - half), 0), min(int(cy + half) + 1, h)
    x0, x1 = max(int(cx - half), 0), min(int(cx + half) + 1, w)
    if y1 - y0 < 2 or x1 - x0 < 2:
        return None
    ys = np.arange(y0, y1, dtype=np.float64)[:, None] + 0.5
    xs = np.arange(x0, x1, dtype=np.float64)[None, :] + 0.5
    c, s = math.cos(tilt), math.sin(tilt)
    dx, dy = xs - cx, ys - cy
    u = (dx * c + dy * s) / (size * aspect)
    v = (-dx * s + dy * c) / (size / aspect)
    if flip:
        u = -u
    shape = (y1 - y0, x1 - x0)
    mask = np.zeros(shape, bool)
    part_idx = np.zeros(shape, np.int32)
    sub_idx = np.zeros(shape, np.int32)
    colour = np.zeros((*shape, 3))
    plain = np.zeros((*shape, 3))
    min_side = _min_subpart_side(canvas_hw)
    n_sub = 0
    # shading across the object: a linear ramp in a random direction
    g = rng.uniform(-0.25, 0.25, size=2)
    shade = 1.0 + g[0] * u + g[1] * v
    for k, part in enumerate(parts, start=1):
        m = part.shape(u, v)
        m = np.broadcast_to(m, shape)
        mask |= m
        part_idx[m] = k
        sub_idx[m] = 0
        if part.pattern is None:
            colour[m] = part.colour
        else:
            factor = np.broadcast_to(part.pattern(u, v), shape)
            colour[m] = part.colour * factor[m][:, None]
        plain[m] = colour[m]
        for sub_shape, sub_colour in part.subparts:
            sm = np.broadcast_to(sub_shape(u, v), shape) & m
            if not _holds_square(sm, min_side):
                continue  # too small to draw: the part's surface continues
            n_sub += 1
            sub_idx[sm] = n_sub
            colour[sm] = sub_colour
    if mask.sum() < 16:
        return None
    noise = rng.normal(0, rng.uniform(2, 8), (*shape, 1))
    colour = colour * shade[..., None] + noise
    plain = plain * shade[..., None] + noise
    return _Placed(y0, x0, mask, part_idx, sub_idx, colour, plain)


def _image_size(rng) -> tuple[int, int]:
    def side():
        while True:
            v = int(rng.integers(SIZE_RANGE[0], SIZE_RANGE[1] + 1))
            if v % 16:
                return v
    return side(), side()


def _blur(img: np.ndarray) -> np.ndarray:
    """Separable [1, 2, 1] / 4 blur with edge replication (softens the rasterised edges)."""
    p = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
    p = (p[:-2] + 2 * p[1:-1] + p[2:]) * 0.25
    return (p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]) * 0.25


def _boundary_band(ids: np.ndarray) -> np.ndarray:
    """Pixels whose 3x3 neighbourhood holds more than one id (a 2-px band along each edge)."""
    p = np.pad(ids, 1, mode="edge")
    h, w = ids.shape
    lo, hi = ids.copy(), ids.copy()
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            win = p[dy:dy + h, dx:dx + w]
            lo = np.minimum(lo, win)
            hi = np.maximum(hi, win)
    return lo != hi


def render(seed: int, index: int, stream: int = DEMO_STREAM) -> WorldImage:
    """Image ``index`` of world ``seed`` in ``stream`` (deterministic, machine independent)."""
    rng = _rng(seed, stream, index)
    h, w = _image_size(rng)
    kinds = _layout(rng, h, w)
    image = np.zeros((h, w, 3))
    for k, kind in enumerate(BACKGROUND_KINDS):
        sel = kinds == k
        if sel.any():
            image[sel] = _texture(rng, kind, h, w)[sel]
    # wholes: background regions first (one id per kind present)
    whole = np.zeros((h, w), np.int32)
    part = np.zeros((h, w), np.int32)
    subpart = np.zeros((h, w), np.int32)
    stuff = kinds.copy()
    instance_class = [-1]
    for k in range(len(BACKGROUND_KINDS)):
        sel = kinds == k
        if sel.any():
            instance_class.append(-1)
            whole[sel] = len(instance_class) - 1
    next_part, next_sub = 1, 1

    # small clutter on the background (texture only: pebbles, spots)
    for _ in range(int(rng.integers(0, 12))):
        r = rng.uniform(1.5, 4.0)
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        yy = np.arange(h, dtype=np.float64)[:, None] - cy
        xx = np.arange(w, dtype=np.float64)[None, :] - cx
        image[yy * yy + xx * xx <= r * r] = _random_colour(rng)

    # foreground: objects of 1-3 classes and 0-3 distractors, in random depth order
    n_classes = int(rng.integers(1, 4))
    n_objects = int(rng.integers(n_classes, 5))
    classes = rng.choice(len(DEMO_CLASSES), size=n_classes, replace=False)
    owners = list(classes) + list(rng.choice(classes, size=n_objects - n_classes))
    items = [("object", int(c)) for c in owners] + [("distractor", -1)] * int(rng.integers(0, 4))
    order = rng.permutation(len(items))
    short = min(h, w)
    occupancy = np.zeros((h, w), np.int32)  # which item (1-based, by placement) is on top
    placed: list[tuple[str, int, _Placed]] = []
    for i in order:
        kind, cls = items[int(i)]
        for _attempt in range(8):
            if kind == "object":
                # fewer objects, larger sizes: the largest fits about 60 % of the short side; the
                # power 0.35 leans towards large objects, which a 16-px patch grid can resolve
                lo, hi = OBJECT_SIZE_RANGE[0], OBJECT_SIZE_RANGE[1] / (1 + 0.1 * (n_objects - 1))
                size = short * (lo + (hi - lo) * rng.random() ** 0.35)
                parts = _with_class_pattern(_BUILDERS[cls](rng))
                tilt = rng.uniform(-_MAX_TILT[cls], _MAX_TILT[cls])
                aspect = math.sqrt(rng.uniform(0.8, 1.25))
                flip = bool(rng.random() < 0.5)
            else:
                size = short * rng.uniform(0.08, 0.35)
                parts = [Part(_shape_blob(rng), _random_colour(rng), [])]
                tilt, aspect, flip = rng.uniform(0, math.pi), math.sqrt(rng.uniform(0.6, 1.6)), False
            margin = size * 0.35
            cy = rng.uniform(margin, h - margin)
            cx = rng.uniform(margin, w - margin)
            obj = _render_object(rng, parts, size, tilt, flip, aspect, (h, w), cy, cx)
            if obj is None:
                continue
            sl = (slice(obj.y0, obj.y0 + obj.mask.shape[0]), slice(obj.x0, obj.x0 + obj.mask.shape[1]))
            trial = occupancy.copy()
            trial[sl][obj.mask] = len(placed) + 1
            # every placed object (this one included) must keep enough of itself visible
            ok = True
            for j, (k2, _, o2) in enumerate(placed + [(kind, cls, obj)], start=1):
                if k2 != "object":
                    continue
                sl2 = (slice(o2.y0, o2.y0 + o2.mask.shape[0]), slice(o2.x0, o2.x0 + o2.mask.shape[1]))
                visible = (trial[sl2][o2.mask] == j).sum()
                if visible < MIN_VISIBLE * o2.mask.sum():
                    ok = False
                    break
            if ok:
                occupancy = trial
                placed.append((kind, cls, obj))
                break
    # paint in placement order: later items are on top
    present = set()
    for j, (kind, cls, obj) in enumerate(placed, start=1):
        sl = (slice(obj.y0, obj.y0 + obj.mask.shape[0]), slice(obj.x0, obj.x0 + obj.mask.shape[1]))
        vis = obj.mask & (occupancy[sl] == j)
        if not vis.any():
            continue
        if kind == "object":
            # a sub-part that occlusion leaves too small is painted over with its part's surface
            for k in np.unique(obj.sub_idx[vis & (obj.sub_idx > 0)]):
                if not _holds_square(vis & (obj.sub_idx == k), _min_subpart_side((h, w))):
                    gone = obj.sub_idx == k
                    obj.colour[gone] = obj.plain[gone]
                    obj.sub_idx[gone] = 0
        image[sl][vis] = obj.colour[vis]
        stuff[sl][vis] = IGNORE
        instance_class.append(cls)
        wid = len(instance_class) - 1
        whole[sl][vis] = wid
        if kind == "object":
            present.add(cls)
            pid = np.where(obj.part_idx > 0, obj.part_idx + next_part - 1, 0)
            sid = np.where(obj.sub_idx > 0, obj.sub_idx + next_sub - 1, 0)
            part[sl][vis] = pid[vis]
            subpart[sl][vis] = sid[vis]
            next_part += int(obj.part_idx.max())
            next_sub += int(obj.sub_idx.max())
        else:
            part[sl][vis] = 0
            subpart[sl][vis] = 0
    image = _blur(image) + rng.normal(0, rng.uniform(1.0, 4.0), (h, w, 3))
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)

    instance_class = np.array(instance_class, np.int16)
    obj_cls = instance_class[whole]
    label = np.where(obj_cls >= 0, obj_cls + 1, 0).astype(np.uint8)
    obj_ids = np.where(obj_cls >= 0, whole, 0)
    label[_boundary_band(obj_ids)] = IGNORE
    visible_classes = tuple(sorted(int(c) for c in np.unique(obj_cls) if c >= 0))
    return WorldImage(image, label, visible_classes, whole, part, subpart, stuff, instance_class)


def point_masks(sample: WorldImage, y: int, x: int) -> np.ndarray:
    """(3, H, W) bool: the sub-part, part and whole under pixel (y, x) (SAM's level order).

    A whole without parts (background region, distractor) repeats itself at every level; a part
    without sub-parts repeats itself at level 0.
    """
    whole = sample.whole == sample.whole[y, x]
    pid, sid = sample.part[y, x], sample.subpart[y, x]
    part = sample.part == pid if pid > 0 else whole
    sub = sample.subpart == sid if sid > 0 else part
    return np.stack([sub, part, whole])
