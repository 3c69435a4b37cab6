"""Weight import: torchvision vgg16, SSD's reduced-fc VGG16, torchvision ssd300_vgg16.

Fixtures are random state dicts in the sources' key layouts, at width 1/16,
written to `.npz` (no torch needed). The SSD300 conversion is checked end to
end against a NumPy re-implementation of torchvision's SSD300 forward pass
(NCHW, PyTorch padding and ceil-mode pooling, the head's permute / reshape),
written here from torchvision's source. When torch and torchvision are
installed, the last test compares against torchvision itself.
"""

import math
import sys

import jax
import jax.numpy as jnp

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from smallssd_jax import models
from smallssd_jax import config_blocks
from smallssd_jax import weights
from smallssd_jax.models import layers

TINY = 1 / 16
FAST_COMPILE = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}

VGG = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256),
       (256, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)]
VGG_INDEX = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
EXTRAS = [(1024, 256, 1), (256, 512, 3), (512, 128, 1), (128, 256, 3),
          (256, 128, 1), (128, 256, 3), (256, 128, 1), (128, 256, 3)]
HEAD_CHANNELS = [512, 1024, 512, 256, 256, 256]
HEAD_ANCHORS = [4, 6, 6, 6, 4, 4]


def _conv_shapes(key, cout, cin, k):
  return {f'{key}.weight': (cout, cin, k, k), f'{key}.bias': (cout,)}


def torchvision_ssd300_shapes(width, num_classes):
  """Key -> shape of torchvision's ssd300_vgg16 state dict (from its source), width-scaled."""
  c = lambda n: layers.scaled_channels(n, width)
  shapes = {}
  for (cin, cout), index in zip(VGG, VGG_INDEX):
    key = f'backbone.features.{index}' if index < 23 else f'backbone.extra.0.{index - 23}'
    shapes.update(_conv_shapes(key, c(cout), 3 if cin == 3 else c(cin), 3))
  shapes.update(_conv_shapes('backbone.extra.0.7.1', c(1024), c(512), 3))
  shapes.update(_conv_shapes('backbone.extra.0.7.3', c(1024), c(1024), 1))
  shapes['backbone.scale_weight'] = (c(512),)
  for i, (cin, cout, k) in enumerate(EXTRAS):
    shapes.update(_conv_shapes(f'backbone.extra.{i // 2 + 1}.{2 * (i % 2)}', c(cout), c(cin), k))
  for level, (ch, a) in enumerate(zip(HEAD_CHANNELS, HEAD_ANCHORS)):
    shapes.update(_conv_shapes(f'head.classification_head.module_list.{level}',
                               a * num_classes, c(ch), 3))
    shapes.update(_conv_shapes(f'head.regression_head.module_list.{level}', a * 4, c(ch), 3))
  return shapes


