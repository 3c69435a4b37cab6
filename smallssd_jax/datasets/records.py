"""What every dataset source yields, and the checks at that edge.

A source maps an index to an *example* dict, the one format the rest of the
data code understands:

  image      uint8 [H, W, 3] RGB (`Source.__getitem__`), or, from
             `Source.record`, an `EncodedImage` not decoded yet (so the
             augmentation can pick a reduced JPEG decode size first)
  boxes      float32 [N, 4] `[ymin, xmin, ymax, xmax]` normalised to [0, 1]
             by the original image size
  labels     int32 [N], 1..K (0 is the background class of the models)
  ignore     bool [N] (VOC difficult, COCO crowd, KITTI DontCare)
  image_id   int, the example's index in its source (unique, dense)
  orig_size  int32 [2], (h, w) of the original image in pixels
  key        str, the file or record name, for messages
  problems   list[str], repairs made while reading (clipped or dropped
             boxes); empty for a clean example

Anything unusable raises `BadExampleError`, which names the file and the
reason; the pipeline turns it into an error or a counted, logged skip
(`data.on_bad_example`).
"""

from __future__ import annotations

import abc
import dataclasses
import io
import os
from typing import Any, Sequence

import numpy as np
from PIL import Image

Example = dict[str, Any]

# Per-box fields: every op that drops or reorders boxes applies the same
# selection to all of them, so they never drift apart.
PER_BOX_KEYS = ('boxes', 'labels', 'ignore')


class BadExampleError(ValueError):
  """An example that cannot be used: names the file (or record) and why."""

  def __init__(self, key: str, reason: str):
    super().__init__(f'{key}: {reason}')
    self.key = key
    self.reason = reason


@dataclasses.dataclass
class EncodedImage:
  """An image file not decoded yet: a path on disk or the encoded bytes."""

  name: str
  path: str | None = None
  data: bytes | None = dataclasses.field(default=None, repr=False)
  # The header parsed by `size()`, handed to the next `open()` (parsing a JPEG
  # header is Python code in PIL and costs as much as a small resize).
  _header: Image.Image | None = dataclasses.field(default=None, repr=False, compare=False)

  @classmethod
  def read(cls, path: str, name: str) -> 'EncodedImage':
    """Reads the file's bytes now, so the header and the pixels cost one read."""
    try:
      with open(path, 'rb') as f:
        return cls(name=name, path=path, data=f.read())
    except FileNotFoundError as e:
      raise BadExampleError(name, 'image file is missing') from e
    except OSError as e:
      raise BadExampleError(name, f'cannot read image file: {e}') from e

  def open(self) -> Image.Image:
    """Opens the file lazily (header only); decoding happens on `load()`."""
    if self._header is not None:
      header, self._header = self._header, None
      return header
    try:
      if self.data is not None:
        return Image.open(io.BytesIO(self.data))
      with open(self.path, 'rb') as f:
        # Reading the bytes up front leaves no open file handle behind when
        # decoding fails halfway.
        return Image.open(io.BytesIO(f.read()))
    except FileNotFoundError as e:
      raise BadExampleError(self.name, 'image file is missing') from e
    except Image.UnidentifiedImageError as e:
      raise BadExampleError(self.name, 'not a readable image (corrupt or unknown format)') from e
    except Exception as e:  # OSError, PIL's DecompressionBombError, ...
      raise BadExampleError(self.name, f'cannot read image: {e}') from e

  def size(self) -> tuple[int, int]:
    """(h, w) from the file header, without decoding the pixels."""
    header = self.open()
    self._header = header
    w, h = header.size
    return h, w

  def __getstate__(self):
    # Never ship a half-open PIL image to another process.
    return {**self.__dict__, '_header': None}


