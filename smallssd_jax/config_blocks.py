"""Blocks the config files in `configs/` are written from (docs/design.md §3-5, §9).

A config file reads as its experiment: it names its model block, its data,
schedule and evaluation, with the numbers that differ between papers written
out in the file. What is the same everywhere is defined once here, so every
field has exactly one default (library code never falls back to a default
of its own; `config_check` refuses a config with a field missing).

`MODELS` is the one registry of detectors: configs, `summary` and the tools
look models up here.
"""

from __future__ import annotations

import importlib.util
import pathlib
from collections.abc import Callable

import ml_collections

from smallssd_jax import config_lib
from smallssd_jax.models import vgg

ConfigDict = ml_collections.ConfigDict


# ---------------------------------------------------------------- models ---


def ssd_model(input_size: int = 300, num_classes: int = 21) -> ConfigDict:
  """SSD300 / SSD512: `model`, `anchors` and `loss` (docs/design.md §3)."""
  size_512 = input_size >= 512
  fm = vgg.ssd_feature_sizes(input_size)
  sources = ['conv4_3', 'fc7', 'conv8_2', 'conv9_2', 'conv10_2', 'conv11_2']
  if size_512:
    sources.append('conv12_2')
    min_sizes = [35.84, 76.8, 153.6, 230.4, 307.2, 384.0, 460.8]
    max_sizes = [76.8, 153.6, 230.4, 307.2, 384.0, 460.8, 537.6]
    steps = [8, 16, 32, 64, 128, 256, 512]
    ratios = [[2], [2, 3], [2, 3], [2, 3], [2, 3], [2], [2]]
  else:
    min_sizes = [30, 60, 111, 162, 213, 264]
    max_sizes = [60, 111, 162, 213, 264, 315]
    steps = [8, 16, 32, 64, 100, 300]
    ratios = [[2], [2, 3], [2, 3], [2, 3], [2], [2]]
  scale = input_size / (512 if size_512 else 300)
  model = ConfigDict(dict(
      name='ssd',
      backbone='vgg16_ssd',
      extras='ssd512' if size_512 else 'ssd300',
      neck='none',
      head='ssd',
      sources=sources,
      input_size=input_size,
      num_classes=num_classes,
      width=1.0,
      dtype='float32',
      l2norm_scales={'conv4_3': 20.0},
      # BatchNorm in the neck's layers.
      batch_norm=False,
      # BatchNorm in the VGG16 backbone and extra layers: for training from
      # scratch (ScratchDet); the pretrained VGG16 weights have none.
      backbone_batch_norm=False,
      # Head conv init: 'xavier' (ssd.pytorch / torchvision) or 'small' (normal 0.01).
      head_init='xavier',
  ))
  anchors = ConfigDict(dict(
      style='ssd',
      input_size=input_size,
      feature_maps=[fm[s] for s in sources],
      steps=[st * scale for st in steps],
      min_sizes=[m * scale for m in min_sizes],
      max_sizes=[m * scale for m in max_sizes],
      aspect_ratios=ratios,
      clip=False,
  ))
  return ConfigDict(dict(model=model, anchors=anchors, loss=multibox_loss()))


