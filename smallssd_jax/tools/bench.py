r"""Cost and speed of a config's detector: FLOPs, compile time, images/s, memory, data.

  python -m smallssd_jax.tools.bench --config=configs/ssd300_voc0712.py [--batch=32] [--steps=10] \
      [--compare-torchvision] [--json=bench.json] [--workdir=runs/x] [--synthetic] \
      [--config.key=value ...]

For the config's model, on every device of the default backend (the same
data-parallel mesh as training; the batch must divide over it):

* GFLOPs per image: XLA's cost analysis (one multiply-add = 2 FLOPs) of the
  forward pass at batch 1, and of the whole train step divided by the batch;
* compile seconds of the inference function and of the train step;
* inference images/s: forward + decode + per-class NMS
  (`evaluation.make_predict_fn`, what evaluation and detection run), the
  median of --steps timed calls after --warmup untimed ones;
* training images/s: the train step (`train.jit_train_step`: forward,
  matching, loss, backward, SGD), median the same way;
* peak memory: on CPU the process's maximum resident set size (compilation
  included), on GPU / TPU the devices' `peak_bytes_in_use`;
* data pipeline images/s: `pipeline.make_train_iterator` over the config's
  data, with its augmentation, workers and read threads, on the host.

Batches come from the config's training data (device-resident for the model
timings); --synthetic uses random images and boxes of the same shapes instead
and skips the data pipeline, for a paper config whose dataset is not on this
machine. The weights are the random initialisation unless --workdir names a
run to restore: an untrained head puts every class of every prior above the
score threshold, the most NMS work there can be.

--compare-torchvision times torchvision's `ssd300_vgg16` (weights=None,
num_classes of the config) the same way on the same machine and batch:
inference in `eval()` under `no_grad` (its transform, forward, decode and
NMS; it resizes every input to 300x300), and an SGD step in `train()` with
the batch's boxes as targets; `torch.set_num_threads(os.cpu_count())` on
CPU. Then both are timed again taking turns (--steps rounds; each turn one
untimed call, then the timed one, so that each side is timed right after its
own previous call, as in a training loop) and the ratio ours / torchvision is
the median of the per-round speed ratios (above 1: ours is faster), so load
drifting on a shared machine affects both sides alike.
Compare like with like: `configs/ssd300_*.py` is the same network.

Timings mean something only on an otherwise idle machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import statistics
import sys
import time
from typing import Any

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

# (The package's __init__ has set the CPU XLA defaults before JAX starts.)
from smallssd_jax import _xla
from smallssd_jax import checkpoints as ckpt_lib
from smallssd_jax import models
from smallssd_jax import train as train_lib
from smallssd_jax import batch_layout
from smallssd_jax.datasets import ops as ops_lib
from smallssd_jax.tools import timing
from smallssd_jax.datasets import pipeline
from smallssd_jax import sharding
from smallssd_jax import task as task_lib


def define_flags() -> None:
  """The command line's flags; defined on demand so that importing the module defines none."""
  config_flags.DEFINE_config_file('config', None, 'Config file (path.py[:arg]).')
  flags.DEFINE_integer('batch', 0, 'Global batch size (0: the config\'s batch_size).')
  flags.DEFINE_integer('steps', 10, 'Timed calls (and data batches) per measurement.')
  flags.DEFINE_integer('warmup', 2, 'Untimed calls after compilation.')
  flags.DEFINE_bool('compare-torchvision', False,
                    'Also time torchvision ssd300_vgg16 (needs torch and torchvision).')
  flags.DEFINE_string('json', None, 'Also write the results to this JSON file.')
  flags.DEFINE_string('workdir', None, 'Restore this run\'s weights (default: random init).')
  flags.DEFINE_bool('synthetic', False, 'Random images and boxes instead of the config\'s data; '
                    'the data pipeline is not timed.')


# --------------------------------------------------------------- helpers ---


# Key of the timed callables a bench function returns next to its measurements.
TIMED = '_timed'


def describe_devices(devices) -> str:
  kinds = sorted({f'{d.platform}:{d.device_kind}' for d in devices})
  return f'{len(devices)}x {", ".join(kinds)}'


def host_description() -> str:
  return f'host {platform.machine()} ({os.cpu_count()} cores)'


