"""The whole config checked before the first step (README "When things go wrong").

Every field a run reads has a rule here: its type, its allowed values or
range, and when it applies (some fields exist only for one model, prior
style or dataset). `validate` fails on the first problems it finds, all at
once, each naming the field, its value and what is allowed; a field without
an applicable rule is unknown or unused, and an error too: a typo in a field
name, or a setting that this model would silently ignore. Then the checks
that need more than one field: batch sizes against the device and process
counts, objects per image against `max_boxes`, the priors against the
model's feature maps, the dataset and the evaluation split readable, the
detect input present.

`check_resume` compares a workdir's recorded config with the new one: a
resumed run must keep its global batch size and its model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections

from smallssd_jax import errors

Check = Callable[[Any], str | None]        # a problem, or None


# -------------------------------------------------------------- checkers ---


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def integer(lo: int | None = None, hi: int | None = None) -> Check:
  def check(v):
    if not _is_int(v):
      return 'must be an integer'
    if lo is not None and v < lo:
      return f'must be >= {lo}'
    if hi is not None and v > hi:
      return f'must be <= {hi}'
    return None
  return check


def number(lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> Check:
  def check(v):
    if not _is_num(v) or not math.isfinite(v):
      return 'must be a finite number'
    if lo is not None and (v <= lo if lo_open else v < lo):
      return f'must be {">" if lo_open else ">="} {lo}'
    if hi is not None and v > hi:
      return f'must be <= {hi}'
    return None
  return check


def boolean(v) -> str | None:
  return None if isinstance(v, bool) else 'must be True or False'


def one_of(*allowed) -> Check:
  def check(v):
    return None if v in allowed else f'must be one of {list(allowed)}'
  return check


def string(v) -> str | None:
  return None if isinstance(v, str) else 'must be a string'


def auto_or_bool(v) -> str | None:
  from smallssd_jax import config_lib  # pylint: disable=g-import-not-at-top
  try:
    config_lib.auto_bool(v, 'field')
  except ValueError:
    return "must be True, False or 'auto'"
  return None


def numbers(length: int | None = None, lo: float | None = None, min_length: int = 0,
            integers: bool = False) -> Check:
  def check(v):
    if not isinstance(v, (list, tuple)):
      return 'must be a list'
    if length is not None and len(v) != length:
      return f'must have {length} values'
    if len(v) < min_length:
      return f'must have at least {min_length} values'
    for x in v:
      if not (_is_int(x) if integers else _is_num(x)):
        return f'must hold {"integers" if integers else "numbers"} (got {x!r})'
      if lo is not None and x < lo:
        return f'values must be >= {lo}'
    return None
  return check


def strings(allowed: Sequence[str] | None = None, min_length: int = 0) -> Check:
  def check(v):
    if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) for x in v):
      return 'must be a list of strings'
    if len(v) < min_length:
      return f'must have at least {min_length} values'
    if allowed is not None:
      bad = [x for x in v if x not in allowed]
      if bad:
        return f'unknown {bad}; allowed: {list(allowed)}'
    return None
  return check


def nested_numbers(v) -> str | None:
  if not isinstance(v, (list, tuple)) or not all(isinstance(r, (list, tuple)) for r in v):
    return 'must be a list of lists of numbers'
  return None if all(_is_num(x) and x > 0 for r in v for x in r) else 'ratios must be > 0'


def schedule_positions(v) -> str | None:
  if not isinstance(v, (list, tuple)):
    return 'must be a list of steps or fractions of num_train_steps'
  for x in v:
    if not _is_num(x) or x < 0 or (isinstance(x, float) and x >= 1 and x != int(x)):
      return f'{x!r} is neither a step number nor a fraction in (0, 1)'
  return None


def schedule_position(v) -> str | None:
  return schedule_positions([v])


def scales(v) -> str | None:
  if not isinstance(v, (Mapping, ml_collections.ConfigDict)):
    return 'must map map names to scales'
  bad = sorted(set(v) - {'conv4_3', 'conv5_3', 'fc7'})
  if bad:
    return f'names {bad}; only conv4_3, conv5_3 and fc7 can be normalised'
  return None if all(_is_num(x) and x > 0 for x in v.values()) else 'scales must be > 0'


def anything(v) -> str | None:
  del v
  return None


# ----------------------------------------------------------------- rules ---


@dataclasses.dataclass(frozen=True)
class Rule:
  check: Check
  when: Callable[[ml_collections.ConfigDict], bool] | None = None


def _model(*names):
  return lambda c: c.model.name in names


def _style(*styles):
  return lambda c: c.anchors.style in styles


def _data(*names):
  return lambda c: c.data.name in names or any(c.data.name.startswith(n) for n in names
                                                 if n.endswith(':'))


MODEL_NAMES = ('ssd', 'dfssd', 'skipfpn')
METRICS = ('voc07', 'voc', 'coco', 'kitti')
AUGMENT_OPS = ('photometric', 'zoom_out', 'min_iou_crop', 'flip')
RESIZE_METHODS = ('bilinear', 'nearest', 'opencv', 'random')

RULES: dict[str, Rule] = {
    # The run.
    'seed': Rule(integer(0)),
    'batch_size': Rule(integer(1)),
    'num_train_steps': Rule(integer(1)),
    'log_every_steps': Rule(integer(1)),
    'eval_every_steps': Rule(integer(0)),
    'checkpoint_every_steps': Rule(integer(1)),
    'keep_checkpoints': Rule(integer(1)),
    'init_from': Rule(string),
    'runlocal': Rule(boolean),
    # The model (docs/design.md §3-5).
    'model.name': Rule(one_of(*MODEL_NAMES)),
    'model.backbone': Rule(one_of('vgg16_ssd', 'vgg16_refinedet')),
    'model.extras': Rule(one_of('ssd300', 'ssd512', 'refinedet', 'none')),
    'model.neck': Rule(one_of('none', 'dfssd', 'skipfpn')),
    'model.head': Rule(one_of('ssd', 'two_step')),
    'model.sources': Rule(strings(min_length=1)),
    'model.input_size': Rule(integer(32)),
    'model.num_classes': Rule(integer(0)),     # >= 2 checked with the data (custom: from it)
    'model.width': Rule(number(0, 4, lo_open=True)),
    'model.dtype': Rule(one_of('float32', 'bfloat16')),
    'model.l2norm_scales': Rule(scales),
    'model.batch_norm': Rule(boolean),
    'model.backbone_batch_norm': Rule(boolean),
    'model.head_init': Rule(one_of('xavier', 'small')),
    'model.dfssd.deconv_channels': Rule(integer(1), _model('dfssd')),
    'model.dfssd.deconv_stride': Rule(integer(1), _model('dfssd')),
    'model.dfssd.deconv_kernel': Rule(integer(1), _model('dfssd')),
    'model.dfssd.deconv_padding': Rule(integer(0), _model('dfssd')),
    'model.dfssd.pool': Rule(one_of('avg', 'max'), _model('dfssd')),
    'model.dfssd.deepest': Rule(string, _model('dfssd')),
    'model.dfssd.fusion_channels': Rule(integer(1), _model('dfssd')),
    'model.dfssd.fusion_weights': Rule(numbers(min_length=1), _model('dfssd')),
    'model.dfssd.fusion_sources': Rule(strings(min_length=1), _model('dfssd')),
    'model.dfssd.fusion': Rule(one_of('fixed', 'learned'), _model('dfssd')),
    'model.dfssd.fuse_levels': Rule(one_of('first', 'all'), _model('dfssd')),
    'model.dfssd.source_norm': Rule(one_of('l2', 'none'), _model('dfssd')),
    'model.dfssd.source_norm_scale': Rule(number(0, lo_open=True), _model('dfssd')),
    'model.dfssd.context_init': Rule(number(0, lo_open=True), _model('dfssd')),
    'model.skipfpn.channels': Rule(integer(1), _model('skipfpn')),
    'model.skipfpn.skip_depth': Rule(integer(0), _model('skipfpn')),
    'model.skipfpn.grf_levels': Rule(numbers(integers=True, lo=0), _model('skipfpn')),
    'model.skipfpn.grf_reduction': Rule(integer(1), _model('skipfpn')),
    # Priors (docs/design.md §3-5).
    'anchors.style': Rule(one_of('ssd', 'dfssd', 'refinedet')),
    'anchors.input_size': Rule(integer(1)),
    'anchors.feature_maps': Rule(numbers(integers=True, lo=1, min_length=1)),
    'anchors.clip': Rule(boolean),
    'anchors.steps': Rule(numbers(lo=0), _style('ssd', 'refinedet')),
    'anchors.min_sizes': Rule(numbers(lo=0), _style('ssd')),
    'anchors.max_sizes': Rule(numbers(lo=0), _style('ssd')),
    'anchors.aspect_ratios': Rule(anything),   # nested for ssd, flat otherwise: anchors.py checks
    'anchors.s_min': Rule(number(0, 1, lo_open=True), _style('dfssd')),
    'anchors.s_max': Rule(number(0, 2, lo_open=True), _style('dfssd')),
    'anchors.small_first_level': Rule(boolean, _style('dfssd')),
    'anchors.small_ratios': Rule(numbers(lo=0), _style('dfssd')),
    'anchors.size_factor': Rule(number(0, lo_open=True), _style('refinedet')),
    # Loss and post-processing (docs/design.md §3, §5).
    'loss.iou_threshold': Rule(number(0, 1, lo_open=True)),
    'loss.neg_pos_ratio': Rule(number(0)),
    'loss.variances': Rule(numbers(length=4, lo=0)),
    'loss.loc_weight': Rule(number(0)),
    'loss.arm_filter_threshold': Rule(number(0, 1), lambda c: c.model.head == 'two_step'),
    'loss.negative_anchor_filter': Rule(boolean, lambda c: c.model.head == 'two_step'),
    'loss.odm_cls_weight': Rule(number(0), lambda c: c.model.head == 'two_step'),
    'post.score_threshold': Rule(number(0, 1)),
    'post.nms_iou': Rule(number(0, 1, lo_open=True)),
    'post.pre_nms_top_k': Rule(integer(1)),
    'post.max_detections': Rule(integer(1)),
    'post.arm_filter_threshold': Rule(number(0, 1)),
    # Optimiser (optim.py).
    'optim.name': Rule(one_of('sgd', 'adamw')),
    'optim.lr': Rule(number(0, lo_open=True)),
    'optim.momentum': Rule(number(0, 1)),
    'optim.weight_decay': Rule(number(0)),
    'optim.boundaries': Rule(schedule_positions),
    'optim.decay': Rule(number(0, 1, lo_open=True)),
    'optim.warmup_steps': Rule(schedule_position),
    'optim.grad_clip_norm': Rule(number(0)),
    # Data (datasets/).
    'data.name': Rule(lambda v: None if v in ('builtin_small', 'voc', 'kitti', 'coco', 'custom')
                      or (isinstance(v, str) and v.startswith('tfds:')) else
                      "must be builtin_small, voc, kitti, coco, custom or 'tfds:<name>'"),
    'data.format': Rule(one_of('yolo', 'voc', 'coco'), lambda c: c.data.name == 'custom'),
    'data.root': Rule(string),
    'data.train_split': Rule(string),
    'data.eval_split': Rule(string),
    'data.max_boxes': Rule(integer(1)),
    'data.mean': Rule(numbers(length=3)),
    'data.std': Rule(lambda v: numbers(length=3)(v) or (
        None if all(x > 0 for x in v) else 'values must be > 0')),
    'data.bgr': Rule(boolean),
    'data.augment': Rule(strings(AUGMENT_OPS)),
    'data.pixels_on_device': Rule(boolean),
    'data.resample_on_device': Rule(auto_or_bool),
    'data.source_canvas': Rule(numbers(length=2, integers=True, lo=0)),
    'data.zoom_out_max': Rule(number(1)),
    'data.zoom_out_prob': Rule(number(0, 1)),
    'data.num_workers': Rule(integer(0)),
    'data.prefetch': Rule(integer(0)),
    'data.on_bad_example': Rule(one_of('error', 'skip')),
    'data.shuffle_buffer': Rule(integer(0)),
    'data.kitti_val_fraction': Rule(number(0, 1, lo_open=True)),
    'data.builtin.image_size': Rule(integer(16)),
    'data.builtin.num_train': Rule(integer(1)),
    'data.builtin.num_test': Rule(integer(1)),
    'data.builtin.num_classes': Rule(integer(1, 10)),
    'data.builtin.seed': Rule(integer(0)),
    'data.builtin.min_objects': Rule(integer(0)),
    'data.builtin.max_objects': Rule(integer(0)),
    'data.builtin.min_size': Rule(number(3)),
    'data.builtin.max_size': Rule(number(3)),
    'data.builtin.min_distractors': Rule(integer(0)),
    'data.builtin.max_distractors': Rule(integer(0)),
    'data.photometric.prob': Rule(number(0, 1)),
    'data.photometric.brightness_delta': Rule(number(0, 255)),
    'data.photometric.contrast': Rule(numbers(length=2, lo=0)),
    'data.photometric.saturation': Rule(numbers(length=2, lo=0)),
    'data.photometric.hue_delta': Rule(number(0, 180)),
    'data.crop.min_ious': Rule(numbers(lo=0)),
    'data.crop.max_trials': Rule(integer(1)),
    'data.crop.scale': Rule(numbers(length=2, lo=0)),
    'data.crop.aspect': Rule(numbers(length=2, lo=0)),
    'data.flip_prob': Rule(number(0, 1)),
    'data.resize_method': Rule(one_of(*RESIZE_METHODS)),
    'data.read_threads': Rule(integer(0)),
    'data.tfds_data_dir': Rule(string),
    'data.tfds_kitti_flipped': Rule(auto_or_bool),
    # Evaluation and detection.
    'eval.metric': Rule(one_of(*METRICS)),
    'eval.checkpoint': Rule(string),
    'eval.num_examples': Rule(integer(0)),
    'eval.batch_size': Rule(integer(1)),
    'eval.pr_curves': Rule(boolean),
    'eval.name': Rule(string),
    'detect.input': Rule(string),
    'detect.score_threshold': Rule(number(0, 1)),
    'detect.max_images': Rule(integer(0)),
    'detect.max_frames': Rule(integer(0)),
    'detect.name': Rule(string),
}

# Names the models registry and the neck / head they use.
MODEL_PARTS = {'ssd': ('none', 'ssd'), 'dfssd': ('dfssd', 'ssd'), 'skipfpn': ('skipfpn', 'two_step')}


# ------------------------------------------------------------- the check ---


def leaves(config: ml_collections.ConfigDict, prefix: str = '') -> dict[str, Any]:
  """`{dotted field: value}` for every leaf (dicts of scales count as one value)."""
  out = {}
  for key, value in config.items():
    path = f'{prefix}{key}'
    if isinstance(value, (ml_collections.ConfigDict, dict)) and path not in RULES:
      out.update(leaves(value, path + '.'))
    else:
      out[path] = value
  return out


def field_problems(config: ml_collections.ConfigDict) -> list[str]:
  """Unknown / unused fields, missing fields, and values their rule refuses."""
  values = leaves(config)
  problems = []
  for path, value in values.items():
    rule = RULES.get(path)
    if rule is None or (rule.when is not None and not _applies(rule, config)):
      why = 'unknown' if rule is None else 'not used by this model / prior style'
      problems.append(f'{path}={value!r}: {why} field (a typo, or a setting that would be '
                      'silently ignored)')
      continue
    message = rule.check(value)
    if message:
      problems.append(f'{path}={value!r}: {message}')
  for path, rule in RULES.items():
    if path not in values and _applies(rule, config):
      problems.append(f'{path}: missing from the config')
  return problems


def _applies(rule: Rule, config) -> bool:
  if rule.when is None:
    return True
  try:
    return bool(rule.when(config))
  except (AttributeError, KeyError):
    return False


def _cross_problems(config: ml_collections.ConfigDict, mode: str) -> list[str]:
  problems = []
  m = config.model
  neck, head = MODEL_PARTS[m.name]
  if (m.neck, m.head) != (neck, head):
    problems.append(f'model.name={m.name!r} is built as neck {neck!r} + head {head!r}, but the '
                    f'config says neck {m.neck!r}, head {m.head!r}')
  devices, processes = jax.device_count(), jax.process_count()
  for field, value in (('batch_size', config.batch_size), ('eval.batch_size', config.eval.batch_size)):
    if mode == 'train' or field == 'eval.batch_size':
      if value % devices:
        problems.append(f'{field}={value} is not divisible by the {devices} devices of the mesh')
      elif value % processes:
        problems.append(f'{field}={value} is not divisible by the {processes} processes')
  b = config.data.builtin
  if config.data.name == 'builtin_small':
    if b.max_objects > config.data.max_boxes:
      problems.append(f'data.builtin.max_objects={b.max_objects} exceeds data.max_boxes='
                      f'{config.data.max_boxes}')
    if b.min_objects > b.max_objects or b.min_size > b.max_size or (
        b.min_distractors > b.max_distractors):
      problems.append('data.builtin: a min_* above its max_*')
  if config.data.name == 'custom' and not config.data.root:
    problems.append("data.name='custom' reads your own folder: set --config.data.root=DIR")
  elif m.num_classes < 2:
    problems.append(f'model.num_classes={m.num_classes}: must be >= 2 (the background and at '
                    'least one class)')
  if m.input_size != config.anchors.input_size:
    problems.append(f'anchors.input_size={config.anchors.input_size} differs from '
                    f'model.input_size={m.input_size}')
  if config.post.max_detections > config.post.pre_nms_top_k * (m.num_classes - 1):
    problems.append(f'post.max_detections={config.post.max_detections} exceeds what NMS can '
                    'return (pre_nms_top_k x classes)')
  return problems


def _data_problems(config: ml_collections.ConfigDict, mode: str) -> list[str]:
  """The splits a mode reads open, and the first example of the eval split reads."""
  from smallssd_jax.datasets import sources  # pylint: disable=g-import-not-at-top
  problems = []
  splits = {'train': [config.data.train_split, config.data.eval_split],
            'eval': [config.data.eval_split]}.get(mode, [])
  for split in splits:
    try:
      source = sources.get_source(config.data, split)
      if split == config.data.eval_split and len(source):
        source[0]
      if config.model.num_classes != len(source.class_names) + 1:
        problems.append(f'model.num_classes={config.model.num_classes} but {config.data.name} '
                        f'{split!r} has {len(source.class_names)} classes (+ background = '
                        f'{len(source.class_names) + 1})')
    except Exception as e:  # pylint: disable=broad-except
      problems.append(f'data {config.data.name!r} split {split!r}'
                      f'{" (data.root=" + repr(config.data.root) + ")" if config.data.root else ""}'
                      f' cannot be read: {type(e).__name__}: {e}')
  if mode == 'detect':
    if not config.detect.input:
      problems.append('--mode=detect needs --config.detect.input=FOLDER_OR_IMAGE')
    elif not (os.path.exists(config.detect.input) or config.detect.input.startswith('<video')):
      problems.append(f'detect.input {config.detect.input!r} does not exist')
  if mode == 'train' and config.init_from and not os.path.exists(config.init_from):
    problems.append(f'init_from {config.init_from!r} does not exist')
  if mode in ('eval', 'detect') and config.eval.checkpoint and not os.path.exists(
      config.eval.checkpoint):
    problems.append(f'eval.checkpoint {config.eval.checkpoint!r} does not exist')
  return problems


def _model_problems(config: ml_collections.ConfigDict) -> list[str]:
  """The priors match the model's feature maps (shapes only, nothing computed)."""
  from smallssd_jax import task as task_lib  # pylint: disable=g-import-not-at-top
  try:
    task_lib.build_task(config)
  except Exception as e:  # pylint: disable=broad-except
    return [f'the model and priors do not fit together: {type(e).__name__}: {e}']
  return []


