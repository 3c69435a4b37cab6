"""A trained detector as a file that runs without this library: StableHLO or ONNX.

  python -m smallssd_jax.export --workdir=runs/default --format=stablehlo --out=model.jax
  python -m smallssd_jax.export --workdir=runs/default --format=onnx --out=model.onnx --batch=1

Both take uint8 RGB images already resized to the model's input size
`[B, S, S, 3]` (the host's resize is the user's: any resize to S x S works,
the library's own is `Predictor.preprocess`) and return fixed-size
detections, best first:

  boxes           float32 [B, K, 4]  [ymin, xmin, ymax, xmax] normalised to [0, 1]
  scores          float32 [B, K]     0 in unused slots
  classes         int32   [B, K]     1..C-1 (0 in unused slots)
  num_detections  int32   [B]        the filled slots

K is `post.max_detections`. Normalisation, the network, box decoding and
per-class NMS are inside.

StableHLO (`jax.export`): a zip holding `exported.bin` (the serialized
`jax.export.Exported`, weights inside, a symbolic batch dimension) and
`metadata.json` (the contract above, class names, platforms, step). Loading
needs jax only:

  import json, zipfile, jax
  with zipfile.ZipFile('model.jax') as z:
    fn = jax.export.deserialize(z.read('exported.bin'))
    meta = json.loads(z.read('metadata.json'))
  boxes, scores, classes, count = fn.call(images_uint8)

ONNX (the `export` extra: jax2onnx, onnx, onnxruntime): jax2onnx converts
everything up to the per-class candidates (normalisation, network, decode,
softmax); ONNX's own `NonMaxSuppression` and a `TopK` follow in the same
graph, since the converter cannot express our greedy NMS loop in a form
onnxruntime accepts. The batch size is fixed per file (`--batch`). The one
difference from the library's NMS: ours considers the `post.pre_nms_top_k`
best candidates per class before NMS, ONNX's operator all candidates above
the score threshold; the detections differ only for a class with more than
`pre_nms_top_k` candidates above `post.score_threshold` in one image.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import sys
import zipfile
from typing import Any, Sequence

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from smallssd_jax import _xla
from smallssd_jax import console
from smallssd_jax import errors
from smallssd_jax import pixels
from smallssd_jax import postprocess
from smallssd_jax import predictor as predictor_lib
from smallssd_jax import task as task_lib

FORMATS = ('stablehlo', 'onnx')
PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')
OUTPUTS = ('boxes', 'scores', 'classes', 'num_detections')
BOX_FORMAT = 'yxyx normalised to [0, 1] of the model input'
EXPORT_HINT = "pip install -e '.[export]'   (jax2onnx, onnx, onnxruntime)"


def _layer_backend(platforms: Sequence[str]) -> str:
  """The layers to build: the CPU drop-ins only for a CPU-only export (models/cpu.py)."""
  return 'cpu' if tuple(platforms) == ('cpu',) else 'gpu'


def metadata(config: ml_collections.ConfigDict, class_names, step, **extra) -> dict[str, Any]:
  """What a user of an exported file needs to know to feed it and read its outputs."""
  size = int(config.model.input_size)
  return {
      'model': str(config.model.name),
      'input': {'shape': ['batch', size, size, 3], 'dtype': 'uint8', 'channels': 'RGB',
                'resize': 'to input_size x input_size; boxes are relative to that image'},
      'outputs': list(OUTPUTS),
      'box_format': BOX_FORMAT,
      'max_detections': int(config.post.max_detections),
      'score_threshold': float(config.post.score_threshold),
      'nms_iou': float(config.post.nms_iou),
      'num_classes': int(config.model.num_classes),
      'class_names': list(class_names) if class_names is not None else None,
      'class_ids': '1..num_classes-1 index class_names[id - 1]; 0 is the background',
      'step': step,
      'jax_version': jax.__version__,
      'created': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      **extra,
  }


def _fixed_outputs(det: dict[str, jax.Array]) -> tuple[jax.Array, ...]:
  valid = det['valid']
  return (det['boxes'].astype(jnp.float32), det['scores'].astype(jnp.float32),
          jnp.where(valid, det['labels'], 0).astype(jnp.int32),
          jnp.sum(valid, axis=-1).astype(jnp.int32))


def inference_fn(task: task_lib.Task, config: ml_collections.ConfigDict, variables):
  """uint8 `[B, S, S, 3]` -> (boxes, scores, classes, num_detections), weights closed over."""
  variances = tuple(config.loss.variances)

  def fn(images):
    x = pixels.normalize(images.astype(jnp.float32), task.inputs)
    outputs = task.module.apply(variables, x, train=False)
    det = postprocess.detect(outputs, task.anchors, config.post, variances=variances,
                             two_step=task.two_step)
    return _fixed_outputs(det)

  return fn


def candidates_fn(task: task_lib.Task, config: ml_collections.ConfigDict, variables):
  """uint8 `[B, S, S, 3]` -> (boxes `[B, A, 4]`, foreground scores `[B, C-1, A]`):
  the graph ONNX's NonMaxSuppression takes."""
  variances = tuple(config.loss.variances)

  def fn(images):
    x = pixels.normalize(images.astype(jnp.float32), task.inputs)
    outputs = task.module.apply(variables, x, train=False)
    boxes, probs = postprocess.decode_scores(outputs, task.anchors, config.post,
                                             variances=variances, two_step=task.two_step)
    return boxes, jnp.swapaxes(probs[..., 1:], 1, 2)

  return fn