def dfssd_model(input_size: int = 300, num_classes: int = 21) -> ConfigDict:
  """DF-SSD300 / DF-SSD512: `model`, `anchors` and `loss` (docs/design.md §4)."""
  size_512 = input_size >= 512
  fm = vgg.ssd_feature_sizes(input_size)
  if size_512:
    sources = ['fused', 'fc7', 'conv8_2', 'conv9_2', 'conv10_2', 'conv11_2']
    deepest = 'conv12_2'
  else:
    sources = ['fused', 'fc7', 'conv8_2', 'conv9_2', 'conv10_2']
    deepest = 'conv11_2'
  model = ssd_model(input_size, num_classes).model
  model.update(dict(
      name='dfssd',
      neck='dfssd',
      sources=sources,
      batch_norm=True,                # BN after each fusion projection (1x1 conv + BN)
      dfssd=ConfigDict(dict(
          deconv_channels=256,
          deconv_stride=8,
          # The paper's 300 kernel is 4 (padding 1), which leaves 3/4 of
          # deconv4_3 at its bias; kernel = stride covers every pixel.
          deconv_kernel=8,
          deconv_padding=0,
          pool='avg',                 # 'avg' | 'max'
          deepest=deepest,
          fusion_channels=256,
          fusion_weights=[0.3, 0.2, 0.15, 0.15, 0.2],
          fusion_sources=['nconv4_3', 'fc7', 'conv8_2', 'conv9_2', 'conv10_2'],
          fusion='fixed',             # 'fixed' | 'learned'
          fuse_levels='first',        # 'first' | 'all'
          source_norm='l2',           # 'l2' (each half of nconv4_3 normalised) | 'none' (paper)
          source_norm_scale=10.0,
          context_init=0.25,          # the context sources' initial scale; 1.0: the paper's
      )),
  ))
  anchors = ConfigDict(dict(
      style='dfssd',
      input_size=input_size,
      feature_maps=[fm['conv4_3']] + [fm[s] for s in sources[1:]],
      s_min=0.1,
      s_max=0.9,
      aspect_ratios=[1.0, 2.0, 0.5, 3.0, 1.0 / 3.0],
      small_first_level=True,       # the 9-prior first map (our reading)
      small_ratios=[1.0, 2.0, 0.5],
      clip=False,
  ))
  return ConfigDict(dict(model=model, anchors=anchors, loss=multibox_loss()))


def skipfpn_model(input_size: int = 320, num_classes: int = 21) -> ConfigDict:
  """SkipFPN-GRF320 / 512 with the two-step head: `model`, `anchors`, `loss` (docs/design.md §5)."""
  fm = vgg.refinedet_feature_sizes(input_size)
  sources = ['conv4_3', 'conv5_3', 'fc7', 'conv6_2']
  model = ConfigDict(dict(
      name='skipfpn',
      backbone='vgg16_refinedet',
      extras='refinedet',
      neck='skipfpn',
      head='two_step',
      sources=sources,
      input_size=input_size,
      num_classes=num_classes,
      width=1.0,
      dtype='float32',
      l2norm_scales={'conv4_3': 10.0, 'conv5_3': 8.0},
      batch_norm=True,
      backbone_batch_norm=False,
      head_init='xavier',
      skipfpn=ConfigDict(dict(
          channels=256,
          skip_depth=2,               # D: 2 as drawn in the paper, 3 connects all, 0 none
          grf_levels=[0, 1, 2, 3],    # where the global receptive field module sits
          grf_reduction=4,            # 1x1 reduction factor inside the GRF module
      )),
  ))
  anchors = ConfigDict(dict(
      style='refinedet',
      input_size=input_size,
      feature_maps=[fm[s] for s in sources],
      steps=[input_size / fm[s] for s in sources],
      size_factor=4.0,
      aspect_ratios=[0.5, 1.0, 2.0],
      clip=False,
  ))
  loss = multibox_loss()
  loss.arm_filter_threshold = 0.99
  loss.negative_anchor_filter = True
  # Weight of step two's (ODM's) classification loss; 1 in RefineDet. The built-in
  # recipe raises it (configs/default.py, docs/design.md §9).
  loss.odm_cls_weight = 1.0
  return ConfigDict(dict(model=model, anchors=anchors, loss=loss))


MODELS: dict[str, Callable[..., ConfigDict]] = {
    'ssd': ssd_model,
    'dfssd': dfssd_model,
    'skipfpn': skipfpn_model,
}

# Each model's native input size at the papers' smaller setting.
DEFAULT_INPUT_SIZE = {'ssd': 300, 'dfssd': 300, 'skipfpn': 320}


def model(name: str, input_size: int | None = None, num_classes: int = 21) -> ConfigDict:
  """`model`, `anchors`, `loss` of the registered detector `name`."""
  if name not in MODELS:
    raise ValueError(f'unknown model {name!r}; known: {sorted(MODELS)}')
  return MODELS[name](input_size or DEFAULT_INPUT_SIZE[name], num_classes=num_classes)