def random_state(shapes, seed=0):
  rs = np.random.RandomState(seed)
  state = {}
  for key, shape in shapes.items():
    if key.endswith('scale_weight'):
      state[key] = (20.0 + rs.randn(*shape)).astype(np.float32)
    elif key.endswith('weight'):
      fan_in = math.prod(shape[1:])
      state[key] = (rs.randn(*shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
    else:
      state[key] = (0.1 * rs.randn(*shape)).astype(np.float32)
  return state


def save_npz(tmp_path, state, name='weights.npz'):
  path = tmp_path / name
  np.savez(path, **state)
  return path


def tiny_model(preset, num_classes=21):
  preset.model.width = TINY
  preset.model.num_classes = num_classes
  from smallssd_jax import anchors  # pylint: disable=g-import-not-at-top
  return models.build_detector(preset.model, anchors.anchors_per_location(preset.anchors))


# ---------------------------------------- NumPy torchvision SSD300 forward ---


def np_conv(x, w, b, stride=1, padding=0, dilation=1):
  """torch.nn.functional.conv2d on one CHW image."""
  x = np.pad(x, ((0, 0), (padding, padding), (padding, padding)))
  k = w.shape[-1]
  span = dilation * (k - 1) + 1
  win = sliding_window_view(x, (span, span), axis=(1, 2))
  win = win[:, ::stride, ::stride, ::dilation, ::dilation]
  return np.einsum('chwij,ocij->ohw', win, w, optimize=True) + b[:, None, None]


def np_max_pool(x, k, s, p=0, ceil=False):
  size = x.shape[1]
  out = (math.ceil if ceil else math.floor)((size + 2 * p - k) / s) + 1
  if ceil and (out - 1) * s >= size + p:
    out -= 1
  x = np.pad(x, ((0, 0), (p, p + k), (p, p + k)), constant_values=-np.inf)
  win = sliding_window_view(x, (k, k), axis=(1, 2))[:, ::s, ::s]
  return win[:, :out, :out].max(axis=(3, 4))


def torchvision_ssd300_forward(state, image_chw, num_classes):
  """torchvision SSDFeatureExtractorVGG + SSDHead, per its source, on one image."""
  relu = lambda v: np.maximum(v, 0)
  conv = lambda x, key, **kw: np_conv(x, state[f'{key}.weight'], state[f'{key}.bias'], **kw)
  x = image_chw
  for index in VGG_INDEX[:10]:
    x = relu(conv(x, f'backbone.features.{index}', padding=1))
    if index in (2, 7):
      x = np_max_pool(x, 2, 2)
    if index == 14:
      x = np_max_pool(x, 2, 2, ceil=True)   # torchvision patches maxpool3 to ceil mode
  norm = np.maximum(np.sqrt((x ** 2).sum(axis=0, keepdims=True)), 1e-12)
  sources = [state['backbone.scale_weight'][:, None, None] * x / norm]
  x = np_max_pool(x, 2, 2)
  for i in (1, 3, 5):
    x = relu(conv(x, f'backbone.extra.0.{i}', padding=1))
  x = np_max_pool(x, 3, 1, 1)
  x = relu(conv(x, 'backbone.extra.0.7.1', padding=6, dilation=6))
  x = relu(conv(x, 'backbone.extra.0.7.3'))
  sources.append(x)
  for block in (1, 2, 3, 4):
    x = relu(conv(x, f'backbone.extra.{block}.0'))
    if block <= 2:
      x = relu(conv(x, f'backbone.extra.{block}.2', stride=2, padding=1))
    else:
      x = relu(conv(x, f'backbone.extra.{block}.2'))
    sources.append(x)

  def head(name, columns):
    out = []
    for level, f in enumerate(sources):
      r = conv(f, f'head.{name}.module_list.{level}', padding=1)
      _, h, w = r.shape
      # results.view(N, -1, K, H, W).permute(0, 3, 4, 1, 2).reshape(N, -1, K)
      out.append(r.reshape(-1, columns, h, w).transpose(2, 3, 0, 1).reshape(-1, columns))
    return np.concatenate(out)
  return head('classification_head', num_classes), head('regression_head', 4)


def test_torchvision_ssd300_conversion_reproduces_its_forward(tmp_path):
  num_classes = 5
  state = random_state(torchvision_ssd300_shapes(TINY, num_classes))
  path = save_npz(tmp_path, state)
  config = weights.torchvision_ssd300_config(num_classes, width=TINY)
  module = tiny_model(config, num_classes)
  params = weights.convert_torchvision_ssd300(weights.read_state_dict(path),
                                              models.abstract_variables(module)['params'])
  image = np.random.RandomState(1).uniform(-120, 130, (300, 300, 3)).astype(np.float32)
  forward = jax.jit(lambda p, x: module.apply({'params': p}, x)).lower(
      params, image[None]).compile(compiler_options=FAST_COMPILE)
  out = forward(params, image[None])
  cls_ref, box_ref = torchvision_ssd300_forward(state, image.transpose(2, 0, 1), num_classes)
  assert out['cls_logits'].shape == (1, 8732, num_classes)
  scale = lambda a: np.abs(a).max()
  np.testing.assert_allclose(np.asarray(out['cls_logits'][0]), cls_ref, rtol=1e-4,
                             atol=1e-4 * scale(cls_ref))
  # torchvision regresses [dx, dy, dw, dh]; we use [dy, dx, dh, dw] (boxes.py).
  np.testing.assert_allclose(np.asarray(out['box_deltas'][0]), box_ref[:, [1, 0, 3, 2]],
                             rtol=1e-4, atol=1e-4 * scale(box_ref))


def test_load_torchvision_ssd300_full_size():
  state = {k: np.zeros(s, np.float32) for k, s in torchvision_ssd300_shapes(1.0, 21).items()}
  state['backbone.scale_weight'][:] = 20.0
  model, variables, priors = weights.load_torchvision_ssd300(state, num_classes=21)
  assert models.count_params(variables['params']) == 26_285_486
  assert float(variables['params']['backbone']['l2norm_conv4_3']['scale'][0]) == 20.0
  assert priors.shape == (8732, 4) and priors.dtype == np.float32
  # torchvision's first priors (cx, cy, w, h = 4/300, 4/300, 0.07, ...) as [cy, cx, h, w].
  np.testing.assert_allclose(priors[0], [4 / 300, 4 / 300, 0.07, 0.07], rtol=1e-5)
  np.testing.assert_allclose(priors[1, 2:], [math.sqrt(0.07 * 0.15)] * 2, rtol=1e-5)
  np.testing.assert_allclose(priors[2, 2:], [0.07 / math.sqrt(2), 0.07 * math.sqrt(2)], rtol=1e-5)
  # Last level: 0.87 * sqrt(2) = 1.23 wide, clipped to 1 (clip=True).
  np.testing.assert_allclose(priors[-1], [0.5, 0.5, 1.0, 0.87 / math.sqrt(2)], rtol=1e-5)
  assert model.input_size == 300


def test_mismatched_state_dict_lists_every_problem():
  state = random_state(torchvision_ssd300_shapes(TINY, 5))
  del state['backbone.extra.2.0.bias']
  state['backbone.extra.9.weight'] = np.zeros((1,), np.float32)
  state['backbone.features.5.weight'] = np.zeros((8, 8, 1, 1), np.float32)
  module = tiny_model(weights.torchvision_ssd300_config(5, width=TINY), 5)
  with pytest.raises(weights.StateDictMismatch) as info:
    weights.convert_torchvision_ssd300(state, models.abstract_variables(module)['params'])
  message = str(info.value)
  assert 'missing keys (1)' in message and 'backbone.extra.2.0.bias' in message
  assert 'unexpected keys (1)' in message and 'backbone.extra.9.weight' in message
  assert 'mis-shaped keys (1)' in message and 'backbone.features.5.weight' in message
  assert 'backbone/conv2_1/kernel' in message
  assert 'does not set' in message and 'backbone/conv9_1/bias' in message


# ----------------------------------------------------------------- VGG16 ---


def torchvision_vgg16_state(width, seed=0):
  c = lambda n: layers.scaled_channels(n, width)
  shapes = {}
  for (cin, cout), index in zip(VGG, VGG_INDEX):
    shapes.update(_conv_shapes(f'features.{index}', c(cout), 3 if cin == 3 else c(cin), 3))
  fc = 4 * c(1024)   # 4096 at full width: decimation keeps every 4th
  shapes.update({'classifier.0.weight': (fc, c(512) * 49), 'classifier.0.bias': (fc,),
                 'classifier.3.weight': (fc, fc), 'classifier.3.bias': (fc,),
                 'classifier.6.weight': (10, fc), 'classifier.6.bias': (10,)})
  return random_state(shapes, seed)


@pytest.mark.parametrize('make', [lambda: config_blocks.ssd_model(300),
                                  lambda: config_blocks.skipfpn_model(320)], ids=['ssd', 'refinedet'])
def test_vgg16_conversion_places_and_decimates(tmp_path, make):
  state = torchvision_vgg16_state(TINY)
  abstract = models.abstract_variables(tiny_model(make()))['params']
  params = weights.convert_vgg16(weights.read_state_dict(save_npz(tmp_path, state)), abstract)
  backbone = params['backbone']
  np.testing.assert_array_equal(backbone['conv3_2']['kernel'],
                                state['features.12.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(backbone['conv5_3']['bias'], state['features.28.bias'])
  std = 255 * np.array([0.229, 0.224, 0.225], np.float32)
  np.testing.assert_allclose(backbone['conv1_1']['kernel'],
                             state['features.0.weight'].transpose(2, 3, 1, 0) / std[:, None],
                             rtol=1e-6)
  w6 = state['classifier.0.weight'].reshape(-1, backbone['conv5_3']['bias'].shape[0], 7, 7)
  fc6 = backbone['fc6']['kernel']
  o, i, ky, kx = 5, 3, 2, 1
  assert fc6[ky, kx, i, o] == w6[4 * o, i, 3 * ky, 3 * kx]
  assert fc6.shape[3] == w6.shape[0] // 4
  np.testing.assert_array_equal(backbone['fc6']['bias'], state['classifier.0.bias'][::4])
  fc7 = backbone['fc7']['kernel']
  assert fc7[0, 0, 7, 2] == state['classifier.3.weight'][8, 28]
  # Not in the file: left as they were.
  assert isinstance(backbone['l2norm_conv4_3']['scale'], jax.ShapeDtypeStruct)
  assert isinstance(params['head'], dict) and all(
      isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(params['head']))
  bgr = weights.convert_vgg16(state, abstract, bgr_input=True)['backbone']['conv1_1']['kernel']
  np.testing.assert_array_equal(bgr, backbone['conv1_1']['kernel'][:, :, ::-1])


def test_reduced_fc_vgg16_conversion(tmp_path):
  c = lambda n: layers.scaled_channels(n, TINY)
  shapes = {}
  for (cin, cout), index in zip(VGG, VGG_INDEX):
    shapes.update(_conv_shapes(str(index), c(cout), 3 if cin == 3 else c(cin), 3))
  shapes.update(_conv_shapes('31', c(1024), c(512), 3))
  shapes.update(_conv_shapes('33', c(1024), c(1024), 1))
  state = random_state(shapes)
  abstract = models.abstract_variables(tiny_model(config_blocks.ssd_model(300)))['params']
  backbone = weights.convert_reduced_fc_vgg16(
      weights.read_state_dict(save_npz(tmp_path, state)), abstract)['backbone']
  np.testing.assert_array_equal(backbone['fc6']['kernel'], state['31.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(backbone['fc7']['bias'], state['33.bias'])
  np.testing.assert_array_equal(backbone['conv4_3']['kernel'],
                                state['21.weight'].transpose(2, 3, 1, 0))
  # Caffe BGR weights, reversed for RGB input by default.
  np.testing.assert_array_equal(backbone['conv1_1']['kernel'],
                                state['0.weight'].transpose(2, 3, 1, 0)[:, :, ::-1])
  as_is = weights.convert_reduced_fc_vgg16(state, abstract, bgr_input=True)['backbone']
  np.testing.assert_array_equal(as_is['conv1_1']['kernel'], state['0.weight'].transpose(2, 3, 1, 0))


def test_load_pretrained_detects_the_format_and_reports(tmp_path):
  ssd_state = random_state(torchvision_ssd300_shapes(TINY, 5))
  path = save_npz(tmp_path, ssd_state)

  ssd = models.abstract_variables(tiny_model(config_blocks.ssd_model(300)))['params']
  params, report = weights.load_pretrained(path, ssd, config_blocks.ssd_model(300).model)
  assert 'extra layers' in report and 'left at init: SSD heads' in report
  np.testing.assert_array_equal(params['backbone']['conv8_2']['kernel'],
                                ssd_state['backbone.extra.1.2.weight'].transpose(2, 3, 1, 0))
  assert isinstance(params['head']['classification']['level0']['kernel'], jax.ShapeDtypeStruct)

  same_classes = models.abstract_variables(tiny_model(config_blocks.ssd_model(300), 5))['params']
  params, report = weights.load_pretrained(path, same_classes)
  assert 'left at init' not in report
  assert not any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(params))

  skipfpn = models.abstract_variables(tiny_model(config_blocks.skipfpn_model(320)))['params']
  params, report = weights.load_pretrained(path, skipfpn)
  assert 'left at init: extra layers' in report
  np.testing.assert_array_equal(params['backbone']['l2norm_conv4_3']['scale'],
                                ssd_state['backbone.scale_weight'])

  params, report = weights.load_pretrained(torchvision_vgg16_state(TINY), ssd)
  assert 'torchvision vgg16' in report
  with pytest.raises(ValueError, match='unrecognised state dict'):
    weights.load_pretrained({'conv.weight': np.zeros(3)}, ssd)
  bn_model = config_blocks.ssd_model(300).model
  bn_model.backbone_batch_norm = True
  with pytest.raises(ValueError, match=r"'.*weights\.npz'.*backbone_batch_norm=True.*no BatchNorm"):
    weights.load_pretrained(path, ssd, bn_model)


def test_pth_without_torch_says_how_to_get_it(tmp_path, monkeypatch):
  # A None entry makes `import torch` raise ImportError whether or not torch is installed.
  monkeypatch.setitem(sys.modules, 'torch', None)
  (tmp_path / 'vgg16.pth').write_bytes(b'a file torch would read')
  with pytest.raises(ImportError, match=r'smallssd-jax\[convert\]'):
    weights.read_state_dict(tmp_path / 'vgg16.pth')


def test_weight_files_that_are_missing_or_not_arrays_are_named(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, 'torch', None)
  with pytest.raises(FileNotFoundError, match=r'missing\.pth does not exist'):
    weights.read_state_dict(tmp_path / 'missing.pth')
  (tmp_path / 'broken.npz').write_bytes(b'PK\x03\x04 not really a zip')
  with pytest.raises(ValueError, match=r'broken\.npz is not a readable \.npz'):
    weights.read_state_dict(tmp_path / 'broken.npz')
  np.save(tmp_path / 'objects.npy', np.array([{'a': 1}], dtype=object))
  with open(tmp_path / 'objects.npz', 'wb') as f:
    np.savez(f, w=np.array([{'a': 1}], dtype=object))
  with pytest.raises(ValueError, match=r'objects\.npz is not a readable \.npz'):
    weights.read_state_dict(tmp_path / 'objects.npz')


def test_equivalence_with_torchvision_ssd300():
  torch = pytest.importorskip('torch', reason='the torchvision equivalence test needs torch')
  tv = pytest.importorskip('torchvision',
                           reason='the torchvision equivalence test needs torchvision')
  torch.manual_seed(0)
  reference = tv.models.detection.ssd300_vgg16(weights=None, weights_backbone=None,
                                               num_classes=21).eval()
  assert sum(p.numel() for p in reference.parameters()) == 26_285_486
  model, variables, priors = weights.load_torchvision_ssd300(reference.state_dict(), num_classes=21)
  image = torch.rand(1, 3, 300, 300)
  # torchvision's transform: (x - image_mean) / image_std with std 1/255.
  mean = torch.tensor([0.48235, 0.45882, 0.40784])[:, None, None]
  normalised = (image - mean) * 255.0
  with torch.no_grad():
    features = list(reference.backbone(normalised).values())
    head = reference.head(features)
    from torchvision.models.detection import image_list  # pylint: disable=g-import-not-at-top
    tv_priors = reference.anchor_generator(
        image_list.ImageList(normalised, [(300, 300)]), features)[0]
  out = model.apply(variables, jnp.asarray(normalised.permute(0, 2, 3, 1).numpy()))
  cls_ref = head['cls_logits'][0].numpy()
  box_ref = head['bbox_regression'][0].numpy()[:, [1, 0, 3, 2]]
  np.testing.assert_allclose(np.asarray(out['cls_logits'][0]), cls_ref, rtol=1e-4,
                             atol=1e-4 * np.abs(cls_ref).max())
  np.testing.assert_allclose(np.asarray(out['box_deltas'][0]), box_ref, rtol=1e-4,
                             atol=1e-4 * np.abs(box_ref).max())
  # Priors: torchvision's xyxy pixels vs our [cy, cx, h, w] normalised.
  cy, cx, h, w = priors.T
  ours = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1) * 300
  np.testing.assert_allclose(ours, tv_priors.numpy(), atol=1e-3)
