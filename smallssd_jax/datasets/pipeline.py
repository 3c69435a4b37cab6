"""grain pipelines: sources -> augmented, padded, batched numpy dicts.

Training (`make_train_iterator`): one global order of examples, whatever
the number of processes, workers or read threads:

  MapDataset.range(len(source))
    .shuffle(seed) / window shuffle  reshuffled every epoch
    .repeat()                        global position -> source index
    .random_map(load + augment + pad)  per-element rng from (seed, position)
  MapDataset.range(start_step, inf)  the global step k
    .map(_StepBatch)                 this process's share of step k's global
                                     batch: positions k*B + p*b ... + b - 1
                                     (B = config.batch_size, b = B / processes)
    .to_iter_dataset()               read threads prefetch whole batches
    .mp_prefetch(num_workers)        worker processes (spawn; absl flags must
                                     be parsed, as main.py's app.run does)

So the global batch of step k is the same on 1 process and on n (process p
holds its p-th slice of it), and batches depend only on (config, step): a
resumed run rebuilds its iterator at the checkpoint's step, with any number of
processes or workers. A bad example skipped under `on_bad_example='skip'` is
replaced by the example at the same position one epoch later (deterministic
too).

Evaluation (`make_eval_batches`) is finite and unshuffled: every process
gets the same number of batches (its shard padded with empty examples), and
the `example_mask` field marks the real ones.

Batch dict (docs/architecture.md): `image` and its companions as the run's
batch layout says (batch_layout.py, resolved once from the config), boxes
float32 [B, M, 4] `[ymin, xmin, ymax, xmax]` normalised to the model input,
labels int32 [B, M] (1..K, 0 on padding), mask bool [B, M], ignore bool [B, M],
image_id int32 [B], orig_size int32 [B, 2] (h, w), box_repairs int32 [B, 3]
(boxes the reader clipped, boxes it dropped, boxes the augmentation cropped
out: the train log and the evaluation report count them); eval batches also
example_mask bool [B].
"""

from __future__ import annotations

import collections
import math
import sys
from typing import Any, Sequence

from absl import logging
import grain
import numpy as np

from smallssd_jax import batch_layout
from smallssd_jax.batch_layout import Layout
from smallssd_jax.datasets import ops as ops_lib
from smallssd_jax.datasets import records
from smallssd_jax.datasets import sources

BATCH_KEYS = ('image', 'boxes', 'labels', 'mask', 'ignore', 'image_id', 'orig_size', 'box_repairs')
ON_BAD = ('error', 'skip')

# Bad examples skipped in this process, by reason (workers count their own).
skipped: collections.Counter[str] = collections.Counter()

get_source = sources.get_source
class_names = sources.class_names


def _derive_seed(*parts: int) -> int:
  """A 32-bit seed from several ints (grain wants seeds in [0, 2**32))."""
  return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def pad_example(example: records.Example, max_boxes: int,
                layout: Layout = Layout.HOST, train: bool = False,
                cropped_out: int = 0) -> dict[str, np.ndarray]:
  """The batch fields of one example for `layout`; ground truth padded to `max_boxes`.

  `cropped_out`: boxes the augmentation removed (for `box_repairs`).
  """
  n = len(example['boxes'])
  if n > max_boxes:
    raise records.BadExampleError(
        example.get('key', ''), f'{n} objects after augmentation, more than data.max_boxes='
        f'{max_boxes}')
  boxes = np.zeros((max_boxes, 4), np.float32)
  labels = np.zeros((max_boxes,), np.int32)
  ignore = np.zeros((max_boxes,), bool)
  mask = np.zeros((max_boxes,), bool)
  boxes[:n] = example['boxes']
  labels[:n] = example['labels']
  ignore[:n] = example['ignore']
  mask[:n] = True
  image = np.asarray(example['image'])
  out = {
      'image': image.astype(np.float32) if layout == Layout.HOST else image.astype(np.uint8),
      'boxes': boxes,
      'labels': labels,
      'mask': mask,
      'ignore': ignore,
      'image_id': np.int32(example['image_id']),
      'orig_size': np.asarray(example['orig_size'], np.int32).reshape(2),
      'box_repairs': np.array([*records.repair_counts(example.get('problems', ())), cropped_out],
                              np.int32),
  }
  if train and layout != Layout.HOST:
    # The step's photometric draw (one stage per `photometric` op, none without
    # one) and the rows / columns that hold image pixels rather than fill.
    stages = example.get('photometric_stages', [])
    out['photometric'] = (np.stack(stages).astype(np.float32) if stages
                          else np.zeros((0, len(batch_layout.IDENTITY_STAGE)), np.float32))
    out['image_region'] = np.asarray(example['image_region'], np.int32)
  if train and layout == Layout.RESAMPLE:
    out['window'] = np.asarray(example['window'], np.float32)
    out['source_size'] = np.asarray(example['source_size'], np.int32)
  return out