def multibox_loss() -> ConfigDict:
  return ConfigDict(dict(
      iou_threshold=0.5,
      neg_pos_ratio=3,
      variances=[0.1, 0.1, 0.2, 0.2],
      loc_weight=1.0,
  ))


def postprocess(max_detections: int = 200) -> ConfigDict:
  return ConfigDict(dict(
      score_threshold=0.01,
      nms_iou=0.45,
      pre_nms_top_k=400,
      max_detections=max_detections,
      arm_filter_threshold=0.99,     # two-step heads: step-one background prob above it -> no detection
  ))


# ------------------------------------------------------------------ data ---


def data(name: str = 'builtin_small', **overrides) -> ConfigDict:
  """Dataset settings; `name` is 'builtin_small', 'voc', 'kitti', 'coco' or 'tfds:<name>'."""
  cfg = ConfigDict(dict(
      name=name,
      root='',                       # native folder (VOCdevkit, KITTI, COCO); '' = tfds / built-in
      train_split='train',
      eval_split='test',
      max_boxes=64,
      # torchvision-style RGB normalisation (docs/design.md §2); caffe weights want
      # bgr=True, mean=(104, 117, 123), std=(1, 1, 1).
      mean=[123.0, 117.0, 104.0],
      std=[1.0, 1.0, 1.0],
      bgr=False,
      augment=['photometric', 'zoom_out', 'min_iou_crop', 'flip'],
      # Photometric distortion + normalisation in the jitted step on uint8
      # batches (pixels.py); False: on the host, float32 batches.
      pixels_on_device=True,
      # The train resample in the step as well (pixels.py): batches carry the
      # decoded source in a fixed canvas, [0, 0] = the dataset's largest image.
      # 'auto': on GPU / TPU (on a CPU, PIL's resample on the host is cheaper).
      resample_on_device='auto',
      source_canvas=[0, 0],
      zoom_out_max=4.0,
      num_workers=0,
      prefetch=2,
      on_bad_example='error',        # 'error' | 'skip'
      shuffle_buffer=0,              # 0: global shuffle of the index space
      kitti_val_fraction=0.2,
      builtin=ConfigDict(dict(
          image_size=300,
          num_train=8192,
          num_test=256,
          num_classes=6,
          seed=0,
          min_objects=4,             # objects per image, uniform in [min, max]
          max_objects=32,            # must stay <= max_boxes
          min_size=6.0,              # object size sqrt(box area) in pixels at image_size,
          max_size=64.0,             # log-uniform in [min_size, max_size]
          min_distractors=0,         # unlabelled shapes of the other classes per image,
          max_distractors=0,         # uniform in [min, max]; 0: none
      )),
      # Caffe SSD augmentation parameters (docs/design.md §3; datasets/augment.py).
      photometric=ConfigDict(dict(
          prob=0.5,                  # of each of brightness, contrast, hue, saturation
          brightness_delta=32.0,
          contrast=[0.5, 1.5],
          saturation=[0.5, 1.5],
          hue_delta=18.0,            # OpenCV 8-bit hue units (2 degrees each), as in Caffe
      )),
      zoom_out_prob=0.5,
      crop=ConfigDict(dict(
          min_ious=[0.1, 0.3, 0.5, 0.7, 0.9],  # plus the whole image and one unconstrained
          max_trials=50,
          scale=[0.3, 1.0],
          aspect=[0.5, 2.0],
      )),
      flip_prob=0.5,
      # train: 'bilinear' (PIL, antialiased) | 'nearest' (fast) | 'opencv' (Caffe's
      # INTER_LINEAR, 2x faster than 'bilinear'; the opencv extra) | 'random' (Caffe's draw)
      resize_method='bilinear',
      read_threads=2,                # threads per process running decode + augment
      tfds_data_dir='',              # '' = tfds default
      tfds_kitti_flipped='auto',     # 'auto' (by builder version) | True | False
  ))
  cfg.update(overrides)
  return cfg