def validate(config: ml_collections.ConfigDict, mode: str = 'train', workdir: str = '') -> None:
  """Raises errors.ConfigError listing every problem found; returns None when all is well."""
  del workdir
  if mode not in ('train', 'eval', 'detect'):
    raise errors.ConfigError(f'--mode={mode!r}: train, eval or detect')
  problems = field_problems(config)
  if not problems:
    problems = _cross_problems(config, mode)
  if not problems:
    problems = _model_problems(config) + _data_problems(config, mode)
  if problems:
    raise errors.ConfigError('invalid config:\n  ' + '\n  '.join(problems))


def check_resume(config: ml_collections.ConfigDict, workdir: str) -> None:
  """A workdir with a recorded config resumes only with the same global batch and model."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path) or not os.path.isdir(os.path.join(workdir, 'checkpoints')):
    return
  try:
    old = json.loads(open(path).read())
  except (OSError, ValueError):
    return
  new = json.loads(json.dumps(config.to_dict(), default=str))
  problems = []
  if old.get('batch_size') != new['batch_size']:
    problems.append(f'batch_size {new["batch_size"]} (the run was trained with '
                    f'{old.get("batch_size")}: the global batches and the schedule would change)')
  for block in ('model', 'anchors'):
    if old.get(block) != new[block]:
      changed = sorted(k for k in set(old.get(block, {})) | set(new[block])
                       if old.get(block, {}).get(k) != new[block].get(k))
      problems.append(f'{block}.{{{", ".join(changed)}}} differ from the run\'s')
  if problems:
    raise errors.ConfigError(
        f'{workdir} holds a run with another setting: ' + '; '.join(problems)
        + '. Resume with its config, or train in another --workdir')