def flops_of(jitted, *args) -> float:
  """FLOPs from XLA's cost analysis of the lowered (else the compiled) computation."""
  lowered = jitted.lower(*args)
  cost = None
  with contextlib.suppress(Exception):
    cost = lowered.cost_analysis()
  if not cost:
    cost = lowered.compile().cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per device program
    cost = cost[0]
  return float(cost.get('flops', float('nan')))


def peak_memory(devices) -> dict[str, Any]:
  stats = [d.memory_stats() for d in devices]
  if all(s and 'peak_bytes_in_use' in s for s in stats):
    return {'value': float(max(s['peak_bytes_in_use'] for s in stats)),
            'device': describe_devices(devices), 'source': 'max over devices of peak_bytes_in_use'}
  # Linux reports ru_maxrss in KiB, macOS in bytes.
  scale = 1 if sys.platform == 'darwin' else 1024
  return {'value': float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale),
          'device': host_description(), 'source': 'process max RSS (getrusage)'}


def measurement(value: float, device: str, **extra) -> dict[str, Any]:
  return {'value': float(value), 'device': device, **extra}


def _model_description(config) -> dict[str, Any]:
  m = config.model
  return {'name': m.get('name', ''), 'backbone': m.backbone, 'neck': m.get('neck', 'none'),
          'head': m.head, 'input_size': int(m.input_size), 'num_classes': int(m.num_classes),
          'width': float(m.get('width', 1.0)), 'dtype': m.get('dtype', 'float32')}


# ------------------------------------------------------------- ours ---


def bench_model(config, batch: dict[str, np.ndarray], steps: int, warmup: int,
                workdir: str | None = None) -> dict[str, Any]:
  """Everything but the data pipeline, on the mesh over every device."""
  mesh = sharding.make_mesh()
  device = describe_devices(list(mesh.devices.flat))
  size = int(batch['image'].shape[0])
  if size % mesh.size:
    raise ValueError(f'--batch={size} does not divide over the {mesh.size} devices')
  detector = task_lib.build_task(config)
  state = task_lib.create_train_state(detector, config, task_lib.init_rng(config.seed), mesh)
  if workdir:
    state, _ = ckpt_lib.restore_variables(workdir, state)
  variables = task_lib.variables_of(state)
  out: dict[str, Any] = {
      'num_params': models.count_params(state.params),
  }

  forward = jax.jit(lambda v, x: detector.module.apply(v, x, train=False))
  s = int(config.model.input_size)
  one_image = jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32)
  one_variables = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), variables)
  out['gflops_per_image'] = measurement(flops_of(forward, one_variables, one_image) / 1e9,
                                        device, method='XLA cost analysis, batch 1 forward')

  global_batch = sharding.to_global_batch(batch, mesh)
  # Evaluation batches are resized on the host: with the train resample in
  # the step (source canvases), inference takes input-size crops of them; the
  # host layout's float input is the model input either way.
  images = sharding.to_global_batch({'image': batch['image'][:, :s, :s]}, mesh)['image']

  predict = task_lib.make_predict_fn(detector, config, mesh)
  start = time.perf_counter()
  predict_compiled = predict.lower(variables, images).compile()
  out['compile_seconds_inference'] = measurement(time.perf_counter() - start, device)
  infer = lambda: jax.block_until_ready(predict_compiled(variables, images))
  seconds = timing.median_seconds(infer, steps, warmup)
  out['inference_images_per_sec'] = measurement(size / seconds, device, median_seconds=seconds,
                                                what='forward + decode + NMS')

  step_fn = train_lib.jit_train_step(detector, config, mesh, state)
  rng = jax.random.key(0)
  out['train_gflops_per_image'] = measurement(flops_of(step_fn, state, global_batch, rng) / 1e9 / size,
                                              device, method='XLA cost analysis, train step / batch')
  start = time.perf_counter()
  step_compiled = step_fn.lower(state, global_batch, rng).compile()
  out['compile_seconds_train'] = measurement(time.perf_counter() - start, device)
  # The step donates its state; `infer` keeps the original variables, so the
  # step gets a copy (both stay callable for the paired timing).
  holder = [jax.tree.map(jnp.copy, state)]

  def one_step():
    # The step donates its input state: carry the new one forward.
    holder[0], metrics = step_compiled(holder[0], global_batch, rng)
    jax.block_until_ready((holder[0], metrics))

  seconds = timing.median_seconds(one_step, steps, warmup)
  out['train_images_per_sec'] = measurement(size / seconds, device, median_seconds=seconds,
                                            what='forward + loss + backward + SGD')
  out['peak_memory_bytes'] = peak_memory(list(mesh.devices.flat))
  out[TIMED] = {'inference_images_per_sec': infer, 'train_images_per_sec': one_step}
  return out


