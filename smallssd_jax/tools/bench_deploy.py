"""Deployment speed: full-width SSD300 inference with post-processing, per deployment path.

  python -m smallssd_jax.tools.bench_deploy [--batches=1,8] [--rounds=7] \
      [--compare-torchvision] [--json=deploy.json]

Times, on the same uint8 `[B, 300, 300, 3]` images and the same weights, from
images to fixed-size detections (normalisation, network, decode, per-class
NMS):

  predictor    `Predictor.raw`: the jitted function of the library
  stablehlo    the `jax.export` artifact, deserialized and called (jitted)
  onnx         the ONNX export in onnxruntime (fixed batch; `export` extra)
  torchvision  `ssd300_vgg16` in eager mode, `model.eval()` under no_grad
               (`--compare-torchvision`; needs torch and torchvision)

The weights are torchvision's `ssd300_vgg16` (91 classes) at random
initialisation, imported into ours with `weights.load_torchvision_ssd300`, so
both frameworks compute the same detections; at random initialisation every
path fills its 200 detections per image, so post-processing runs at full load
in all of them (the table's last column shows it). `network` times our
network alone (normalisation and forward, no decode or NMS): the difference
to `predictor` is the post-processing. The paths take turns
(`timing.paired_seconds`), each timed call after an untimed one; medians of
images/s and of the per-round ratio to torchvision are reported.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import tempfile
from typing import Any

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from smallssd_jax import _xla
from smallssd_jax import config_blocks
from smallssd_jax import console
from smallssd_jax import export as export_lib
from smallssd_jax import pixels
from smallssd_jax import predictor as predictor_lib
from smallssd_jax import task as task_lib
from smallssd_jax import weights as weights_lib
from smallssd_jax.tools import bench
from smallssd_jax.tools import timing

NUM_CLASSES = 91


def define_flags() -> None:
  flags.DEFINE_list('batches', ['1', '8'], 'Batch sizes to time.')
  flags.DEFINE_integer('rounds', 7, 'Timed calls per path and batch size (paths alternate).')
  flags.DEFINE_bool('compare-torchvision', False, "Also time torchvision's ssd300_vgg16.")
  flags.DEFINE_bool('onnx', True, 'Time the ONNX export (needs the export extra).')
  flags.DEFINE_string('json', '', 'Also write the results here.')


def state_dict(seed: int = 0) -> dict[str, np.ndarray]:
  """ssd300_vgg16's weights as NumPy: torchvision's own initialisation when torch is
  installed, else the same shapes drawn here (the times do not depend on the values)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import torchvision  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  torch.manual_seed(seed)
  model = torchvision.models.detection.ssd300_vgg16(weights=None, weights_backbone=None,
                                                    num_classes=NUM_CLASSES)
  state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
  return state


def our_config() -> ml_collections.ConfigDict:
  """torchvision's SSD300 (COCO priors, its normalisation) with our post-processing."""
  config = weights_lib.torchvision_ssd300_config(NUM_CLASSES)
  config.post = config_blocks.postprocess(max_detections=200)
  config.data = config_blocks.data()
  config.data.update(mean=[123.0, 117.0, 104.0], std=[1.0, 1.0, 1.0], bgr=False,
                     pixels_on_device=True)
  config.detect = config_blocks.detection()
  config.model.input_size = 300
  return config


def torchvision_model(state: dict[str, np.ndarray]):
  import torch  # pylint: disable=g-import-not-at-top
  import torchvision  # pylint: disable=g-import-not-at-top
  model = torchvision.models.detection.ssd300_vgg16(weights=None, weights_backbone=None,
                                                    num_classes=NUM_CLASSES)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
  model.eval()
  torch.set_num_threads(os.cpu_count() or 1)
  return model


