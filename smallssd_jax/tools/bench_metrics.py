r"""Timing of `metrics.evaluate` on a synthetic VOC07-test-sized evaluation.

  python -m smallssd_jax.tools.bench_metrics                       # full size
  python -m smallssd_jax.tools.bench_metrics --num_images=300 --repeats=1

The synthetic set mimics VOC2007 test after an SSD: 4952 images, about 3
objects each (a fifth difficult) over 20 unevenly frequent classes, sizes from
a few pixels to the whole image; 200 detections per image: a few jittered
boxes around each object (mostly of its class, high scores) and the rest
background boxes with a long low-score tail, as top-200 NMS output with a
0.01 score threshold looks. Prints the median wall time of each metric (and
its mAP, so backends can be compared) over `--repeats` runs.
"""

from __future__ import annotations

import statistics
import time

from absl import app
from absl import flags
import numpy as np

from smallssd_jax import _xla
from smallssd_jax import metrics

_NUM_IMAGES = flags.DEFINE_integer('num_images', 4952, 'Images in the synthetic set.')
_DETS = flags.DEFINE_integer('dets_per_image', 200, 'Detections per image.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed runs per metric (median reported).')
_METRICS = flags.DEFINE_list('metrics', ['voc07', 'voc', 'coco:fast', 'coco:pycocotools'],
                             'metric[:coco backend] to time.')
_SEED = flags.DEFINE_integer('seed', 0, 'Random seed of the synthetic set.')

NUM_CLASSES = 20


def synthetic_voc(num_images: int = 4952, dets_per_image: int = 200, seed: int = 0
                  ) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
  """(ground_truth, detections) lists as `evaluate` takes them (yxyx pixels)."""
  rng = np.random.default_rng(seed)
  # Uneven class frequencies, like VOC's (person is by far the most common).
  class_p = rng.dirichlet(np.full(NUM_CLASSES, 1.5))
  class_p[14] += 0.3
  class_p /= class_p.sum()
  ground_truth, detections = [], []
  for _ in range(num_images):
    h, w = int(rng.integers(300, 501)), int(rng.integers(300, 501))
    n = 1 + rng.poisson(2.0)
    side = np.exp(rng.normal(np.log(90), 0.9, size=(n, 2))).clip(4, [h, w])
    corner = rng.uniform(0, 1, size=(n, 2)) * ([h, w] - side)
    boxes = np.round(np.concatenate([corner, corner + side], axis=1))
    labels = rng.choice(NUM_CLASSES, size=n, p=class_p) + 1
    ground_truth.append({'boxes': boxes, 'labels': labels, 'ignore': rng.random(n) < 0.2,
                         'image_size': (h, w)})

    near = rng.integers(1, 4, size=n)
    source = np.repeat(np.arange(n), near)
    extent = np.tile(side[source], 2)
    near_boxes = boxes[source] + rng.normal(0, 0.08, size=(len(source), 4)) * extent
    near_labels = np.where(rng.random(len(source)) < 0.8, labels[source],
                           rng.integers(1, NUM_CLASSES + 1, size=len(source)))
    near_scores = rng.beta(6, 2, size=len(source))
    m = max(dets_per_image - len(source), 0)
    side = np.exp(rng.normal(np.log(60), 1.0, size=(m, 2))).clip(2, [h, w])
    corner = rng.uniform(0, 1, size=(m, 2)) * ([h, w] - side)
    background = np.concatenate([corner, corner + side], axis=1)
    # Background detections favour the classes present, as a detector's do.
    bg_labels = np.where(rng.random(m) < 0.5, rng.choice(labels, size=m),
                         rng.integers(1, NUM_CLASSES + 1, size=m))
    bg_scores = 0.01 + 0.99 * rng.beta(0.7, 12, size=m)
    det_boxes = np.concatenate([near_boxes, background])[:dets_per_image]
    det_boxes = np.concatenate([np.minimum(det_boxes[:, :2], det_boxes[:, 2:]),
                                np.maximum(det_boxes[:, :2], det_boxes[:, 2:])], axis=1)
    detections.append({
        'boxes': det_boxes.astype(np.float32),
        'scores': np.concatenate([near_scores, bg_scores])[:dets_per_image].astype(np.float32),
        'labels': np.concatenate([near_labels, bg_labels])[:dets_per_image]})
  return ground_truth, detections


def main(argv):
  del argv
  ground_truth, detections = synthetic_voc(_NUM_IMAGES.value, _DETS.value, _SEED.value)
  num_gt = sum(len(g['labels']) for g in ground_truth)
  num_dets = sum(len(d['scores']) for d in detections)
  print(f'{len(ground_truth)} images, {num_gt} objects, {num_dets} detections, '
        f'{NUM_CLASSES} classes')
  for spec in _METRICS.value:
    metric, _, backend = spec.partition(':')
    times = []
    for _ in range(_REPEATS.value):
      start = time.perf_counter()
      results = metrics.evaluate(ground_truth, detections, metric, num_classes=NUM_CLASSES,
                                 backend=backend or 'auto')
      times.append(time.perf_counter() - start)
    print(f'{spec:<18} median {statistics.median(times):8.3f} s over {len(times)} runs   '
          f'mAP {results["mAP"]:.6f}  APs {results["APs"]:.6f}')


if __name__ == '__main__':
  _xla.apply_cpu_xla_defaults()     # before any JAX backend starts
  app.run(main)