def custom_data(fmt: str = 'yolo', **overrides) -> ConfigDict:
  """Your own data in `data.root`: YOLO, VOC-style or COCO-json folders (datasets/sources.py).

  The classes are the dataset's: `finalize` sets `model.num_classes` from them
  when it is 0.
  """
  cfg = data('custom', train_split='train', eval_split='val', max_boxes=128, **overrides)
  with cfg.unlocked():
    cfg.format = fmt               # 'yolo' | 'voc' | 'coco'
  return cfg


def voc0712_data(**overrides) -> ConfigDict:
  """VOC07+12 trainval -> VOC07 test (tfds without `root`, a VOCdevkit folder with it)."""
  return data('voc', train_split='VOC2007/trainval+VOC2012/trainval',
              eval_split='VOC2007/test', max_boxes=64, **overrides)


def kitti_data(**overrides) -> ConfigDict:
  """KITTI 2D object, 3 grouped classes (docs/design.md §4), DontCare ignored."""
  return data('kitti', train_split='train', eval_split='val', max_boxes=128, **overrides)


def coco_data(**overrides) -> ConfigDict:
  """COCO 2017 from its json + images folder (`root`), crowd boxes ignored."""
  return data('coco', train_split='train2017', eval_split='val2017', max_boxes=128, **overrides)


# ------------------------------------------------- schedule and evaluation ---


def sgd(lr: float = 1e-3, boundaries=(80_000, 100_000), decay: float = 0.1,
        warmup_steps: int | float = 0, grad_clip_norm: float = 0.0) -> ConfigDict:
  """The papers' optimiser: SGD momentum 0.9, weight decay 5e-4, piecewise lr.

  `boundaries` and `warmup_steps` are steps, or fractions of num_train_steps
  (floats below 1), which follow a changed run length (optim.py).
  """
  return ConfigDict(dict(
      name='sgd',
      lr=lr,
      momentum=0.9,
      weight_decay=5e-4,
      boundaries=list(boundaries),
      decay=decay,
      warmup_steps=warmup_steps,
      grad_clip_norm=grad_clip_norm,   # 0 = off
  ))


def evaluation(metric: str, batch_size: int = 32) -> ConfigDict:
  return ConfigDict(dict(
      metric=metric,                # 'voc07' | 'voc' | 'coco' | 'kitti'
      checkpoint='',                # --mode=eval / detect: this run or step folder, '' = latest
      num_examples=0,               # 0 = the whole split
      batch_size=batch_size,
      pr_curves=True,
      name='',                      # --mode=eval writes eval/<name>/ ('' = the start time)
  ))


def detection(score_threshold: float = 0.3, max_images: int = 16) -> ConfigDict:
  return ConfigDict(dict(
      input='',                     # --mode=detect: a folder of images, one image, a video
                                    # file (.mp4 ...) or a camera ('<video0>')
      score_threshold=score_threshold,
      max_images=max_images,        # after training: pictures of this many test images
      max_frames=0,                 # video / camera: stop after this many frames (0: all)
      name='',                      # --mode=detect writes detect/<name>/ ('' = the start time)
  ))


def base_config(model_blocks: ConfigDict) -> ConfigDict:
  """Every field a run needs around `model_blocks` (model, anchors, loss), at the papers'
  VOC defaults; for tests and tools that build a config in code."""
  return paper_config(model_blocks, data(), metric='voc07', batch_size=32, steps=120_000,
                      boundaries=(80_000, 100_000), warmup_steps=0)


def paper_config(blocks: ConfigDict, data_cfg: ConfigDict, *, metric: str, batch_size: int,
                 steps: int, boundaries, warmup_steps: int = 1000, eval_every: int = 10_000,
                 runlocal: bool = False) -> ConfigDict:
  """A paper setting: model blocks, data, the papers' SGD schedule, evaluation (docs/design.md §3, §5)."""
  config = ConfigDict()
  config.update(blocks)
  config.post = postprocess(max_detections=100 if metric == 'coco' else 200)
  config.data = data_cfg
  config.optim = sgd(lr=1e-3, boundaries=boundaries, warmup_steps=warmup_steps)
  config.seed = 0
  config.batch_size = batch_size
  config.num_train_steps = steps
  config.log_every_steps = 100
  config.eval_every_steps = eval_every
  config.checkpoint_every_steps = 5_000
  config.keep_checkpoints = 3
  config.init_from = ''           # a run's workdir / step folder, or a VGG16 / SSD300 weight file
  config.eval = evaluation(metric)
  config.detect = detection()
  config.runlocal = runlocal
  return shrink_for_runlocal(config) if runlocal else config