# ----------------------------------------------------------- StableHLO ---


def export_stablehlo(predictor: predictor_lib.Predictor, out: str,
                     platforms: Sequence[str] = ('cpu',)) -> dict[str, Any]:
  """Writes the StableHLO zip to `out`; returns its metadata."""
  platforms = tuple(platforms)
  unknown = sorted(set(platforms) - set(PLATFORMS))
  if unknown or not platforms:
    raise ValueError(f'platforms={list(platforms)}: choose from {list(PLATFORMS)}')
  config = predictor.config
  task = task_lib.build_task(config, backend=_layer_backend(platforms))
  fn = inference_fn(task, config, jax.device_get(predictor.variables))
  size = int(config.model.input_size)
  batch, = jax.export.symbolic_shape('batch')
  spec = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8)
  exported = jax.export.export(jax.jit(fn), platforms=platforms)(spec)
  meta = metadata(config, predictor.class_names, predictor.step, format='stablehlo',
                  platforms=list(platforms), file='exported.bin (jax.export.serialize)')
  _write_zip(out, {'exported.bin': bytes(exported.serialize()),
                   'metadata.json': json.dumps(meta, indent=1).encode()})
  return meta


def _write_zip(out: str, members: dict[str, bytes]) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  tmp = out + '.tmp'
  with zipfile.ZipFile(tmp, 'w', compression=zipfile.ZIP_STORED) as z:
    for name, data in members.items():
      z.writestr(name, data)
  os.replace(tmp, out)


def load_stablehlo(path: str):
  """(exported, metadata) from a file `export_stablehlo` wrote; `exported.call(images)`."""
  try:
    with zipfile.ZipFile(path) as z:
      blob, meta = z.read('exported.bin'), json.loads(z.read('metadata.json'))
  except (OSError, KeyError, zipfile.BadZipFile) as e:
    raise errors.InputError(f'{path}: not a StableHLO export of this library ({e})') from None
  return jax.export.deserialize(bytearray(blob)), meta


# ---------------------------------------------------------------- ONNX ---


def _onnx_modules():
  try:
    import jax2onnx  # pylint: disable=g-import-not-at-top
    import onnx  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise errors.MissingExtra(f'ONNX export needs the export extra ({e}): {EXPORT_HINT}') from None
  return jax2onnx, onnx


