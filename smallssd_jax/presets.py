"""Model, prior and loss presets for the paper settings (docs/design.md §3-5).

Config files in `configs/` compose these; every value here can be overridden
from the command line (`--config.model.width=0.25`). Feature-map sizes are
computed from the input size with the backbone's own arithmetic, so a
reduced-resolution variant gets consistent priors without editing lists.
"""

from __future__ import annotations

import ml_collections

from smallssd_jax import config_lib

ConfigDict = ml_collections.ConfigDict

# The papers' small-object VOC classes (DF-SSD tables; docs/design.md §6).
VOC_SMALL_OBJECT_CLASSES = ('boat', 'bottle', 'chair', 'pottedplant', 'tvmonitor', 'bird')


def _half_floor(s: int) -> int:
  return s // 2


def _half_ceil(s: int) -> int:
  return -(-s // 2)


def vgg_ssd_feature_sizes(input_size: int) -> dict[str, int]:
  """Spatial sizes of the SSD VGG16 reduced-fc sources and extra layers.

  pool1, pool2 floor; pool3 ceil (300 -> 38); pool4 floor; pool5 3x3/1 keeps
  size. Extra layers: 300-style (two stride-2 stages, then two valid 3x3),
  512-style (four stride-2 stages, then a 4x4 pad-1 conv).
  """
  s = _half_floor(_half_floor(input_size))
  conv4_3 = _half_ceil(s)
  fc7 = _half_floor(conv4_3)
  sizes = {'conv4_3': conv4_3, 'fc7': fc7}
  if input_size < 512:
    c8 = _half_ceil(fc7)
    c9 = _half_ceil(c8)
    sizes.update(conv8_2=c8, conv9_2=c9, conv10_2=c9 - 2, conv11_2=c9 - 4)
  else:
    c8 = _half_ceil(fc7)
    c9 = _half_ceil(c8)
    c10 = _half_ceil(c9)
    c11 = _half_ceil(c10)
    sizes.update(conv8_2=c8, conv9_2=c9, conv10_2=c10, conv11_2=c11, conv12_2=c11 - 1)
  return sizes


def vgg_refinedet_feature_sizes(input_size: int) -> dict[str, int]:
  """Sizes of the RefineDet VGG16 sources: strides 8, 16, 32, 64."""
  s = _half_floor(_half_floor(input_size))
  conv4_3 = _half_ceil(s)
  conv5_3 = _half_floor(conv4_3)
  fc7 = _half_floor(conv5_3)
  conv6_2 = _half_ceil(fc7)
  return {'conv4_3': conv4_3, 'conv5_3': conv5_3, 'fc7': fc7, 'conv6_2': conv6_2}


def ssd_model(input_size: int = 300, num_classes: int = 21) -> ConfigDict:
  """Baseline SSD300 / SSD512 (docs/design.md §3)."""
  size_512 = input_size >= 512
  fm = vgg_ssd_feature_sizes(input_size)
  sources = ['conv4_3', 'fc7', 'conv8_2', 'conv9_2', 'conv10_2', 'conv11_2']
  if size_512:
    sources.append('conv12_2')
  if size_512:
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
  return ConfigDict(dict(model=model, anchors=anchors, loss=ssd_loss()))


def dfssd_model(input_size: int = 300, num_classes: int = 21) -> ConfigDict:
  """DF-SSD300 / DF-SSD512 (docs/design.md §4)."""
  size_512 = input_size >= 512
  fm = vgg_ssd_feature_sizes(input_size)
  if size_512:
    sources = ['fused', 'fc7', 'conv8_2', 'conv9_2', 'conv10_2', 'conv11_2']
    deepest = 'conv12_2'
    deconv = dict(stride=8, kernel=8, padding=0)
  else:
    sources = ['fused', 'fc7', 'conv8_2', 'conv9_2', 'conv10_2']
    deepest = 'conv11_2'
    # The paper's kernel is 4 (padding 1): it leaves 3/4 of deconv4_3 at its
    # bias. Kernel = stride covers every pixel (models/dfssd.py).
    deconv = dict(stride=8, kernel=8, padding=0)
  model = ssd_model(input_size, num_classes).model
  model.update(dict(
      name='dfssd',
      neck='dfssd',
      sources=sources,
      batch_norm=True,                # BN after each fusion projection (docs/design.md §4: 1x1 conv + BN)
      dfssd=ConfigDict(dict(
          deconv_channels=256,
          deconv_stride=deconv['stride'],
          deconv_kernel=deconv['kernel'],
          deconv_padding=deconv['padding'],
          pool='avg',                 # 'avg' | 'max'
          deepest=deepest,
          fusion_channels=256,
          fusion_weights=[0.3, 0.2, 0.15, 0.15, 0.2],
          fusion_sources=['nconv4_3', 'fc7', 'conv8_2', 'conv9_2', 'conv10_2'],
          fusion='fixed',             # 'fixed' | 'learned'
          fuse_levels='first',        # 'first' | 'all'
          source_norm='l2',           # 'l2' (each half of nconv4_3 normalised) | 'none' (paper)
          source_norm_scale=10.0,
          context_init=0.25,          # context sources' initial scale; 1.0: the paper's
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
  return ConfigDict(dict(model=model, anchors=anchors, loss=ssd_loss()))


def skipfpn_model(input_size: int = 320, num_classes: int = 21) -> ConfigDict:
  """SkipFPN-GRF320 / 512 with the two-step head (docs/design.md §5)."""
  fm = vgg_refinedet_feature_sizes(input_size)
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
          skip_depth=2,               # D: 2 as drawn in the paper, 3 connects all
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
  loss = ssd_loss()
  loss.arm_filter_threshold = 0.99
  loss.negative_anchor_filter = True
  return ConfigDict(dict(model=model, anchors=anchors, loss=loss))


def ssd_loss() -> ConfigDict:
  return ConfigDict(dict(
      iou_threshold=0.5,
      neg_pos_ratio=3,
      variances=[0.1, 0.1, 0.2, 0.2],
      loc_weight=1.0,
  ))


def postprocess() -> ConfigDict:
  return ConfigDict(dict(
      score_threshold=0.01,
      nms_iou=0.45,
      pre_nms_top_k=400,
      max_detections=200,
      arm_filter_threshold=0.99,     # two-step heads: step-one background prob above it -> no detection
  ))


MODELS = {
    'ssd': ssd_model,
    'dfssd': dfssd_model,
    'skipfpn': skipfpn_model,
}


def anchor_count(anchors: ConfigDict) -> int:
  """Number of priors a prior config makes, without building them."""
  if anchors.style == 'ssd':
    per = [2 + 2 * len(r) for r in anchors.aspect_ratios]
  elif anchors.style == 'dfssd':
    # ratio-1 prior at sqrt(s_k s_k+1) plus one per aspect ratio; the first map
    # adds the half-scale small priors (docs/design.md §4).
    per = [len(anchors.aspect_ratios) + 1] * len(anchors.feature_maps)
    if anchors.get('small_first_level', True):
      per[0] += len(anchors.small_ratios)
  elif anchors.style == 'refinedet':
    per = [len(anchors.aspect_ratios)] * len(anchors.feature_maps)
  else:
    raise ValueError(f'unknown anchors.style {anchors.style!r}')
  return sum(p * f * f for p, f in zip(per, anchors.feature_maps))


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


def sgd(lr: float = 1e-3, boundaries=(80_000, 100_000), decay: float = 0.1,
        warmup_steps: int = 0) -> ConfigDict:
  """The papers' optimiser: SGD momentum 0.9, weight decay 5e-4, piecewise lr."""
  return ConfigDict(dict(
      name='sgd',
      lr=lr,
      momentum=0.9,
      weight_decay=5e-4,
      boundaries=list(boundaries),
      decay=decay,
      warmup_steps=warmup_steps,
      grad_clip_norm=0.0,            # 0 = off
  ))


def base_config(preset: ConfigDict) -> ConfigDict:
  """Everything a run needs, around a model preset (model, anchors, loss)."""
  cfg = ConfigDict()
  cfg.model = preset.model
  cfg.anchors = preset.anchors
  cfg.loss = preset.loss
  cfg.post = postprocess()
  cfg.data = data()
  cfg.optim = sgd()
  cfg.seed = 0
  cfg.batch_size = 32
  cfg.num_train_steps = 120_000
  cfg.log_every_steps = 100
  cfg.eval_every_steps = 10_000
  cfg.checkpoint_every_steps = 5_000
  cfg.keep_checkpoints = 3
  cfg.init_from = ''                # checkpoint dir, or a VGG16 / SSD300 weight file
  cfg.eval = ConfigDict(dict(
      metric='voc07',
      checkpoint='',
      num_examples=0,               # 0 = the whole split
      batch_size=32,
      pr_curves=True,
  ))
  cfg.detect = ConfigDict(dict(
      input='',
      score_threshold=0.3,
      max_images=16,
  ))
  return cfg


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


def runlocal(config: ConfigDict, width: float = 0.125, steps: int = 20) -> ConfigDict:
  """Shrinks any paper config to something a laptop CPU runs in a minute or two.

  The model keeps its structure and input size (so priors and shapes are the
  paper's); width, batch, steps and eval size shrink, and the data becomes the
  built-in dataset unless a `root` was given.
  """
  config.model.width = width
  config.batch_size = 4
  config.num_train_steps = steps
  config.log_every_steps = 5
  config.eval_every_steps = 0
  config.checkpoint_every_steps = steps
  config.optim.boundaries = [steps * 2 // 3, steps * 5 // 6]
  config.optim.warmup_steps = 0
  config.eval.num_examples = 16
  config.eval.batch_size = 8
  config.detect.max_images = 2
  if not config.data.root and config.data.name != 'builtin_small':
    config.data = data(max_boxes=config.data.max_boxes)
    config.model.num_classes = config.data.builtin.num_classes + 1
    config.data.builtin.image_size = config.model.input_size
    config.data.builtin.num_test = 16
    config.eval.metric = 'voc07'
  return config


def paper_config(preset: ConfigDict, data_cfg: ConfigDict, *, metric: str, batch_size: int,
                 steps: int, boundaries, warmup_steps: int = 1000) -> ConfigDict:
  """A paper setting: the model preset, its data, and the SGD recipe (docs/design.md §3, §5)."""
  config = base_config(preset)
  config.data = data_cfg
  config.batch_size = batch_size
  config.num_train_steps = steps
  config.optim = sgd(lr=1e-3, boundaries=boundaries, warmup_steps=warmup_steps)
  config.eval.metric = metric
  if metric == 'coco':
    config.post.max_detections = 100   # the COCO protocol scores at most 100 per image
  return config
