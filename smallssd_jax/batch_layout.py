"""How a batch's images travel from the input pipeline to the model: one layout, chosen once.

Three layouts (docs/architecture.md, "Batch dict"):

* `HOST`: the host does everything; `image` is the model's float32 input.
* `PIXELS` (the default, `data.pixels_on_device`): `image` is uint8 RGB at
  the input size; train batches also carry `photometric` float32 [B, n, 5]
  (Caffe's photometric draw per image, one stage per `photometric` op) and
  `image_region` int32 [B, 4] (the rows / columns holding image pixels, the
  rest being zoom-out fill); the jitted step distorts and normalises
  (pixels.py). A batch crosses to the device in a quarter of the bytes.
* `RESAMPLE` (train batches only, `data.resample_on_device`, 'auto' on a GPU
  / TPU): `image` is each decoded source, uint8 [B, Hc, Wc, 3] in the
  top-left corner of a fixed canvas, with `window` float32 [B, 4] (the
  normalised source region the output shows, mirrored when y0 > y1 / x0 > x1)
  and `source_size` int32 [B, 2]; the step also does the one geometric
  resample. Evaluation batches of this configuration use `PIXELS`.

`InputSpec.from_config` resolves the config's switches (and 'auto', from the
JAX backend) once, at start-up; the pipeline builds batches for it and
`pixels.model_input` reads them by it, never by which keys a batch holds.
"""

from __future__ import annotations

import dataclasses
import enum

from smallssd_jax import config_lib

# One DistortImage draw as a fixed-size stage: [brightness delta, contrast
# gain before HSV, saturation gain, hue delta (OpenCV units), contrast gain
# after HSV]; this one changes nothing.
IDENTITY_STAGE = (0.0, 1.0, 1.0, 0.0, 1.0)

# The largest images of each dataset, (height, width): the canvas of
# `RESAMPLE` batches when `data.source_canvas` is [0, 0].
_SOURCE_CANVAS = {'voc': (512, 512), 'kitti': (384, 1248), 'coco': (640, 640)}


class Layout(str, enum.Enum):
  HOST = 'host'
  PIXELS = 'pixels'
  RESAMPLE = 'resample'


@dataclasses.dataclass(frozen=True)
class InputSpec:
  """The batch layouts of a run and what turning their images into model input needs.

  Attributes:
    train_layout, eval_layout: the layouts of train and evaluation batches.
    size: the model's input side.
    mean, std, bgr: the normalisation `((x[..., ::-1] if bgr else x) - mean) / std`.
    fill: the zoom-out fill, RGB 0..255 (the mean colour, rounded as the host does).
    canvas: (height, width) of the source canvas of `RESAMPLE` batches ((0, 0) otherwise).
  """
  train_layout: Layout
  eval_layout: Layout
  size: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  bgr: bool
  fill: tuple[float, ...]
  canvas: tuple[int, int]

  @classmethod
  def from_config(cls, data_cfg, input_size: int, backend: str | None = None) -> 'InputSpec':
    """Resolves `data.pixels_on_device`, `data.resample_on_device` ('auto': on a GPU / TPU)."""
    resample = config_lib.auto_bool(data_cfg.resample_on_device, 'data.resample_on_device')
    on_device = bool(data_cfg.pixels_on_device)
    bilinear = data_cfg.resize_method == 'bilinear'
    if resample == 'auto':
      if backend is None:
        import jax  # pylint: disable=g-import-not-at-top  (only the main process resolves 'auto')
        backend = jax.default_backend()
      resample = on_device and bilinear and backend != 'cpu'
    elif resample and not on_device:
      raise ValueError('data.resample_on_device=True needs data.pixels_on_device=True')
    elif resample and not bilinear:
      raise ValueError(f'data.resample_on_device=True resamples bilinearly; data.resize_method '
                       f'is {data_cfg.resize_method!r}')
    eval_layout = Layout.PIXELS if on_device else Layout.HOST
    mean = tuple(float(v) for v in data_cfg.mean)
    fill_rgb = mean[::-1] if data_cfg.bgr else mean
    return cls(train_layout=Layout.RESAMPLE if resample else eval_layout,
               eval_layout=eval_layout, size=int(input_size), mean=mean,
               std=tuple(float(v) for v in data_cfg.std), bgr=bool(data_cfg.bgr),
               fill=tuple(float(min(max(round(v), 0), 255)) for v in fill_rgb),
               canvas=source_canvas(data_cfg) if resample else (0, 0))

  def layout(self, train: bool) -> Layout:
    return self.train_layout if train else self.eval_layout


def fill_colour(data_cfg) -> tuple[float, float, float]:
  """The mean colour in RGB 0..255 (the config's mean is in the model's channel order)."""
  mean = [float(v) for v in data_cfg.mean]
  return tuple(mean[::-1]) if data_cfg.bgr else tuple(mean)


def source_canvas(data_cfg) -> tuple[int, int]:
  """`data.source_canvas`, or the dataset's own largest image size when it is [0, 0]."""
  canvas = tuple(int(v) for v in data_cfg.source_canvas)
  if len(canvas) != 2 or (canvas != (0, 0) and min(canvas) <= 0):
    raise ValueError(f'data.source_canvas must be [height, width] or [0, 0], got {list(canvas)}')
  if canvas != (0, 0):
    return canvas
  name = str(data_cfg.name)
  if name == 'builtin_small':
    return (int(data_cfg.builtin.image_size),) * 2
  for key, value in _SOURCE_CANVAS.items():
    if key in name:
      return value
  return (512, 512)