def empty_example(input_size: int, max_boxes: int,
                  image_dtype=np.float32) -> dict[str, np.ndarray]:
  """The padding example of eval batches (image_id -1, no boxes)."""
  return {
      'image': np.zeros((input_size, input_size, 3), image_dtype),
      'boxes': np.zeros((max_boxes, 4), np.float32),
      'labels': np.zeros((max_boxes,), np.int32),
      'mask': np.zeros((max_boxes,), bool),
      'ignore': np.zeros((max_boxes,), bool),
      'image_id': np.int32(-1),
      'orig_size': np.zeros((2,), np.int32),
      'box_repairs': np.zeros((3,), np.int32),
  }


class ExampleLoader:
  """Reads, checks, augments and pads one example; handles bad input.

  A bad example (records.BadExampleError: corrupt or missing image, bad
  annotation, more objects than max_boxes, ...) raises with its file and
  reason when `on_bad_example='error'`, or is logged, counted in `skipped`
  and returned as None when 'skip'.
  """

  def __init__(self, source: records.Source, ops: Sequence[ops_lib.Op], max_boxes: int,
               on_bad_example: str, layout: Layout = Layout.HOST, train: bool = False):
    if on_bad_example not in ON_BAD:
      raise ValueError(f'data.on_bad_example must be one of {ON_BAD}, got {on_bad_example!r}')
    self.source = source
    self.ops = list(ops)
    self.max_boxes = int(max_boxes)
    self.layout = layout
    self.train = train
    self.on_bad_example = on_bad_example

  def __call__(self, index: int, rng: np.random.Generator | None) -> dict[str, Any] | None:
    try:
      example = self.source.record(int(index))
      n = len(example['boxes'])
      if n > self.max_boxes:
        raise records.BadExampleError(
            example['key'], f'{n} objects, more than data.max_boxes={self.max_boxes} '
            '(raise data.max_boxes)')
      example = ops_lib.apply(self.ops, example, rng)
      return pad_example(example, self.max_boxes, self.layout, self.train,
                         cropped_out=n - len(example['boxes']))
    except records.BadExampleError as e:
      if self.on_bad_example == 'error':
        raise
      skipped[e.reason] += 1
      logging.warning('skipping bad example %s (%d skipped in this process)', e,
                      sum(skipped.values()))
      return None


class _TrainMap(grain.transforms.RandomMap):

  def __init__(self, loader: ExampleLoader):
    self.loader = loader

  def random_map(self, element: int, rng: np.random.Generator):
    return self.loader(element, rng)


# Positions tried (one epoch apart) for a slot whose examples are all bad.
MAX_REPLACEMENTS = 100