def bench_data(config, steps: int, warmup: int) -> dict[str, Any]:
  """images/s of the training iterator with the config's augmentation and workers."""
  it = pipeline.make_train_iterator(config)
  try:
    for _ in range(1 + warmup):        # start-up (worker spawn, first fill) is not timed
      next(it)
    start = time.perf_counter()
    for _ in range(max(1, steps)):
      next(it)
    seconds = time.perf_counter() - start
  finally:
    close = getattr(it, 'close', None)
    if close:
      close()
  images = max(1, steps) * int(config.batch_size)
  data = config.data
  return measurement(images / seconds, f'{host_description()}, data.num_workers='
                     f'{data.num_workers}, read_threads={data.get("read_threads", 0)}',
                     augment=list(data.augment))


def synthetic_batch(config, seed: int = 0) -> dict[str, np.ndarray]:
  """A training batch as the pipeline makes it: noise images, 8 random boxes each.

  With data.pixels_on_device: uint8 images and a photometric draw per image
  and 'photometric' in data.augment (the step distorts and normalises them);
  otherwise float32 normalised images. With data.resample_on_device the
  images are whole sources filling the dataset's canvas.
  """
  rng = np.random.default_rng(seed)
  b, s, m = int(config.batch_size), int(config.model.input_size), int(config.data.max_boxes)
  spec = pipeline.input_spec(config)
  pixels = rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8)
  extra = {}
  if spec.train_layout == batch_layout.Layout.RESAMPLE:
    # Whole sources filling the dataset's canvas, each shown whole.
    ch, cw = spec.canvas
    pixels = rng.integers(0, 256, (b, ch, cw, 3), dtype=np.uint8)
    extra['window'] = np.tile(np.array([0, 0, 1, 1], np.float32), (b, 1))
    extra['source_size'] = np.tile(np.array([ch, cw], np.int32), (b, 1))
  if spec.train_layout != batch_layout.Layout.HOST:
    image = pixels
    # The pipeline's own photometric op, with the config's parameters.
    photometric = ops_lib.op_registry(config.data, spec, train=True)['photometric']
    draws = [{} for _ in range(b)]
    for _ in range(list(config.data.augment).count('photometric')):
      draws = [photometric(d, rng) for d in draws]
    extra['photometric'] = np.array([d.get('photometric_stages', np.zeros((0, 5))) for d in draws],
                                    np.float32).reshape(b, -1, 5)
    # The resample and the photometric ops cover the whole frame.
    extra['image_region'] = np.tile(np.array([0, s, 0, s], np.int32), (b, 1))
  else:
    image = ((pixels - np.asarray(config.data.mean, np.float32)) /
             np.asarray(config.data.std, np.float32))
  n = min(8, m)
  yx = rng.uniform(0.0, 0.8, (b, n, 2))
  hw = rng.uniform(0.02, 0.2, (b, n, 2))
  boxes = np.zeros((b, m, 4), np.float32)
  boxes[:, :n] = np.concatenate([yx, yx + hw], -1)
  labels = np.zeros((b, m), np.int32)
  labels[:, :n] = rng.integers(1, int(config.model.num_classes), (b, n))
  mask = np.zeros((b, m), bool)
  mask[:, :n] = True
  return {'image': image, 'boxes': boxes, 'labels': labels, 'mask': mask,
          'ignore': np.zeros((b, m), bool), 'image_id': np.arange(b, dtype=np.int32),
          'orig_size': np.full((b, 2), s, np.int32), 'box_repairs': np.zeros((b, 3), np.int32),
          **extra}


# ------------------------------------------------------- torchvision ---


