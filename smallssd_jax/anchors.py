"""Prior (default box, anchor) generators: SSD, DF-SSD and RefineDet styles.

Every generator returns float32 NumPy `[A, 4]` anchors `[cy, cx, h, w]`,
normalised to [0, 1] (docs/design.md §2), made on the host once per config: inside
jit they are constants. The order is the one the heads flatten their outputs in
(docs/architecture.md): level by level, row-major over (y, x), then the anchors
of one location.

A prior of scale `s` and aspect ratio `r` (width / height) has
`w = s * sqrt(r)`, `h = s / sqrt(r)` (SSD paper, section 2.2).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import ml_collections
import numpy as np

Size = int | tuple[int, int]


def _pair(size: float | Sequence[float]) -> tuple[float, float]:
  if isinstance(size, (int, float, np.integer, np.floating)):
    return float(size), float(size)
  h, w = size
  return float(h), float(w)


def _grid(feature_map: Size, step: float | None, image_size: Size | None,
          shapes_hw: np.ndarray, clip: bool) -> np.ndarray:
  """Tiles per-location `(h, w)` shapes over one feature map.

  Centres are `(j + 0.5) * step / image_size` when a step is given (SSD,
  torchvision DefaultBoxGenerator), else `(j + 0.5) / feature_size`.
  """
  fh, fw = (int(v) for v in _pair(feature_map))
  if step is None:
    ys = (np.arange(fh) + 0.5) / fh
    xs = (np.arange(fw) + 0.5) / fw
  else:
    ih, iw = _pair(image_size)
    ys = (np.arange(fh) + 0.5) * step / ih
    xs = (np.arange(fw) + 0.5) * step / iw
  if clip:
    # torchvision clips h and w (not the centres) while boxes are in centre form.
    shapes_hw = np.clip(shapes_hw, 0.0, 1.0)
  cy, cx = np.meshgrid(ys, xs, indexing='ij')
  n = len(shapes_hw)
  centres = np.stack([cy, cx], axis=-1).reshape(fh * fw, 1, 2)
  centres = np.broadcast_to(centres, (fh * fw, n, 2))
  shapes = np.broadcast_to(shapes_hw[None], (fh * fw, n, 2))
  return np.concatenate([centres, shapes], axis=-1).reshape(-1, 4)


def _shape(scale_h: float, scale_w: float, ratio: float) -> tuple[float, float]:
  """(h, w) of a prior with aspect ratio `ratio` = w / h."""
  r = math.sqrt(ratio)
  return scale_h / r, scale_w * r


def ssd_anchors(feature_maps: Sequence[Size],
                aspect_ratios: Sequence[Sequence[float]],
                image_size: Size | None = None,
                steps: Sequence[float] | None = None,
                min_sizes: Sequence[float] | None = None,
                max_sizes: Sequence[float] | None = None,
                scales: Sequence[float] | None = None,
                clip: bool = False) -> np.ndarray:
  """SSD priors (ssd.pytorch PriorBox / torchvision DefaultBoxGenerator).

  Per location, in torchvision's order: the square of scale `s_k`, the square
  of scale `sqrt(s_k * s'_k)`, then for each ratio `r` of the level the prior
  `(w = s_k sqrt(r), h = s_k / sqrt(r))` followed by its transpose.

  Args:
    feature_maps: size of each level's square map (or `(h, w)`).
    aspect_ratios: per level, the ratios besides 1 (e.g. `[[2], [2, 3], ...]`).
    image_size: input size in pixels (int or `(h, w)`); needed with `steps` or
      `min_sizes`.
    steps: per level, the pixel distance between neighbouring centres; None
      spaces centres `1 / feature_size` apart.
    min_sizes: per level, `s_k` in pixels.
    max_sizes: per level, `s'_k` in pixels (the second square is
      `sqrt(min * max)`).
    scales: alternative to min/max sizes, normalised: `L + 1` values, level k
      uses `scales[k]` and `sqrt(scales[k] * scales[k + 1])` (torchvision).
    clip: clip each prior's h and w to [0, 1] (torchvision); the original SSD
      does not.

  Returns:
    float32 `[A, 4]` anchors `[cy, cx, h, w]` normalised.
  """
  num_levels = len(feature_maps)
  if len(aspect_ratios) != num_levels:
    raise ValueError(f'{len(aspect_ratios)} aspect-ratio lists for {num_levels} feature maps')
  if steps is not None and len(steps) != num_levels:
    raise ValueError(f'{len(steps)} steps for {num_levels} feature maps')
  if scales is not None:
    if len(scales) != num_levels + 1:
      raise ValueError(f'scales needs {num_levels + 1} values (one per level, plus one), '
                       f'got {len(scales)}')
    small = [(float(scales[k]),) * 2 for k in range(num_levels)]
    large = [(math.sqrt(scales[k] * scales[k + 1]),) * 2 for k in range(num_levels)]
  else:
    if min_sizes is None or max_sizes is None or image_size is None:
      raise ValueError('ssd_anchors needs `scales`, or `min_sizes`, `max_sizes` and `image_size`')
    if len(min_sizes) != num_levels or len(max_sizes) != num_levels:
      raise ValueError('min_sizes and max_sizes need one value per feature map')
    ih, iw = _pair(image_size)
    small = [(m / ih, m / iw) for m in min_sizes]
    large = [(math.sqrt(m * n) / ih, math.sqrt(m * n) / iw)
             for m, n in zip(min_sizes, max_sizes)]
  if steps is not None and image_size is None:
    raise ValueError('ssd_anchors needs `image_size` when `steps` are given')
  levels = []
  for k in range(num_levels):
    sh, sw = small[k]
    shapes = [(sh, sw), large[k]]
    for r in aspect_ratios[k]:
      h, w = _shape(sh, sw, r)
      # The transpose swaps pixel sizes; the sh / sw factors convert between
      # the height and width normalisations (1 for a square input).
      shapes += [(h, w), (w * sh / sw, h * sw / sh)]
    step = None if steps is None else float(steps[k])
    levels.append(_grid(feature_maps[k], step, image_size, np.asarray(shapes), clip))
  return np.concatenate(levels).astype(np.float32)


def dfssd_scales(num_levels: int, s_min: float, s_max: float) -> list[float]:
  """Formula 5 of the SSD paper, `s_k = s_min + (s_max - s_min) (k - 1) / (m - 1)`.

  Returns `m + 1` scales: the last level's second square needs `s_{m+1}`,
  which the paper leaves undefined; it continues the linear progression, as
  Caffe SSD's `max_sizes` do (torchvision appends 1.0 instead).
  """
  if num_levels < 2:
    return [s_min, s_max]
  step = (s_max - s_min) / (num_levels - 1)
  return [s_min + step * k for k in range(num_levels + 1)]


def _dfssd_cell(k: int, scales: Sequence[float], aspect_ratios: Sequence[float],
                small_ratios: Sequence[float]) -> list[tuple[float, float]]:
  """Per-location (h, w) of level k: ratios at s_k, the sqrt(s_k s_k+1) square
  right after the ratio-1 prior (torchvision's placement), then `small_ratios`
  at s_k / 2 (empty outside the first level)."""
  s, s_next = scales[k], scales[k + 1]
  shapes = []
  extra_added = False
  for r in aspect_ratios:
    shapes.append(_shape(s, s, r))
    if math.isclose(r, 1.0) and not extra_added:
      shapes.append((math.sqrt(s * s_next),) * 2)
      extra_added = True
  shapes += [_shape(s / 2, s / 2, r) for r in small_ratios]
  return shapes


def dfssd_anchors(feature_maps: Sequence[Size],
                  s_min: float = 0.1,
                  s_max: float = 0.9,
                  aspect_ratios: Sequence[float] = (1.0, 2.0, 0.5, 3.0, 1.0 / 3.0),
                  small_first_level: bool = True,
                  small_ratios: Sequence[float] = (1.0, 2.0, 0.5),
                  anchors_per_location: Sequence[int] | None = None,
                  clip: bool = False) -> np.ndarray:
  """DF-SSD priors (docs/design.md §4).

  Scales are linear in `[s_min, s_max]` over the levels (`dfssd_scales`). A
  6-prior cell holds ratios {1, 2, 1/2, 3, 1/3} at `s_k` plus the ratio-1
  prior at `sqrt(s_k s_{k+1})`; with `small_first_level` the first map adds
  `small_ratios` at `s_1 / 2` (our reading of its 9 priors). Centres are
  `(j + 0.5) / feature_size`.

  Args:
    feature_maps: size of each level's map (or `(h, w)`).
    s_min, s_max: normalised scales of the first and last level.
    aspect_ratios: ratios (w / h) at `s_k`; a ratio of 1 also gets the
      `sqrt(s_k s_{k+1})` square.
    small_first_level: add the half-scale priors on the first map.
    small_ratios: their ratios.
    anchors_per_location: the counts a config promises (the heads use them);
      a mismatch with what the ratios make raises.
    clip: clip each prior's h and w to [0, 1].

  Returns:
    float32 `[A, 4]` anchors `[cy, cx, h, w]` normalised.
  """
  scales = dfssd_scales(len(feature_maps), s_min, s_max)
  cells = [_dfssd_cell(k, scales, aspect_ratios,
                       small_ratios if (k == 0 and small_first_level) else ())
           for k in range(len(feature_maps))]
  counts = [len(c) for c in cells]
  if anchors_per_location is not None and list(anchors_per_location) != counts:
    raise ValueError(f'anchors_per_location {list(anchors_per_location)} disagrees with the '
                     f'{counts} priors per location the DF-SSD ratios make')
  levels = [_grid(f, None, None, np.asarray(c), clip) for f, c in zip(feature_maps, cells)]
  return np.concatenate(levels).astype(np.float32)


def refinedet_anchors(feature_maps: Sequence[Size],
                      steps: Sequence[float],
                      image_size: Size,
                      size_factor: float = 4.0,
                      aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
                      clip: bool = False) -> np.ndarray:
  """RefineDet priors (docs/design.md §5): one scale per level, `size_factor x step`
  pixels, at each of `aspect_ratios` (w / h), in that order per location.

  Args:
    feature_maps: size of each level's map (or `(h, w)`).
    steps: per level, the stride in pixels.
    image_size: input size in pixels (int or `(h, w)`).
    size_factor: prior size in strides (RefineDet: 4).
    aspect_ratios: ratios w / h of the priors of one location.
    clip: clip each prior's h and w to [0, 1].

  Returns:
    float32 `[A, 4]` anchors `[cy, cx, h, w]` normalised.
  """
  if len(steps) != len(feature_maps):
    raise ValueError(f'{len(steps)} steps for {len(feature_maps)} feature maps')
  ih, iw = _pair(image_size)
  levels = []
  for f, step in zip(feature_maps, steps):
    sh, sw = size_factor * step / ih, size_factor * step / iw
    shapes = np.asarray([_shape(sh, sw, r) for r in aspect_ratios])
    levels.append(_grid(f, float(step), image_size, shapes, clip))
  return np.concatenate(levels).astype(np.float32)


def _input_size(anchor_cfg: ml_collections.ConfigDict, input_size: Size | None) -> Size:
  """The input size the config's pixel steps and sizes refer to.

  Explicit argument first, then `anchor_cfg.input_size`; otherwise the last
  level's step times its size, which is the input size in every preset (SSD's
  last map is 1x1 with step = input size; RefineDet's steps are input / map).
  An inferred size that disagrees with another level's step x size by more
  than 25% raises rather than silently misplacing priors.
  """
  if input_size is not None:
    return input_size
  if anchor_cfg.get('input_size') is not None:
    return anchor_cfg.input_size
  steps = anchor_cfg.get('steps')
  if not steps:
    raise ValueError('anchor config has no steps: pass input_size')
  maps = [_pair(f) for f in anchor_cfg.feature_maps]
  inferred = round(steps[-1] * maps[-1][0]), round(steps[-1] * maps[-1][1])
  for step, (fh, fw) in zip(steps, maps):
    if abs(step * fh / inferred[0] - 1) > 0.25 or abs(step * fw / inferred[1] - 1) > 0.25:
      raise ValueError(f'cannot infer the input size from steps {list(steps)} and feature maps '
                       f'{list(anchor_cfg.feature_maps)}: pass input_size to from_config')
  return inferred


def from_config(anchor_cfg: ml_collections.ConfigDict,
                input_size: Size | None = None) -> np.ndarray:
  """Builds the priors an `anchors` config describes (config_blocks.py).

  Args:
    anchor_cfg: `config.anchors`, with `style` 'ssd' | 'dfssd' | 'refinedet'
      and that generator's keys.
    input_size: the model's input size in pixels; inferred from the config
      when None (see `_input_size`).

  Returns:
    float32 `[A, 4]` anchors `[cy, cx, h, w]` normalised.
  """
  style = anchor_cfg.style
  clip = bool(anchor_cfg.clip)
  if style == 'ssd':
    needs_size = anchor_cfg.get('steps') is not None or anchor_cfg.get('scales') is None
    return ssd_anchors(
        feature_maps=anchor_cfg.feature_maps,
        aspect_ratios=anchor_cfg.aspect_ratios,
        image_size=_input_size(anchor_cfg, input_size) if needs_size else None,
        steps=anchor_cfg.get('steps'),
        min_sizes=anchor_cfg.get('min_sizes'),
        max_sizes=anchor_cfg.get('max_sizes'),
        scales=anchor_cfg.get('scales'),
        clip=clip)
  if style == 'dfssd':
    return dfssd_anchors(
        feature_maps=anchor_cfg.feature_maps,
        s_min=anchor_cfg.s_min,
        s_max=anchor_cfg.s_max,
        aspect_ratios=anchor_cfg.aspect_ratios,
        small_first_level=anchor_cfg.small_first_level,
        small_ratios=anchor_cfg.small_ratios,
        anchors_per_location=anchor_cfg.get('anchors_per_location'),
        clip=clip)
  if style == 'refinedet':
    return refinedet_anchors(
        feature_maps=anchor_cfg.feature_maps,
        steps=anchor_cfg.steps,
        image_size=_input_size(anchor_cfg, input_size),
        size_factor=anchor_cfg.size_factor,
        aspect_ratios=anchor_cfg.aspect_ratios,
        clip=clip)
  raise ValueError(f'unknown anchors.style {style!r}')


def anchors_per_location(anchor_cfg: ml_collections.ConfigDict) -> list[int]:
  """Priors per feature-map location, one count per level (what a head predicts).

  Computed from the same rules as `from_config`, so the two cannot disagree;
  for 'dfssd' a stated `anchors_per_location` is checked against the ratios.
  """
  style = anchor_cfg.style
  if style == 'ssd':
    return [2 + 2 * len(r) for r in anchor_cfg.aspect_ratios]
  if style == 'dfssd':
    num_levels = len(anchor_cfg.feature_maps)
    scales = dfssd_scales(num_levels, anchor_cfg.s_min, anchor_cfg.s_max)
    small = anchor_cfg.small_ratios
    first_small = anchor_cfg.small_first_level
    counts = [len(_dfssd_cell(k, scales, anchor_cfg.aspect_ratios,
                              small if (k == 0 and first_small) else ()))
              for k in range(num_levels)]
    stated = anchor_cfg.get('anchors_per_location')
    if stated is not None and list(stated) != counts:
      raise ValueError(f'anchors_per_location {list(stated)} disagrees with the '
                       f'{counts} priors per location the DF-SSD ratios make')
    return counts
  if style == 'refinedet':
    return [len(anchor_cfg.aspect_ratios)] * len(anchor_cfg.feature_maps)
  raise ValueError(f'unknown anchors.style {style!r}')


def anchors_per_level(anchor_cfg: ml_collections.ConfigDict,
                      input_size: Size | None = None) -> list[int]:
  """Alias of `anchors_per_location` under the name docs/architecture.md uses.

  `input_size` is accepted for that signature and unused: the counts depend on
  the config only.
  """
  del input_size
  return anchors_per_location(anchor_cfg)


def prior_count(anchor_cfg: ml_collections.ConfigDict) -> int:
  """Number of priors a prior config makes, without building them."""
  return sum(n * int(np.prod(_pair(f))) for n, f in
             zip(anchors_per_location(anchor_cfg), anchor_cfg.feature_maps))