class _StepBatch(grain.transforms.Map):
  """Global step -> this process's slice of that step's global batch."""

  def __init__(self, examples: grain.MapDataset, epoch_size: int, global_batch: int,
               local_batch: int, process_index: int):
    self.examples = examples
    self.epoch_size = epoch_size
    self.global_batch = global_batch
    self.local_batch = local_batch
    self.process_index = process_index

  def _example(self, position: int) -> dict[str, np.ndarray]:
    for attempt in range(MAX_REPLACEMENTS):
      example = self.examples[position + attempt * self.epoch_size]
      if example is not None:
        return example
    raise ValueError(
        f'{MAX_REPLACEMENTS} examples in a row were bad (training position {position} and '
        f'the same position in the next epochs); see the skipped examples logged above')

  def map(self, element: int) -> dict[str, np.ndarray]:
    first = int(element) * self.global_batch + self.process_index * self.local_batch
    examples = [self._example(first + j) for j in range(self.local_batch)]
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


class _EvalMap(grain.transforms.Map):

  def __init__(self, loader: ExampleLoader, input_size: int, image_dtype):
    self.loader = loader
    self.input_size = input_size
    self.image_dtype = image_dtype

  def _empty(self):
    return empty_example(self.input_size, self.loader.max_boxes, self.image_dtype)

  def map(self, element: int):
    if element < 0:
      out = self._empty()
      out['example_mask'] = np.bool_(False)
      return out
    out = self.loader(element, None)
    if out is None:  # skipped bad example: keep the slot, masked out
      out = self._empty()
      out['example_mask'] = np.bool_(False)
      return out
    out['example_mask'] = np.bool_(True)
    return out


def _check_classes(config, source: records.Source) -> None:
  want = len(source.class_names) + 1
  got = int(config.model.num_classes)
  if got != want:
    raise ValueError(
        f'config.model.num_classes={got} but the dataset has {len(source.class_names)} '
        f'classes (+1 background = {want})')


def _per_process(total: int, process_count: int, what: str) -> int:
  if total % process_count:
    raise ValueError(f'{what}={total} is not divisible by process_count={process_count}')
  return total // process_count


def _read_options(data_cfg) -> grain.ReadOptions:
  """`data.prefetch` batches in flight (the elements read are whole batches).

  grain's default buffer (500 elements) would hold hundreds of batches.
  """
  return grain.ReadOptions(num_threads=int(data_cfg.read_threads),
                           prefetch_buffer_size=max(1, int(data_cfg.prefetch)))


def _mp_options(data_cfg) -> grain.MultiprocessingOptions:
  return grain.MultiprocessingOptions(num_workers=int(data_cfg.num_workers),
                                      per_worker_buffer_size=max(1, int(data_cfg.prefetch)))


def input_spec(config) -> batch_layout.InputSpec:
  """The run's batch layouts (resolved from the config and the JAX backend)."""
  return batch_layout.InputSpec.from_config(config.data, int(config.model.input_size))


def make_train_dataset(config, process_index: int = 0, process_count: int = 1,
                       start_step: int = 0,
                       spec: batch_layout.InputSpec | None = None) -> grain.IterDataset:
  """The training pipeline as a grain IterDataset (see the module docstring)."""
  data_cfg = config.data
  source = sources.get_source(data_cfg, data_cfg.train_split)
  _check_classes(config, source)
  if len(source) == 0:
    raise ValueError(f'training split {data_cfg.train_split!r} of {data_cfg.name} is empty')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} is not in [0, {process_count})')
  global_batch = int(config.batch_size)
  batch_size = _per_process(global_batch, process_count, 'config.batch_size')
  spec = spec or input_spec(config)
  loader = ExampleLoader(source, ops_lib.train_ops(data_cfg, spec), int(data_cfg.max_boxes),
                         data_cfg.on_bad_example, spec.train_layout, train=True)
  seed = int(config.seed)
  order = grain.MapDataset.range(len(source))
  if int(data_cfg.shuffle_buffer) > 0:
    order = grain.experimental.WindowShuffleMapDataset(
        order, window_size=int(data_cfg.shuffle_buffer), seed=_derive_seed(seed, 1))
  else:
    order = order.shuffle(seed=_derive_seed(seed, 1))
  examples = order.repeat(None).random_map(_TrainMap(loader), seed=_derive_seed(seed, 2))
  steps = grain.MapDataset.range(int(start_step), sys.maxsize)
  ds = steps.map(_StepBatch(examples, len(source), global_batch, batch_size, process_index))
  ds = ds.to_iter_dataset(_read_options(data_cfg))
  return ds.mp_prefetch(_mp_options(data_cfg))


