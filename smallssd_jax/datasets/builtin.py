"""'builtin_small': a generated small-object detection dataset, no files needed.

Each image is a function of (seed, split, index) only: a textured, cluttered
background (multi-scale noise, colour gradients, fine noise, thin distractor
strokes and arcs) with `min_objects..max_objects` non-overlapping shapes.

Classes differ by shape or texture, never by colour: every object gets a
random colour whose luminance is at least `_MIN_CONTRAST` away from the
background under it (clear enough for a tiny detector to learn in minutes).
Sizes (the square root of the box area, in pixels at `image_size`) are
log-uniform in [min_size, max_size]: with the defaults 6..64 about 70% of the
objects are COCO-small (< 32^2 px).

Splits draw from disjoint random streams: the stream of an image is
`SeedSequence([seed, split_tag, index])` with a different `split_tag` per
split, so no train image can reappear in the test split for any index.
Generation is numpy + PIL drawing only (a few milliseconds per 300x300 image).
"""

from __future__ import annotations

import functools
import math

import numpy as np
from PIL import Image, ImageDraw

from smallssd_jax.datasets import records

# Class names in label order; `num_classes` takes the first K.
SHAPES = ('circle', 'square', 'triangle', 'cross', 'ring', 'checker',
          'diamond', 'frame', 'stripes', 'half_disc')
SPLIT_TAGS = {'train': 0x5EED_7A1, 'test': 0x7E57_0B}
SPLIT_ALIASES = {'val': 'test', 'validation': 'test', 'eval': 'test'}
_MIN_CONTRAST = 70.0          # luminance gap object vs background (0..255)
_MAX_OVERLAP = 0.15           # max intersection / smaller area between objects
_LUMA = np.array([0.299, 0.587, 0.114])
_TILE_COUNT = 4


def split_name(split: str) -> str:
  split = SPLIT_ALIASES.get(split, split)
  if split not in SPLIT_TAGS:
    raise ValueError(f'builtin_small has splits train and test, got {split!r}')
  return split