def export_onnx(predictor: predictor_lib.Predictor, out: str, batch: int = 1) -> dict[str, Any]:
  """Writes an ONNX model for batches of `batch` images to `out`; returns its metadata."""
  jax2onnx, onnx = _onnx_modules()
  from onnx import helper, TensorProto  # pylint: disable=g-import-not-at-top
  if batch < 1:
    raise ValueError(f'batch={batch}: at least 1')
  config = predictor.config
  task = task_lib.build_task(config, backend='gpu')      # plain layers: no CPU-only kernels
  fn = candidates_fn(task, config, jax.device_get(predictor.variables))
  size = int(config.model.input_size)
  model = jax2onnx.to_onnx(fn, [jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8)],
                           model_name='smallssd_candidates', opset=21)
  graph = model.graph
  del graph.value_info[:]          # the converter's intermediate shapes; onnxruntime re-infers them
  images_name = graph.input[0].name
  boxes_name, scores_name = graph.output[0].name, graph.output[1].name
  max_det = int(config.post.max_detections)
  num_anchors = int(task.anchors.shape[0])
  consts = {
      'max_per_class': np.array([max_det], np.int64),
      'iou': np.array([float(config.post.nms_iou)], np.float32),
      'score_thr': np.array([float(config.post.score_threshold)], np.float32),
      'col0': np.array([0], np.int64), 'col1': np.array([1], np.int64),
      'batch_ids': np.arange(batch, dtype=np.int64)[:, None],
      'minus_one': np.array(-1.0, np.float32), 'zero_f': np.array(0.0, np.float32),
      'one_i': np.array(1, np.int64), 'k': np.array([max_det], np.int64),
      'pad_scores': np.full((batch, max_det), -1.0, np.float32),
      'pad_index': np.zeros((max_det,), np.int64), 'axis0': np.array([0], np.int64),
      'col02': np.array([0, 2], np.int64), 'four': np.array([max_det, 4], np.int64),
      'minus_axis': np.array([-1], np.int64),
  }
  for name, value in consts.items():
    graph.initializer.append(onnx.numpy_helper.from_array(value, f'nms_{name}'))
  c = lambda name: f'nms_{name}'    # noqa: E731
  nodes = [
      # selected [n, 3] = (batch, class - 1, anchor), per class by score, NMS at nms_iou.
      helper.make_node('NonMaxSuppression', [boxes_name, scores_name, c('max_per_class'),
                                             c('iou'), c('score_thr')], ['sel'],
                       center_point_box=0),
      helper.make_node('Gather', ['sel', c('col0')], ['sel_b2'], axis=1),        # [n, 1]
      helper.make_node('Squeeze', ['sel_b2', c('col1')], ['sel_b']),              # [n]
      helper.make_node('Gather', ['sel', c('col1')], ['sel_c2'], axis=1),
      helper.make_node('Squeeze', ['sel_c2', c('col1')], ['sel_c']),
      helper.make_node('Gather', ['sel', c('col02')], ['sel_ba'], axis=1),        # [n, 2]
      helper.make_node('GatherND', [scores_name, 'sel'], ['sel_score']),          # [n]
      helper.make_node('GatherND', [boxes_name, 'sel_ba'], ['sel_box']),          # [n, 4]
      # [batch, n]: each image's own detections, -1 elsewhere; K slots of -1 appended
      # so that TopK(K) is defined when an image has fewer than K.
      helper.make_node('Unsqueeze', ['sel_b', c('axis0')], ['sel_b_row']),        # [1, n]
      helper.make_node('Equal', [c('batch_ids'), 'sel_b_row'], ['mine']),         # [batch, n]
      helper.make_node('Unsqueeze', ['sel_score', c('axis0')], ['score_row']),
      helper.make_node('Where', ['mine', 'score_row', c('minus_one')], ['per_image']),
      helper.make_node('Concat', ['per_image', c('pad_scores')], ['padded'], axis=1),
      helper.make_node('TopK', ['padded', c('k')], ['top_scores', 'top_idx'], axis=1,
                       largest=1, sorted=1),                                      # [batch, K]
      helper.make_node('Greater', ['top_scores', c('zero_f')], ['valid']),
      helper.make_node('Concat', ['sel_c', c('pad_index')], ['cls_padded'], axis=0),
      helper.make_node('Gather', ['cls_padded', 'top_idx'], ['cls0']),            # [batch, K]
      helper.make_node('Add', ['cls0', c('one_i')], ['cls1']),
      helper.make_node('Cast', ['valid'], ['valid_i'], to=TensorProto.INT64),
      helper.make_node('Mul', ['cls1', 'valid_i'], ['cls_i64']),
      helper.make_node('Cast', ['cls_i64'], ['classes'], to=TensorProto.INT32),
      helper.make_node('Where', ['valid', 'top_scores', c('zero_f')], ['scores']),
      helper.make_node('ReduceSum', ['valid_i', c('col1')], ['count_i64'], keepdims=0),
      helper.make_node('Cast', ['count_i64'], ['num_detections'], to=TensorProto.INT32),
      helper.make_node('ConstantOfShape', [c('k')], ['zero_rows_f'],
                       value=helper.make_tensor('z', TensorProto.FLOAT, [1], [0.0])),
      helper.make_node('Unsqueeze', ['zero_rows_f', c('col1')], ['zero_rows_f2']),  # [K, 1]
      helper.make_node('Expand', ['zero_rows_f2', c('four')], ['zero_boxes']),    # [K, 4]
      helper.make_node('Concat', ['sel_box', 'zero_boxes'], ['box_padded'], axis=0),
      helper.make_node('Gather', ['box_padded', 'top_idx'], ['boxes_all']),       # [batch, K, 4]
      helper.make_node('Unsqueeze', ['valid', c('minus_axis')], ['valid3']),
      helper.make_node('Where', ['valid3', 'boxes_all', c('zero_f')], ['boxes']),
  ]
  graph.node.extend(nodes)
  del graph.output[:]
  graph.output.extend([
      helper.make_tensor_value_info('boxes', TensorProto.FLOAT, [batch, max_det, 4]),
      helper.make_tensor_value_info('scores', TensorProto.FLOAT, [batch, max_det]),
      helper.make_tensor_value_info('classes', TensorProto.INT32, [batch, max_det]),
      helper.make_tensor_value_info('num_detections', TensorProto.INT32, [batch]),
  ])
  if graph.input[0].name != 'images':
    _rename(graph, images_name, 'images')
  meta = metadata(config, predictor.class_names, predictor.step, format='onnx', batch=batch,
                  num_anchors=num_anchors, converter=f'jax2onnx {importlib.metadata.version("jax2onnx")}',
                  nms='onnx NonMaxSuppression over all candidates above score_threshold')
  for key, value in meta.items():
    entry = model.metadata_props.add()
    entry.key, entry.value = key, json.dumps(value)
  onnx.checker.check_model(model)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  onnx.save(model, out)
  return meta


