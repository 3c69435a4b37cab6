"""Evaluation: run a split through a predict function and score it (docs/design.md §6).

The evaluator knows nothing of training: it takes a jitted
`predict_fn(variables, images) -> padded detections` (task.make_predict_fn)
and the mesh. Every process predicts its shard of the split; the detections
are gathered, the metric runs once on the host of process 0 (VOC / COCO /
KITTI, metrics/), and its results are broadcast to every process, which the
trainer's best-checkpoint policy needs.
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import Callable

from absl import logging
import jax
import ml_collections
import numpy as np

from smallssd_jax import boxes as box_lib
from smallssd_jax import metrics as metrics_lib
from smallssd_jax import sharding
from smallssd_jax import writers
from smallssd_jax.datasets import pipeline
from smallssd_jax.datasets import voc
from smallssd_jax.metrics import plots


def small_object_class_ids(class_names: list[str] | None) -> list[int] | None:
  """Labels of the VOC small-object classes among `class_names` (None when there are none)."""
  if not class_names:
    return None
  ids = [i + 1 for i, n in enumerate(class_names) if n in voc.SMALL_OBJECT_CLASSES]
  return ids or None


class Evaluator:
  """Runs a split through `predict_fn` and scores it; reusable across steps.

  Args:
    config: the run's config (`data`, `eval`).
    predict_fn: jitted `(variables, images) -> {'boxes', 'scores', 'labels',
      'valid'}` over `mesh` (task.make_predict_fn).
    mesh: the device mesh the batches are sharded over.
    split: the split to evaluate (default `config.data.eval_split`).
  """

  def __init__(self, config: ml_collections.ConfigDict, predict_fn: Callable,
               mesh: jax.sharding.Mesh, split: str | None = None):
    self.config = config
    self.predict = predict_fn
    self.mesh = mesh
    self.split = split or config.data.eval_split
    self.class_names = pipeline.class_names(config.data)

  def collect(self, variables) -> tuple[list[dict], list[dict]]:
    """Ground truth and detections, in original-image pixels, for every example."""
    gts, dets = [], []
    self.box_repairs = np.zeros(3, np.int64)
    batches = pipeline.make_eval_batches(self.config, self.split, jax.process_index(),
                                         jax.process_count())
    for local in batches:
      batch = sharding.to_global_batch(local, self.mesh)
      out = self.predict(variables, batch['image'])
      host = {k: sharding.to_host(v) for k, v in batch.items() if k != 'image'}
      out = {k: sharding.to_host(v) for k, v in out.items()}
      self.box_repairs += host['box_repairs'][host['example_mask']].sum(0)
      for i in np.flatnonzero(host['example_mask']):
        size = host['orig_size'][i]
        m = host['mask'][i]
        gts.append({
            'boxes': box_lib.normalised_to_pixels(host['boxes'][i][m], size),
            'labels': host['labels'][i][m],
            'ignore': host['ignore'][i][m],
            'image_size': (int(size[0]), int(size[1])),
            'image_id': int(host['image_id'][i]),
        })
        v = out['valid'][i]
        dets.append({
            'boxes': box_lib.normalised_to_pixels(out['boxes'][i][v], size),
            'scores': out['scores'][i][v],
            'labels': out['labels'][i][v],
        })
      if self.config.eval.num_examples and len(gts) >= self.config.eval.num_examples:
        gts, dets = gts[:self.config.eval.num_examples], dets[:self.config.eval.num_examples]
        break
    return gts, dets

  def run(self, variables, step: int, out_dir: str,
          writer: writers.MetricWriter | None = None) -> dict[str, float]:
    """Predicts on every process; scores and reports on process 0 (into `out_dir`)."""
    t0 = time.perf_counter()
    gts, dets = self.collect(variables)
    t_predict = time.perf_counter() - t0
    results = None
    if jax.process_index() == 0:
      if not gts:
        logging.warning('The evaluation split %s:%s has no images: every AP is undefined (NaN).',
                        self.config.data.name, self.split)
      clipped, dropped, _ = (int(v) for v in self.box_repairs)
      if clipped or dropped:
        logging.warning('Evaluation on %s:%s: the reader clipped %d and dropped %d ground-truth '
                        'boxes (run the dataset audit for the files).', self.config.data.name,
                        self.split, clipped, dropped)
      t0 = time.perf_counter()
      results = metrics_lib.evaluate(gts, dets, self.config.eval.metric,
                                     class_names=self.class_names,
                                     small_object_classes=small_object_class_ids(self.class_names))
      results = dict(results, num_images=float(len(gts)), predict_seconds=t_predict,
                     metric_seconds=time.perf_counter() - t0, boxes_clipped=float(clipped),
                     boxes_dropped=float(dropped))
      self._report(results, gts, dets, step, out_dir, writer)
    return sharding.broadcast_from_process_0(results)

  def _report(self, results, gts, dets, step, out_dir, writer):
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / 'results.json', 'w') as f:
      json.dump({'step': step, 'metric': self.config.eval.metric, 'split': self.split,
                 'results': {k: (None if isinstance(v, float) and np.isnan(v) else v)
                             for k, v in results.items()}}, f, indent=2)
    table = metrics_lib.format_table(results, self.class_names)
    (out / 'table.txt').write_text(table + '\n')
    print(f'\nEvaluation at step {step} on {self.config.data.name}:{self.split} '
          f'({len(gts)} images, metric {self.config.eval.metric}):\n{table}', flush=True)
    if self.config.eval.pr_curves:
      curves = metrics_lib.precision_recall(gts, dets, metric=self.config.eval.metric,
                                            num_classes=len(self.class_names))
      plots.plot_pr_curves(curves, self.class_names, str(out / 'pr'))
    if writer is not None:
      writer.write(step, results, prefix='eval/')
    logging.info('Eval step %d: mAP %.4f (predict %.1fs, metric %.2fs)', step,
                 results['mAP'], results['predict_seconds'], results['metric_seconds'])