def run(batches: list[int], rounds: int, compare_torchvision: bool,
        with_onnx: bool) -> dict[str, Any]:
  state = state_dict()
  if state is None and compare_torchvision:
    raise app.UsageError('--compare-torchvision needs torch and torchvision installed')
  config = our_config()
  if state is not None:
    _, variables, _ = weights_lib.load_torchvision_ssd300(state, NUM_CLASSES)
  else:
    variables = task_lib.init_variables(task_lib.build_task(config), config,
                                        task_lib.init_rng(0))
  predictor = predictor_lib.Predictor.from_config(
      config, variables, class_names=[str(i) for i in range(1, NUM_CLASSES)])
  task = predictor.task
  network = jax.jit(lambda v, x: task.module.apply(
      v, pixels.normalize(x.astype(jnp.float32), task.inputs), train=False))
  tmp = tempfile.mkdtemp(prefix='bench_deploy_')
  export_lib.export_stablehlo(predictor, os.path.join(tmp, 'model.jax'))
  exported, _ = export_lib.load_stablehlo(os.path.join(tmp, 'model.jax'))
  stablehlo = jax.jit(exported.call)
  sessions, onnx_reason = {}, None
  if with_onnx:
    try:
      import onnxruntime as ort  # pylint: disable=g-import-not-at-top
      for b in batches:
        path = os.path.join(tmp, f'model_b{b}.onnx')
        export_lib.export_onnx(predictor, path, batch=b)
        sessions[b] = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    except ImportError as e:
      onnx_reason = f'the export extra is not installed ({e})'
  tv = torchvision_model(state) if compare_torchvision else None

  rng = np.random.default_rng(0)
  results: dict[str, Any] = {'batches': {}, 'rounds': rounds, 'onnx': onnx_reason or 'timed'}
  for b in batches:
    images = rng.integers(0, 256, (b, 300, 300, 3), dtype=np.uint8)
    device_images = jnp.asarray(images)
    fns = {
        'predictor': lambda images=images: predictor.raw(images),
        'stablehlo': lambda x=device_images: jax.block_until_ready(stablehlo(x)),
        'network': lambda x=device_images: jax.block_until_ready(
            network(predictor.variables, x)),
    }
    if b in sessions:
      fns['onnx'] = lambda images=images, s=sessions[b]: s.run(None, {'images': images})
    if tv is not None:
      import torch  # pylint: disable=g-import-not-at-top

      def torchvision_call(images=images):
        with torch.no_grad():
          batch = [torch.from_numpy(x).permute(2, 0, 1).float() / 255.0 for x in images]
          return tv(batch)
      fns['torchvision'] = torchvision_call
    counts = _detection_counts(fns, b)
    times = timing.paired_seconds(fns, rounds)
    row = {k: {'median_seconds': statistics.median(v), 'images_per_sec':
               b / statistics.median(v), 'detections_per_image': counts.get(k)}
           for k, v in times.items()}
    if 'torchvision' in times:
      for k, v in times.items():
        ratios = [t / o for o, t in zip(v, times['torchvision'])]
        row[k]['speed_vs_torchvision'] = statistics.median(ratios)
    results['batches'][b] = row
  results['host'] = f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores'
  results['versions'] = {'jax': jax.__version__}
  if tv is not None:
    results['versions']['torch'] = sys.modules['torch'].__version__
  return results


def _detection_counts(fns, b: int) -> dict[str, float]:
  """Mean detections per image of each path (the same post-processing load)."""
  counts = {}
  for key, fn in fns.items():
    out = fn()
    if key == 'predictor':
      counts[key] = float(out['valid'].sum() / b)
    elif key == 'network':
      continue
    elif key in ('stablehlo', 'onnx'):
      counts[key] = float(np.asarray(out[3]).sum() / b)
    else:
      counts[key] = float(sum(len(o['scores']) for o in out) / b)
  return counts


def format_report(results: dict[str, Any]) -> str:
  lines = [f'SSD300 (91 classes) inference with post-processing, {results["host"]}; '
           f'median of {results["rounds"]} alternated calls']
  lines.append(f'{"batch":>5} {"path":<12} {"images/s":>9} {"vs torchvision":>15} '
               f'{"detections/image":>17}')
  for b, row in results['batches'].items():
    for k, r in row.items():
      ratio = r.get('speed_vs_torchvision')
      lines.append(f'{b:>5} {k:<12} {r["images_per_sec"]:>9.2f} '
                   f'{(f"{ratio:.2f}x" if ratio else "-"):>15} '
                   f'{r["detections_per_image"] if r["detections_per_image"] is not None else "-":>17}')
  if results['onnx'] != 'timed':
    lines.append(f'onnx: {results["onnx"]}')
  return '\n'.join(lines)


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  results = run([int(b) for b in f.batches], f.rounds, f['compare-torchvision'].value, f.onnx)
  bench.print_and_save(format_report(results), results, f.json)


if __name__ == '__main__':
  _xla.apply_cpu_xla_defaults()
  console.quiet_library_logs(True)
  define_flags()
  app.run(main)