# -------------------------------------------------------------- runlocal ---


def shrink_for_runlocal(config: ConfigDict, width: float = 0.125, steps: int = 20) -> ConfigDict:
  """Shrinks any paper config to something a laptop CPU runs in a minute or two.

  The model keeps its structure and input size (so priors and shapes are the
  paper's); width, batch, steps and eval size shrink. The data become the
  built-in dataset in `finalize`, after the command line, unless
  `data.root` is set there.
  """
  config.model.width = width
  config.batch_size = 4
  config.num_train_steps = steps
  config.log_every_steps = 5
  config.eval_every_steps = 0
  config.checkpoint_every_steps = steps
  config.optim.boundaries = [2 / 3, 5 / 6]      # fractions: follow --config.num_train_steps
  config.optim.warmup_steps = 0
  config.eval.num_examples = 16
  config.eval.batch_size = 8
  config.detect.max_images = 2
  return config


def finalize(config: ConfigDict) -> ConfigDict:
  """What depends on fields the command line may have set; run after it (main.py, load_config).

  With `runlocal` and no `data.root`, a paper config trains on the built-in
  dataset (at the model's input size, VOC07 metric, classes from the data);
  with a `data.root` it keeps its own dataset there. Your own data
  (`data.name='custom'`) sets `model.num_classes` from its classes when it is 0.
  """
  if config.data.name == 'custom' and config.model.num_classes == 0 and config.data.root:
    from smallssd_jax.datasets import sources  # pylint: disable=g-import-not-at-top
    with config.unlocked():
      config.model.num_classes = len(sources.class_names(config.data)) + 1
  if config.runlocal and not config.data.root and config.data.name != 'builtin_small':
    with config.unlocked():
      max_boxes = config.data.max_boxes
      config.data = data(max_boxes=max_boxes)
      config.data.builtin.image_size = config.model.input_size
      config.data.builtin.num_test = 16
      config.model.num_classes = config.data.builtin.num_classes + 1
      config.eval.metric = 'voc07'
  return config


def parse_arg(arg: str | None, **defaults):
  """`'dfssd,tiny'` or `'model=ssd,tiny=True'` -> ConfigDict over `defaults` (big_vision style).

  A bare word sets a boolean default to True, or else the first string
  default ('model' here) to that word.
  """
  out = ConfigDict(dict(defaults))
  for part in filter(None, (arg or '').split(',')):
    key, eq, value = part.partition('=')
    key = key.strip()
    if not eq:
      if key in defaults and isinstance(defaults[key], bool):
        out[key] = True
        continue
      first_str = next((k for k, v in defaults.items() if isinstance(v, str)), None)
      if first_str is None:
        raise ValueError(f'config arg {part!r}: no such switch; known: {sorted(defaults)}')
      out[first_str] = key
      continue
    if key not in defaults:
      raise ValueError(f'config arg {key!r} unknown; known: {sorted(defaults)}')
    kind = type(defaults[key])
    if kind is bool:
      try:
        flag = config_lib.auto_bool(value, f'config arg {key}')
      except ValueError:
        flag = 'auto'
      if flag == 'auto':
        raise ValueError(f'config arg {key} must be True or False, got {value!r}')
      out[key] = flag
    else:
      out[key] = kind(value)
  return out


# --------------------------------------------------------------- loading ---


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads `path/to/config.py[:arg]` as main.py does (without command-line overrides)."""
  path, _, arg = spec.partition(':')
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'config file not found: {path}')
  module_spec = importlib.util.spec_from_file_location(f'_config_{path.stem}', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg) if arg else module.get_config()
  return finalize(config)