def bench_torchvision(config, batch: dict[str, np.ndarray], steps: int, warmup: int) -> dict:
  """torchvision ssd300_vgg16 inference and train step on the same images and boxes."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import torchvision  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    return {'available': False, 'reason': f'torch / torchvision not installed ({e})'}

  use_cuda = torch.cuda.is_available() and jax.default_backend() == 'gpu'
  device = torch.device('cuda' if use_cuda else 'cpu')
  if not use_cuda:
    torch.set_num_threads(os.cpu_count() or 1)
  where = (f'torch {torch.__version__} {torch.cuda.get_device_name(0)}' if use_cuda else
           f'torch {torch.__version__} {host_description()}, {torch.get_num_threads()} threads')
  torch.manual_seed(0)
  model = torchvision.models.detection.ssd300_vgg16(
      weights=None, weights_backbone=None, num_classes=int(config.model.num_classes)).to(device)

  # Back to 0..1 RGB, which torchvision's transform normalises itself.
  data = config.data
  if batch['image'].dtype == np.uint8:
    raw = batch['image'].astype(np.float32) / 255.0
  else:
    raw = batch['image'] * np.asarray(data.std, np.float32) + np.asarray(data.mean, np.float32)
    if data.bgr:
      raw = raw[..., ::-1]
    raw = np.clip(raw / 255.0, 0.0, 1.0).astype(np.float32)
  images = [torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))).to(device) for x in raw]
  size = raw.shape[1]
  targets = []
  for boxes, labels, mask in zip(batch['boxes'], batch['labels'], batch['mask']):
    yxyx = boxes[mask] * size
    xyxy = yxyx[:, [1, 0, 3, 2]]
    targets.append({'boxes': torch.from_numpy(np.ascontiguousarray(xyxy)).float().to(device),
                    'labels': torch.from_numpy(labels[mask].astype(np.int64)).to(device)})

  sync = torch.cuda.synchronize if use_cuda else (lambda: None)

  # Each call sets its mode, so the paired timing can alternate them.
  def infer():
    model.eval()
    with torch.no_grad():
      model(images)
    sync()

  infer()                                 # first call (allocations, lazy init) untimed
  infer_seconds = timing.median_seconds(infer, steps, warmup)

  optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, weight_decay=5e-4)

  def train_step():
    model.train()
    losses = model(images, targets)
    loss = sum(losses.values())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    sync()

  train_step()
  train_seconds = timing.median_seconds(train_step, steps, warmup)
  n = len(images)
  return {
      TIMED: {'inference_images_per_sec': infer, 'train_images_per_sec': train_step},
      'available': True,
      'model': f'torchvision {torchvision.__version__} ssd300_vgg16 (weights=None, '
               f'num_classes={int(config.model.num_classes)}, input resized to 300)',
      'inference_images_per_sec': measurement(n / infer_seconds, where, median_seconds=infer_seconds),
      'train_images_per_sec': measurement(n / train_seconds, where, median_seconds=train_seconds),
  }


# --------------------------------------------------------------- report ---


ROWS = (
    ('gflops_per_image', 'GFLOPs per image (forward)', '{:.3f}'),
    ('train_gflops_per_image', 'GFLOPs per image (train step)', '{:.3f}'),
    ('compile_seconds_inference', 'compile: inference (s)', '{:.1f}'),
    ('compile_seconds_train', 'compile: train step (s)', '{:.1f}'),
    ('inference_images_per_sec', 'inference (images/s)', '{:.2f}'),
    ('train_images_per_sec', 'training (images/s)', '{:.2f}'),
    ('peak_memory_bytes', 'peak memory (MiB)', None),
    ('data_images_per_sec', 'data pipeline (images/s)', '{:.1f}'),
)


def format_report(results: dict[str, Any]) -> str:
  m = results['model']
  lines = [f'{results["config"]}: {m["name"]} ({m["backbone"]} + {m["neck"]} + {m["head"]}), '
           f'input {m["input_size"]}, width {m["width"]}, {m["dtype"]}, {m["num_classes"]} '
           f'classes, {results["num_params"]:,} parameters; batch {results["batch"]}, '
           f'median of {results["steps"]} after {results["warmup"]} warm-up',
           f'data {results["data"]}, weights {results["weights"]}, backend {results["backend"]}',
           '',
           f'{"measurement":<32} {"value":>12}  device']
  for key, label, fmt in ROWS:
    entry = results[key]
    if entry['value'] is None:
      value = 'skipped'
    elif fmt is None:
      value = f'{entry["value"] / 2**20:.0f}'
    else:
      value = fmt.format(entry['value'])
    lines.append(f'{label:<32} {value:>12}  {entry["device"]}')
  tv = results.get('torchvision')
  if tv is not None:
    lines.append('')
    if not tv['available']:
      lines.append(f'--compare-torchvision: {tv["reason"]}')
    else:
      if (m['name'], m['width'], m['input_size']) != ('ssd', 1.0, 300):
        lines.append('(not the same network: the ratios compare the config\'s model with '
                     'SSD300; configs/ssd300_*.py is the like-for-like comparison)')
      lines.append(f'{tv["model"]}:')
      for key, label in (('inference_images_per_sec', 'inference (images/s)'),
                         ('train_images_per_sec', 'training (images/s)')):
        lines.append(f'{label:<32} {tv[key]["value"]:>12.2f}  {tv[key]["device"]}')
      lines.append('')
      lines.append(f'paired: ours and torchvision taking turns, {results["steps"]} rounds '
                   '(an untimed call, then a timed one); ours / torchvision = median of the '
                   'per-round speed ratios')
      n = results['batch']
      for key, label in (('inference_images_per_sec', 'inference'),
                         ('train_images_per_sec', 'training')):
        p = results['paired'][key]
        lines.append(f'{label:<10} ours {n / p["ours_median_seconds"]:.2f} images/s, torchvision '
                     f'{n / p["torchvision_median_seconds"]:.2f} images/s, ours / torchvision = '
                     f'{results["ratios"][key]:.2f}')
  return '\n'.join(lines)


def run(config, config_name: str, batch_size: int = 0, steps: int = 10, warmup: int = 2,
        compare_torchvision: bool = False, workdir: str | None = None,
        synthetic: bool = False) -> dict[str, Any]:
  """All measurements as a dict (what --json writes)."""
  config = config.copy_and_resolve_references()
  if batch_size:
    config.batch_size = int(batch_size)
  if synthetic:
    batch = synthetic_batch(config)
  else:
    # One batch of the training data for the model timings, from a worker-less
    # iterator, so that no worker process competes with the timed calls.
    single = config.copy_and_resolve_references()
    single.data.num_workers = 0
    batch = next(pipeline.make_train_iterator(single))

  results: dict[str, Any] = {
      'config': config_name,
      'model': _model_description(config),
      'batch': int(config.batch_size),
      'steps': int(steps),
      'warmup': int(warmup),
      'backend': jax.default_backend(),
      'weights': workdir or 'random init',
      'data': 'synthetic' if synthetic else f'{config.data.name}:{config.data.train_split}',
  }
  results.update(bench_model(config, batch, steps, warmup, workdir))
  if synthetic:
    results['data_images_per_sec'] = {'value': None, 'device': 'not measured (--synthetic)'}
  else:
    results['data_images_per_sec'] = bench_data(config, steps, warmup)
  ours_timed = results.pop(TIMED)
  if compare_torchvision:
    tv = bench_torchvision(config, batch, steps, warmup)
    results['torchvision'] = tv
    if tv['available']:
      tv_timed = tv.pop(TIMED)
      results['ratios'], results['paired'] = {}, {}
      for key in ('inference_images_per_sec', 'train_images_per_sec'):
        times = timing.paired_seconds({'ours': ours_timed[key], 'torchvision': tv_timed[key]}, steps)
        per_round = [t / o for o, t in zip(times['ours'], times['torchvision'])]
        results['ratios'][key] = statistics.median(per_round)
        results['paired'][key] = {
            'ours_median_seconds': statistics.median(times['ours']),
            'torchvision_median_seconds': statistics.median(times['torchvision']),
            'per_round_ratios': per_round}
  return results


def check_command_line(argv) -> None:
  """The benchmark tools' common checks: no stray arguments, a --config."""
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if flags.FLAGS.config is None:
    raise app.UsageError('--config is required')


def print_and_save(report: str, results: dict[str, Any], json_path: str | None) -> None:
  print(report, flush=True)
  if json_path:
    with open(json_path, 'w') as out:
      json.dump(results, out, indent=2)


def main(argv):
  check_command_line(argv)
  f = flags.FLAGS
  config_name = next((a.split('=', 1)[1] for a in sys.argv if a.startswith('--config=')),
                     'config')
  results = run(f.config, config_name, f.batch, f.steps, f.warmup, f['compare-torchvision'].value,
                f.workdir, f.synthetic)
  print_and_save(format_report(results), results, f.json)


if __name__ == '__main__':
  _xla.apply_cpu_xla_defaults()     # before any JAX backend starts
  define_flags()
  app.run(main)