def _rename(graph, old: str, new: str) -> None:
  for node in graph.node:
    node.input[:] = [new if x == old else x for x in node.input]
  for value in graph.input:
    if value.name == old:
      value.name = new


# ----------------------------------------------------------- command ---


def export(workdir: str, fmt: str, out: str, *, config: str | None = None,
           step: int | None = None, which: str = 'latest',
           platforms: Sequence[str] = ('cpu',), batch: int = 1) -> dict[str, Any]:
  """The command line's work: the run's predictor, written in `fmt` to `out`."""
  if fmt not in FORMATS:
    raise ValueError(f'--format={fmt!r}: one of {list(FORMATS)}')
  if fmt == 'onnx':
    _onnx_modules()                         # name the missing extra before restoring
  predictor = predictor_lib.Predictor.from_workdir(workdir, step=step, which=which,
                                                   config=config or None)
  if fmt == 'stablehlo':
    return export_stablehlo(predictor, out, platforms)
  return export_onnx(predictor, out, batch)


def define_flags() -> None:
  flags.DEFINE_string('workdir', None, 'The training run to export.', required=True)
  flags.DEFINE_enum('format', 'stablehlo', FORMATS, 'What to write.')
  flags.DEFINE_string('out', None, 'The file to write.', required=True)
  flags.DEFINE_string('config', '', "The run's config ('configs/x.py:args'); default the "
                      "workdir's config.json.")
  flags.DEFINE_integer('step', None, 'A given checkpoint step (default: see --which).')
  flags.DEFINE_enum('which', 'latest', ['latest', 'best'], 'The newest intact checkpoint, or '
                    'the best evaluated one.')
  flags.DEFINE_list('platforms', ['cpu'], f'StableHLO: lower for these ({", ".join(PLATFORMS)}).')
  flags.DEFINE_integer('batch', 1, 'ONNX: the (fixed) batch size of the model.')


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  _xla.apply_cpu_xla_defaults()
  console.quiet_library_logs(True)
  f = flags.FLAGS
  try:
    meta = export(f.workdir, f.format, f.out, config=f.config, step=f.step, which=f.which,
                  platforms=f.platforms, batch=f.batch)
  except errors.RunError as e:       # the exit statuses of main.py
    print(f'\n{type(e).__name__}: {e}', file=sys.stderr, flush=True)
    sys.exit(e.exit_code)
  print(f'wrote {f.out} ({f.format}, step {meta["step"]}, '
        f'{os.path.getsize(f.out) / 2**20:.1f} MiB): {", ".join(OUTPUTS)}; boxes {BOX_FORMAT}')


if __name__ == '__main__':
  define_flags()
  app.run(main)