@functools.lru_cache(maxsize=4)
def _texture_bank(seed: int, size: int) -> np.ndarray:
  """RGB texture tiles [T, 2S, 2S, 3] uint8 centred on 128, made once per process.

  Multi-scale grey noise (its coarsest octave acts as a brightness gradient),
  a smooth per-channel colour gradient and fine per-pixel noise. Made from the
  seed alone; each image views a random window of one tile through its own
  colour lookup table, which keeps backgrounds cheap and deterministic.
  """
  rng = np.random.default_rng(np.random.SeedSequence([seed, 0x7E47]))
  big = 2 * size

  def octave(cells: int) -> np.ndarray:
    small = rng.uniform(-1.0, 1.0, (cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(small, mode='F').resize((big, big), Image.BICUBIC))

  tiles = []
  for _ in range(_TILE_COUNT):
    grey = sum(w * octave(c) for c, w in ((3, 1.0), (12, 0.6), (40, 0.45), (big // 3, 0.3)))
    grey /= np.abs(grey).max() + 1e-6
    colour = np.stack([octave(2) for _ in range(3)], -1) * 0.35
    fine = rng.uniform(-0.25, 0.25, (big, big, 3)).astype(np.float32)
    tile = 128.0 + 110.0 * (grey[..., None] * 0.75 + colour + fine)
    tiles.append(np.clip(tile, 0, 255).astype(np.uint8))
  return np.stack(tiles)


def _background(rng: np.random.Generator, seed: int,
                size: int) -> tuple[Image.Image, np.ndarray, np.ndarray]:
  """The background image, plus the tile window and lookup table it came from."""
  tiles = _texture_bank(seed, size)
  tile = tiles[rng.integers(len(tiles))]
  oy, ox = (int(v) for v in rng.integers(0, size, 2))
  window = np.ascontiguousarray(tile[oy:oy + size, ox:ox + size])
  # One lookup table per channel: base colour, contrast and sign of the texture.
  base = rng.uniform(70, 186) + rng.uniform(-30, 30, 3)
  gain = rng.uniform(0.25, 0.7) * rng.uniform(0.8, 1.2, 3) * rng.choice([-1.0, 1.0])
  ramp = np.arange(256, dtype=np.float64) - 128.0
  lut = np.clip(base[:, None] + gain[:, None] * ramp[None, :], 0, 255).astype(np.uint8)
  return Image.fromarray(window).point(lut.reshape(-1).tolist()), window, lut


def _clutter(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int) -> None:
  """Thin strokes and arcs: edges that are not objects."""
  n_lines = int(rng.integers(4, 13))
  ends = rng.integers(0, size, (n_lines, 4)).tolist()
  colours = [tuple(c) for c in rng.integers(0, 256, (n_lines, 3)).tolist()]
  widths = rng.integers(1, 3, n_lines).tolist()
  for end, colour, width in zip(ends, colours, widths):
    draw.line(end, fill=colour, width=width)
  n_arcs = int(rng.integers(0, 4))
  centres = rng.integers(0, size, (n_arcs, 2)).tolist()
  radii = rng.integers(10, size // 2, n_arcs).tolist()
  starts = rng.uniform(0, 360, n_arcs).tolist()
  spans = rng.uniform(30, 200, n_arcs).tolist()
  colours = [tuple(c) for c in rng.integers(0, 256, (n_arcs, 3)).tolist()]
  for (cx, cy), r, start, span, colour in zip(centres, radii, starts, spans, colours):
    draw.arc((cx - r, cy - r, cx + r, cy + r), start, start + span, fill=colour, width=1)


def _contrasting_colours(rng: np.random.Generator, bg_luma: np.ndarray) -> np.ndarray:
  """Random colours [n, 3] whose luminance differs from `bg_luma` [n] by >= _MIN_CONTRAST."""
  n = len(bg_luma)
  can_up = bg_luma + _MIN_CONTRAST <= 255
  can_down = bg_luma - _MIN_CONTRAST >= 0
  up = can_up & (~can_down | (rng.random(n) < 0.5))
  lo = np.where(up, bg_luma + _MIN_CONTRAST, np.maximum(0.0, bg_luma - 150))
  hi = np.where(up, np.minimum(255.0, bg_luma + 150), bg_luma - _MIN_CONTRAST)
  target = lo + rng.random(n) * np.maximum(hi - lo, 0.0)
  colour = rng.uniform(0, 255, (n, 3))
  # Shift to the target luminance; clipping can eat into the gap, so twice.
  for _ in range(2):
    colour = np.clip(colour + (target - colour @ _LUMA)[:, None], 0, 255)
  return np.round(colour).astype(np.int64)


def _conflicts(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """[len(a), len(b)] bool: inclusive pixel boxes overlapping by more than _MAX_OVERLAP."""
  lo = np.maximum(a[:, None, :2], b[None, :, :2])
  hi = np.minimum(a[:, None, 2:], b[None, :, 2:])
  inter = np.prod(np.clip(hi - lo + 1, 0, None), axis=-1)
  area = lambda x: (x[:, 2] - x[:, 0] + 1) * (x[:, 3] - x[:, 1] + 1)
  return inter > _MAX_OVERLAP * np.minimum(area(a)[:, None], area(b)[None, :])


def _place(rng: np.random.Generator, n: int, size: int, min_size: float,
           max_size: float, taken: np.ndarray | None = None) -> np.ndarray:
  """Up to n boxes `[y0, x0, y1, x1]` (inclusive integer pixels), limited overlap
  with each other and with the boxes already `taken`."""
  m = 3 * n
  side = np.exp(rng.uniform(math.log(min_size), math.log(max_size), m))
  aspect = np.exp(rng.uniform(math.log(0.75), math.log(1.0 / 0.75), m))
  h = np.clip(np.round(side * np.sqrt(aspect)), 3, size).astype(np.int64)
  w = np.clip(np.round(side / np.sqrt(aspect)), 3, size).astype(np.int64)
  y0 = (rng.random(m) * (size - h + 1)).astype(np.int64)
  x0 = (rng.random(m) * (size - w + 1)).astype(np.int64)
  boxes = np.stack([y0, x0, y0 + h - 1, x0 + w - 1], 1)
  # Conflicts between every candidate pair at once, then a greedy pass.
  conflict = _conflicts(boxes, boxes)
  blocked = np.zeros(m, bool)
  if taken is not None and len(taken):
    blocked |= _conflicts(boxes, taken).any(axis=1)
  chosen = []
  for i in range(m):
    if blocked[i]:
      continue
    chosen.append(i)
    if len(chosen) == n:
      break
    blocked |= conflict[i]
  return boxes[chosen]


def _draw_object(image: Image.Image, draw: ImageDraw.ImageDraw, shape: str,
                 box: list[int], colour: tuple[int, ...], second: tuple[int, ...],
                 variant: int) -> None:
  """Draws one shape filling exactly the inclusive pixel box [y0, x0, y1, x1]."""
  y0, x0, y1, x1 = box
  h, w = y1 - y0 + 1, x1 - x0 + 1
  t = max(1, int(round(0.3 * min(h, w))))   # stroke width of crosses, rings, frames
  cy, cx = (y0 + y1) / 2.0, (x0 + x1) / 2.0
  if shape == 'circle':
    draw.ellipse((x0, y0, x1, y1), fill=colour)
  elif shape == 'square':
    draw.rectangle((x0, y0, x1, y1), fill=colour)
  elif shape == 'triangle':
    corners = {
        0: [(x0, y1), (x1, y1), (cx, y0)], 1: [(x0, y0), (x1, y0), (cx, y1)],
        2: [(x0, y0), (x0, y1), (x1, cy)], 3: [(x1, y0), (x1, y1), (x0, cy)],
    }[variant]  # which side the apex points to
    draw.polygon(corners, fill=colour)
  elif shape == 'cross':
    ty, tx = max(1, int(round(0.34 * h))), max(1, int(round(0.34 * w)))
    top, left = y0 + (h - ty) // 2, x0 + (w - tx) // 2
    draw.rectangle((x0, top, x1, top + ty - 1), fill=colour)
    draw.rectangle((left, y0, left + tx - 1, y1), fill=colour)
  elif shape == 'ring':
    draw.ellipse((x0, y0, x1, y1), outline=colour, width=max(1, int(round(0.22 * min(h, w)))))
  elif shape == 'checker':
    period = max(1, int(round(min(h, w) / 4.0)))
    yy, xx = np.mgrid[0:h, 0:w]
    mask = (((yy // period) + (xx // period)) % 2 == 0).astype(np.uint8) * 255
    draw.rectangle((x0, y0, x1, y1), fill=colour)
    image.paste(second, (x0, y0, x1 + 1, y1 + 1), Image.fromarray(mask))
  elif shape == 'diamond':
    draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=colour)
  elif shape == 'frame':
    draw.rectangle((x0, y0, x1, y1), outline=colour, width=t)
  elif shape == 'stripes':
    period = max(2, int(round(h / 3.0)))
    draw.rectangle((x0, y0, x1, y1), fill=colour)
    for y in range(y0 + period // 2, y1 + 1, period):
      draw.rectangle((x0, y, x1, min(y1, y + max(1, period // 2) - 1)), fill=second)
  elif shape == 'half_disc':
    # The lower half of a disc twice as tall as the box: fills [y0, y1] exactly.
    draw.pieslice((x0, y0 - h, x1, y1), 0, 180, fill=colour)
  else:
    raise ValueError(f'unknown shape {shape!r}')


def _distractors(image: Image.Image, draw: ImageDraw.ImageDraw, rng: np.random.Generator, cfg,
                 objects: np.ndarray, window: np.ndarray, lut: np.ndarray) -> None:
  """Unlabelled shapes of the classes left out (`SHAPES[num_classes:]`), as clear as the objects.

  `data.builtin.max_distractors` per image at most (0: none, and no random
  draw, so images without distractors are unchanged). They overlap no object
  by more than _MAX_OVERLAP: a detector must learn the classes' shapes, not
  "a contrasting blob".
  """
  most = int(cfg.max_distractors)
  if most <= 0:
    return
  num_classes = int(cfg.num_classes)
  kinds = SHAPES[num_classes:]
  if not kinds:
    raise ValueError(f'data.builtin.max_distractors needs shapes outside the {num_classes} '
                     f'classes; builtin_small has {len(SHAPES)} shapes in all')
  size = int(cfg.image_size)
  n = int(rng.integers(int(cfg.min_distractors), most + 1))
  boxes = _place(rng, n, size, float(cfg.min_size), float(cfg.max_size), taken=objects)
  if not len(boxes):
    return
  frac = np.array([0.2, 0.5, 0.8])
  ys = np.round(boxes[:, 0:1] + frac * (boxes[:, 2:3] - boxes[:, 0:1])).astype(np.int64)
  xs = np.round(boxes[:, 1:2] + frac * (boxes[:, 3:4] - boxes[:, 1:2])).astype(np.int64)
  under = lut[np.arange(3), window[ys[:, :, None], xs[:, None, :]].reshape(len(boxes), -1, 3)].mean(1)
  colours = _contrasting_colours(rng, under @ _LUMA)
  seconds = _contrasting_colours(rng, colours @ _LUMA)
  shapes = rng.integers(0, len(kinds), len(boxes)).tolist()
  variants = rng.integers(0, 4, len(boxes)).tolist()
  for box, shape, colour, second, variant in zip(boxes.tolist(), shapes, colours.tolist(),
                                                 seconds.tolist(), variants):
    _draw_object(image, draw, kinds[shape], box, tuple(colour), tuple(second), variant)


def render(cfg, split: str, index: int) -> records.Example:
  """Generates example `index` of `split` from the `data.builtin` config.

  Returns:
    an example dict (records.py) with `image` uint8 [S, S, 3] and `boxes`
    `[ymin, xmin, ymax, xmax]` normalised by S (pixel edges, so a box of
    pixels x0..x1 spans [x0 / S, (x1 + 1) / S]).
  """
  split = split_name(split)
  size = int(cfg.image_size)
  num_classes = int(cfg.num_classes)
  if not 1 <= num_classes <= len(SHAPES):
    raise ValueError(f'builtin_small supports 1..{len(SHAPES)} classes, got {num_classes}')
  seed = int(cfg.seed)
  rng = np.random.default_rng(np.random.SeedSequence([seed, SPLIT_TAGS[split], int(index)]))
  image, window, lut = _background(rng, seed, size)
  draw = ImageDraw.Draw(image)
  _clutter(draw, rng, size)
  n = int(rng.integers(int(cfg.min_objects), int(cfg.max_objects) + 1))
  boxes = _place(rng, n, size, float(cfg.min_size), float(cfg.max_size))
  labels = rng.integers(1, num_classes + 1, len(boxes)).astype(np.int32)
  # Background luminance under each object: mean of a 3x3 grid of its pixels
  # (looked up from the texture window, which skips converting the image back).
  frac = np.array([0.2, 0.5, 0.8])
  ys = np.round(boxes[:, 0:1] + frac * (boxes[:, 2:3] - boxes[:, 0:1])).astype(np.int64)
  xs = np.round(boxes[:, 1:2] + frac * (boxes[:, 3:4] - boxes[:, 1:2])).astype(np.int64)
  texels = window[ys[:, :, None], xs[:, None, :]].reshape(len(boxes), -1, 3)
  under = lut[np.arange(3), texels].mean(1)
  colours = _contrasting_colours(rng, under @ _LUMA)
  seconds = _contrasting_colours(rng, colours @ _LUMA)
  variants = rng.integers(0, 4, len(boxes)).tolist()
  for box, label, colour, second, variant in zip(boxes.tolist(), labels.tolist(),
                                                 colours.tolist(), seconds.tolist(), variants):
    _draw_object(image, draw, SHAPES[label - 1], box, tuple(colour), tuple(second), variant)
  _distractors(image, draw, rng, cfg, boxes, window, lut)
  px = boxes.astype(np.float32)
  norm = np.stack([px[:, 0], px[:, 1], px[:, 2] + 1, px[:, 3] + 1], 1) / size if len(px) else (
      np.zeros((0, 4), np.float32))
  return records.make_example(
      image=np.asarray(image), boxes=norm, labels=labels, ignore=np.zeros(len(labels), bool),
      image_id=int(index), orig_size=(size, size), key=f'builtin_small/{split}/{index}')


class BuiltinSmallSource(records.Source):
  """The generated dataset as a `Source` (`len` = data.builtin.num_train / num_test)."""

  def __init__(self, cfg, split: str):
    self.cfg = cfg
    self.split = split_name(split)
    self.class_names = SHAPES[:int(cfg.num_classes)]
    self.length = int(cfg.num_train if self.split == 'train' else cfg.num_test)
    for key in ('min_objects', 'max_objects', 'min_size', 'max_size'):
      if key not in cfg:
        raise KeyError(f'data.builtin.{key} is missing from the config')

  def __len__(self) -> int:
    return self.length

  def __repr__(self) -> str:
    return f'BuiltinSmallSource({self.split!r}, {self.length} images)'

  def record(self, index: int) -> records.Example:
    return render(self.cfg, self.split, self.check_index(index))

  def __getitem__(self, index: int) -> records.Example:
    return self.record(index)