def to_rgb_uint8(image: Image.Image, name: str = '') -> np.ndarray:
  """Any PIL image (L, LA, P, RGBA, CMYK, I;16, I, F) -> uint8 [H, W, 3] RGB.

  16-bit and 32-bit images keep their top 8 bits (PIL's own conversion clips
  them to 255 instead); alpha is dropped.
  """
  mode = image.mode
  if mode == 'RGB':
    return np.asarray(image)
  if mode in ('I;16', 'I;16B', 'I;16L', 'I', 'F'):
    arr = np.asarray(image)
    if mode == 'F':
      top = float(np.nanmax(arr)) if arr.size else 1.0
      arr = np.nan_to_num(arr) * (255.0 / top if top > 1.0 else 255.0)
    elif mode == 'I' and (arr.size == 0 or arr.max() <= 255):
      pass  # 8-bit values stored in 32-bit ints
    else:
      arr = arr.astype(np.int64) >> 8
    gray = np.clip(arr, 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)
  try:
    return np.asarray(image.convert('RGB'))
  except (ValueError, OSError) as e:
    raise BadExampleError(name, f'cannot convert {mode} image to RGB: {e}') from e


def load_pil(image: EncodedImage,
             min_size: tuple[int, int] | None = None) -> tuple[Image.Image, tuple[int, int]]:
  """Decodes an encoded image to a PIL RGB image; also returns the file's (h, w).

  Args:
    image: the encoded file.
    min_size: (h, w) the caller needs at least; a JPEG is then decoded at the
      smallest DCT scale (1/2, 1/4, 1/8) that still covers it, which is both
      faster and an anti-aliased downscale. Normalised box coordinates do not
      change with the decode scale.

  Raises:
    BadExampleError: corrupt, truncated or unreadable files.
  """
  pil = image.open()
  full_size = pil.size[::-1]
  if min_size is not None and pil.format == 'JPEG':
    h, w = min_size
    pil.draft(None, (max(1, int(w)), max(1, int(h))))
  try:
    pil.load()
  except Exception as e:  # PIL raises OSError, SyntaxError, struct.error, ... on bad data
    raise BadExampleError(image.name, f'image data is corrupt or truncated: {e}') from e
  if pil.mode != 'RGB':
    pil = Image.fromarray(to_rgb_uint8(pil, image.name))
  return pil, full_size


def decode_image(image: EncodedImage | np.ndarray,
                 min_size: tuple[int, int] | None = None) -> np.ndarray:
  """Decodes to uint8 [H, W, 3] RGB (see `load_pil`); arrays pass through as 3-channel uint8."""
  if isinstance(image, np.ndarray):
    if image.ndim == 2:
      image = np.repeat(image[..., None], 3, axis=-1)
    if image.shape[-1] == 4:
      image = image[..., :3]
    if image.dtype != np.uint8:
      image = np.clip(image, 0, 255).astype(np.uint8)
    return image
  return np.asarray(load_pil(image, min_size)[0])


def boxes_from_pixels(boxes_xyxy_px: np.ndarray, height: int, width: int,
                      problems: list[str]) -> tuple[np.ndarray, np.ndarray]:
  """Pixel boxes `[xmin, ymin, xmax, ymax]` -> normalised `[ymin, xmin, ymax, xmax]`.

  Boxes reaching outside the image are clipped to it; boxes that are empty,
  inverted or non-finite after clipping are dropped. Each repair is counted in
  `problems` (the audit tool reports them).

  Returns:
    (boxes float32 [K, 4] yxyx normalised, keep bool [N]) so that the caller
    can select its other per-box fields with `keep`.
  """
  b = np.asarray(boxes_xyxy_px, np.float64).reshape(-1, 4)
  scale = np.array([width, height, width, height], np.float64)
  return _sanitize(b / scale, problems)


def sanitize_normalized(boxes_yxyx: np.ndarray,
                        problems: list[str]) -> tuple[np.ndarray, np.ndarray]:
  """Clips normalised `[ymin, xmin, ymax, xmax]` boxes to [0, 1], drops empty ones."""
  b = np.asarray(boxes_yxyx, np.float64).reshape(-1, 4)
  return _sanitize(b[:, [1, 0, 3, 2]], problems)


