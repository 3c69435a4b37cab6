r"""Data-loading throughput: decode only, and the full SSD train augmentation.

  python -m smallssd_jax.tools.bench_data [--num_images=256] [--workers=0,2] [--batches=20]

Writes `num_images` VOC-sized (500x375) JPEGs with VOC annotations to a
temporary VOCdevkit, then prints images/s for: decoding alone (one process),
the full per-example train path (read + decode + photometric draw + zoom-out +
min-IoU crop + flip + resize to 300 + pad, one process): with the resample
left to the train step (data.resample_on_device, what 'auto' picks on a GPU
or TPU; then also what that resample costs the step on this machine's JAX
backend), and on the host with the bilinear, the nearest and (when OpenCV is
installed) the opencv resize (data.resize_method), with photometric
distortion and normalisation in the train step (data.pixels_on_device, the
default) and on the host; and the grain
train iterator with each `--workers` count (batches of --batch_size). Run it
on an otherwise idle machine.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
import time

from absl import app
from absl import flags
import numpy as np
from PIL import Image, ImageDraw

from smallssd_jax import _xla
from smallssd_jax import config_blocks
from smallssd_jax import batch_layout
from smallssd_jax.datasets import ops as ops_lib
from smallssd_jax.datasets import pipeline
from smallssd_jax.datasets import sources
from smallssd_jax.datasets import voc
from smallssd_jax.tools import timing

_NUM_IMAGES = flags.DEFINE_integer('num_images', 256, 'JPEGs to write.')
_WORKERS = flags.DEFINE_list('workers', ['0', '2'], 'Worker counts for the grain iterator.')
_BATCHES = flags.DEFINE_integer('batches', 20, 'Batches to time per worker count.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 32, 'Batch size of the grain iterator.')
_READ_THREADS = flags.DEFINE_integer('read_threads', 0, 'data.read_threads for the iterator.')


def write_voc(root: str, num_images: int, seed: int = 0) -> str:
  """A VOCdevkit/VOC2007 with `num_images` 500x375 photo-like JPEGs; returns its root."""
  rng = np.random.default_rng(seed)
  year = os.path.join(root, 'VOC2007')
  for sub in ('Annotations', 'JPEGImages', os.path.join('ImageSets', 'Main')):
    os.makedirs(os.path.join(year, sub), exist_ok=True)
  ids = []
  yy, xx = np.mgrid[0:375, 0:500].astype(np.float32)
  for i in range(num_images):
    image_id = f'{i:06d}'
    ids.append(image_id)
    base = rng.uniform(40, 200, 3)
    grad = rng.uniform(-0.2, 0.2, (2, 3))
    img = base + yy[..., None] * grad[0] + xx[..., None] * grad[1]
    img = img + rng.normal(0, 12, img.shape)
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    objects = []
    for _ in range(rng.integers(1, 6)):
      w, h = rng.integers(20, 200, 2)
      x0, y0 = rng.integers(0, 500 - w), rng.integers(0, 375 - h)
      draw.ellipse((x0, y0, x0 + w, y0 + h), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
      name = voc.VOC_CLASSES[rng.integers(len(voc.VOC_CLASSES))]
      objects.append(f'<object><name>{name}</name><difficult>0</difficult><bndbox>'
                     f'<xmin>{x0 + 1}</xmin><ymin>{y0 + 1}</ymin><xmax>{x0 + w + 1}</xmax>'
                     f'<ymax>{y0 + h + 1}</ymax></bndbox></object>')
    pil.save(os.path.join(year, 'JPEGImages', f'{image_id}.jpg'), quality=90)
    with open(os.path.join(year, 'Annotations', f'{image_id}.xml'), 'w') as f:
      f.write(f'<annotation><size><width>500</width><height>375</height></size>'
              f'{"".join(objects)}</annotation>')
  with open(os.path.join(year, 'ImageSets', 'Main', 'trainval.txt'), 'w') as f:
    f.write('\n'.join(ids) + '\n')
  return root


def _rate(count: int, seconds: float) -> str:
  return f'{count / seconds:8.1f} images/s ({1e3 * seconds / count:.2f} ms/image)'


def run(root: str, workers: list[int], batches: int, batch_size: int,
        read_threads: int) -> None:
  config = config_blocks.base_config(config_blocks.ssd_model(300, num_classes=21))
  config.data.name = 'voc'
  config.data.root = root
  config.data.train_split = 'VOC2007/trainval'
  config.data.read_threads = read_threads
  config.batch_size = batch_size
  source = sources.get_source(config.data, config.data.train_split)
  n = len(source)

  source[0]
  start = time.perf_counter()
  for i in range(n):
    source[i]
  seconds = time.perf_counter() - start
  print(f'decode only (1 process):                             {_rate(n, seconds)}')

  # (photometric + normalize in the step, resample in the step, resize method)
  runs = [(True, True, 'bilinear'), (True, False, 'bilinear'), (True, False, 'nearest'),
          (False, False, 'bilinear')]
  if importlib.util.find_spec('cv2') is not None:
    runs.insert(3, (True, False, 'opencv'))
  examples = []
  for on_device, resample_on_device, method in runs:
    config.data.resize_method = method
    config.data.pixels_on_device = on_device
    config.data.resample_on_device = str(resample_on_device)
    loader = pipeline.ExampleLoader(source, ops_lib.train_ops(config.data, batch_layout.InputSpec.from_config(config.data, 300)),
                                    int(config.data.max_boxes), 'error')
    rng = np.random.default_rng(0)
    loader(0, rng)
    start = time.perf_counter()
    for i in range(n):
      example = loader(i, rng)
      if resample_on_device and i < batch_size:
        examples.append(example)
    seconds = time.perf_counter() - start
    resample = 'the step' if resample_on_device else f'host, {method}'
    pixels_where = 'the step' if on_device else 'the host'
    print(f'train augmentation, resample on {resample:15s}, photometric + normalize on '
          f'{pixels_where:8s} (1 process): {_rate(n, seconds)}')
  _time_step_resample(config, examples)
  config.data.resize_method = 'bilinear'
  config.data.pixels_on_device = True
  config.data.resample_on_device = 'False'

  for num_workers in workers:
    config.data.num_workers = num_workers
    it = pipeline.make_train_iterator(config)
    next(it)  # start-up (worker spawn) is not timed
    next(it)
    start = time.perf_counter()
    for _ in range(batches):
      next(it)
    seconds = time.perf_counter() - start
    print(f'grain train iterator, bilinear, photometric + normalize in the step, '
          f'{num_workers} workers: {_rate(batches * batch_size, seconds)}')
    close = getattr(it, 'close', None)
    if close:
      close()


def _time_step_resample(config, examples: list[dict]) -> None:
  """What the resample costs the step instead: jitted pixels.model_input on one batch."""
  import jax  # pylint: disable=g-import-not-at-top  (the rest of the tool runs without JAX)
  from smallssd_jax import pixels  # pylint: disable=g-import-not-at-top
  batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
  spec = batch_layout.InputSpec.from_config(config.data, 300)
  fn = jax.jit(pixels.model_input, static_argnums=(1, 2))
  seconds = timing.median_seconds(lambda: jax.block_until_ready(fn(batch, spec, True)), 5, 1)
  shape = batch['image'].shape
  print(f"  the step's resample + photometric + normalize of those ({jax.default_backend()}, "
        f'batch {len(examples)}, {shape[1]}x{shape[2]} canvas, median of 5): '
        f'{_rate(len(examples), seconds)}')


def main(argv):
  del argv
  with tempfile.TemporaryDirectory() as tmp:
    write_voc(tmp, _NUM_IMAGES.value)
    run(tmp, [int(w) for w in _WORKERS.value], _BATCHES.value, _BATCH_SIZE.value,
        _READ_THREADS.value)


if __name__ == '__main__':
  _xla.apply_cpu_xla_defaults()     # before any JAX backend starts
  app.run(main)