def make_train_iterator(config, process_index: int = 0, process_count: int = 1,
                        start_step: int = 0,
                        spec: batch_layout.InputSpec | None = None) -> grain.DatasetIterator:
  """An endless iterator of training batches for this process.

  Args:
    config: the full run config (uses seed, batch_size, model.input_size,
      model.num_classes and data).
    process_index, process_count: this host's slice of each global batch
      (jax.process_index() / jax.process_count(), passed in so the data code
      needs no JAX).
    start_step: the first global step to yield the batch of (a resumed run's
      step).
    spec: the batch layouts (default: resolved from the config).

  Returns:
    a grain iterator of batch dicts with config.batch_size // process_count
    examples (module docstring).
  """
  return iter(make_train_dataset(config, process_index, process_count, start_step, spec))


def eval_layout(num_examples: int, batch_size: int, process_index: int,
                process_count: int) -> list[int]:
  """This process's example indices, padded with -1 to the common batch count."""
  mine = list(range(process_index, num_examples, process_count))
  per_process = math.ceil(num_examples / process_count)
  num_batches = max(1, math.ceil(per_process / batch_size))
  return mine + [-1] * (num_batches * batch_size - len(mine))


def make_eval_batches(config, split: str | None = None, process_index: int = 0,
                      process_count: int = 1,
                      spec: batch_layout.InputSpec | None = None) -> grain.IterDataset:
  """Finite evaluation batches (resize + normalize only) for this process.

  Every process yields the same number of batches; padding examples (and
  skipped bad ones) have `example_mask` False. Uses config.eval.batch_size
  and config.eval.num_examples (0 = whole split).

  Returns:
    a grain IterDataset; iterate it (any number of times) for the batch dicts
    of the module docstring plus `example_mask` bool [B].
  """
  data_cfg = config.data
  split = split or data_cfg.eval_split
  source = sources.get_source(data_cfg, split)
  _check_classes(config, source)
  batch_size = _per_process(int(config.eval.batch_size), process_count, 'eval.batch_size')
  limit = int(config.eval.num_examples)
  n = min(len(source), limit) if limit > 0 else len(source)
  spec = spec or input_spec(config)
  loader = ExampleLoader(source, ops_lib.eval_ops(data_cfg, spec), int(data_cfg.max_boxes),
                         data_cfg.on_bad_example, spec.eval_layout)
  indices = eval_layout(n, batch_size, process_index, process_count)
  image_dtype = np.float32 if spec.eval_layout == Layout.HOST else np.uint8
  ds = grain.MapDataset.source(indices).map(_EvalMap(loader, spec.size, image_dtype))
  ds = ds.batch(batch_size, drop_remainder=False)
  ds = ds.to_iter_dataset(_read_options(data_cfg))
  return ds.mp_prefetch(_mp_options(data_cfg))


def load_image_rgb(path: str) -> np.ndarray:
  """Any image file -> uint8 [H, W, 3] RGB; a clear error naming the file otherwise."""
  return records.decode_image(records.EncodedImage.read(path, path))


def preprocess_for_inference(image: np.ndarray, config,
                             spec: batch_layout.InputSpec | None = None) -> np.ndarray:
  """uint8 [H, W, 3] RGB -> one evaluation image of the run's layout: uint8 [S, S, 3]
  resized (device layouts), or the normalised float32 model input (host layout)."""
  h, w = image.shape[:2]
  example = records.make_example(image=image, boxes=np.zeros((0, 4), np.float32), labels=[],
                                 ignore=[], image_id=-1, orig_size=(h, w), key='<inference>')
  spec = spec or input_spec(config)
  return ops_lib.apply(ops_lib.eval_ops(config.data, spec), example, None)['image']