def _sanitize(xyxy: np.ndarray, problems: list[str]) -> tuple[np.ndarray, np.ndarray]:
  """Normalised `[xmin, ymin, xmax, ymax]` -> clipped yxyx boxes and the keep mask."""
  finite = np.all(np.isfinite(xyxy), axis=1)
  xyxy = np.where(finite[:, None], xyxy, 0.0)
  clipped = np.clip(xyxy, 0.0, 1.0)
  was_clipped = finite & np.any(np.abs(clipped - xyxy) > 1e-6, axis=1)
  keep = finite & (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
  n_dropped = int((~keep).sum())
  n_clipped = int((was_clipped & keep).sum())
  if n_clipped:
    problems.append(_CLIPPED.format(n_clipped))
  if n_dropped:
    problems.append(_DROPPED.format(n_dropped))
  out = clipped[keep][:, [1, 0, 3, 2]].astype(np.float32)
  return out.reshape(-1, 4), keep


_CLIPPED, _DROPPED = 'clipped {} box(es) reaching outside the image', \
    'dropped {} empty, inverted or outside box(es)'


def repair_counts(problems: Sequence[str]) -> tuple[int, int]:
  """(boxes clipped, boxes dropped) among the repairs a reader recorded in `problems`."""
  counts = [0, 0]
  for p in problems:
    for i, template in enumerate((_CLIPPED, _DROPPED)):
      head, tail = template.split('{}')
      if p.startswith(head) and p.endswith(tail):
        counts[i] += int(p[len(head):len(p) - len(tail)])
  return counts[0], counts[1]


def make_example(*, image: EncodedImage | np.ndarray, boxes: np.ndarray,
                 labels: Sequence[int] | np.ndarray, ignore: Sequence[bool] | np.ndarray,
                 image_id: int, orig_size: tuple[int, int], key: str,
                 problems: list[str] | None = None) -> Example:
  """Assembles an example dict with the dtypes of the module docstring."""
  return {
      'image': image,
      'boxes': np.asarray(boxes, np.float32).reshape(-1, 4),
      'labels': np.asarray(labels, np.int32).reshape(-1),
      'ignore': np.asarray(ignore, bool).reshape(-1),
      'image_id': int(image_id),
      'orig_size': np.asarray(orig_size, np.int32),
      'key': key,
      'problems': list(problems or []),
  }


class Source(abc.ABC):
  """Base of all sources: random access to examples (see the module docstring).

  Subclasses set `class_names` (label k is `class_names[k - 1]`) and
  implement `__len__` and `record`.
  """

  class_names: tuple[str, ...] = ()

  @abc.abstractmethod
  def __len__(self) -> int:
    """Number of examples."""

  @abc.abstractmethod
  def record(self, index: int) -> Example:
    """The example with `image` possibly still encoded; may raise BadExampleError."""

  def __getitem__(self, index: int) -> Example:
    """The example with `image` decoded to uint8 [H, W, 3] RGB."""
    example = self.record(index)
    image = decode_image(example['image'])
    h, w = image.shape[:2]
    if tuple(example['orig_size']) != (h, w):
      raise BadExampleError(
          example['key'], f'decoded image is {h}x{w} but its record says '
          f'{tuple(int(v) for v in example["orig_size"])}')
    example['image'] = image
    return example

  def check_index(self, index: int) -> int:
    n = len(self)
    if not -n <= index < n:
      raise IndexError(f'index {index} out of range for {type(self).__name__} of {n}')
    return index % n


class ConcatSource(Source):
  """The union of several sources with the same classes (e.g. VOC07+12 trainval)."""

  def __init__(self, sources: Sequence[Source]):
    if not sources:
      raise ValueError('ConcatSource needs at least one source')
    names = sources[0].class_names
    for s in sources[1:]:
      if tuple(s.class_names) != tuple(names):
        raise ValueError('cannot concatenate sources with different class names')
    self.sources = list(sources)
    self.class_names = tuple(names)
    self._offsets = np.cumsum([0] + [len(s) for s in self.sources])

  def __len__(self) -> int:
    return int(self._offsets[-1])

  def record(self, index: int) -> Example:
    index = self.check_index(index)
    part = int(np.searchsorted(self._offsets, index, side='right') - 1)
    example = self.sources[part].record(index - int(self._offsets[part]))
    example['image_id'] = index  # unique across the union
    return example


def file_key(path: str, root: str) -> str:
  """A path shown relative to the dataset root when possible, for messages."""
  try:
    return os.path.relpath(path, root) if root else path
  except ValueError:
    return path
