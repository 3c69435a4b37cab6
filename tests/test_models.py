"""Detector modules: paper configurations by shape, tiny ones by forward and backward.

Full-size models are only ever traced (`jax.eval_shape`); the tiny ones (width
1/16) run a forward and backward pass each in a few seconds. Parameters for
the runs are filled with NumPy rather than `module.init`, whose threefry
random-number kernels take XLA longer to compile on a CPU than the model.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smallssd_jax import anchors as anchor_lib
from smallssd_jax import config_blocks
from smallssd_jax.models import cpu
from smallssd_jax.models import detector
from smallssd_jax.models import heads
from smallssd_jax.models import layers
from smallssd_jax import models

# Compile the tiny models quickly: they run once.
FAST_COMPILE = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}


def per_location(anchor_cfg):
  """Priors per location from the preset, computed here independently of anchors.py."""
  if anchor_cfg.style == 'ssd':
    return [2 + 2 * len(r) for r in anchor_cfg.aspect_ratios]
  if anchor_cfg.style == 'dfssd':
    # docs/design.md §4: six priors per cell, nine on the first map (the half-scale extras).
    return [9 if k == 0 else 6 for k in range(len(anchor_cfg.feature_maps))]
  return [len(anchor_cfg.aspect_ratios)] * len(anchor_cfg.feature_maps)


def build(preset, **model_overrides):
  for key, value in model_overrides.items():
    preset.model[key] = value
  return models.build_detector(preset.model, per_location(preset.anchors))


def numpy_variables(module, seed=0):
  """He-normal kernels, zero biases and means, unit scales and variances."""
  rs = np.random.RandomState(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == 'kernel':
      fan_in = math.prod(leaf.shape[:-1])
      return jnp.asarray(rs.randn(*leaf.shape).astype(np.float32) * np.sqrt(2.0 / fan_in))
    if name in ('scale', 'var', 'fusion_weights'):
      return jnp.ones(leaf.shape, leaf.dtype)
    return jnp.zeros(leaf.shape, leaf.dtype)
  return jax.tree_util.tree_map_with_path(fill, models.abstract_variables(module))


# ------------------------------------------- independent parameter counts ---


def conv(cin, cout, k, bias=True, bn=False):
  return k * k * cin * cout + (cout if bias else 0) + (2 * cout if bn else 0)


VGG_CONVS = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256),
             (256, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)]


def vgg_params():
  return sum(conv(a, b, 3) for a, b in VGG_CONVS) + conv(512, 1024, 3) + conv(1024, 1024, 1)


def ssd_extras_params(size_512):
  stages = [(1024, 256, 512, 3), (512, 128, 256, 3), (256, 128, 256, 3), (256, 128, 256, 3)]
  if size_512:
    stages.append((256, 128, 256, 4))
  return sum(conv(cin, mid, 1) + conv(mid, out, k) for cin, mid, out, k in stages)


def ssd_head_params(channels, anchors, classes):
  return sum(conv(c, a * classes, 3) + conv(c, a * 4, 3) for c, a in zip(channels, anchors))


def expected_params(name, size, classes=21):
  if name == 'ssd':
    channels = [512, 1024, 512, 256, 256, 256] + ([256] if size == 512 else [])
    anchors = [4, 6, 6, 6, 4, 4] if size == 300 else [4, 6, 6, 6, 6, 4, 4]
    return vgg_params() + 512 + ssd_extras_params(size == 512) + ssd_head_params(
        channels, anchors, classes)
  if name == 'dfssd':
    kernel = 8     # = the stride at both sizes (the paper's 300 kernel is 4: models/dfssd.py)
    deconv = 512 * 256 * kernel * kernel + 256
    source_norms = 256 + 256     # the L2Norm scales of the two halves of nconv4_3
    projections = sum(conv(c, 256, 1, bias=False, bn=True)
                      for c in (256 + 256, 1024, 512, 256, 256))
    fused = conv(256, 256, 3)
    channels = [256, 1024, 512, 256, 256] + ([256] if size == 512 else [])
    anchors = [9] + [6] * (len(channels) - 1)
    return (vgg_params() + 512 + ssd_extras_params(size == 512) + deconv + source_norms
            + projections + fused + ssd_head_params(channels, anchors, classes))
  assert name == 'skipfpn'
  backbone = vgg_params() + conv(1024, 256, 1) + conv(256, 512, 3) + 512 + 512
  sources = [512, 512, 1024, 512]
  lateral = sum(conv(c, 256, 3, False, True) + conv(256, 256, 3, False, True) for c in sources)
  grf = (conv(256, 64, 1, False, True) + conv(64, 64, 1, False, True) + conv(64, 64, 3, False, True)
         + conv(64, 64, 3, False, True) + conv(64, 64, 3, False, True)
         + conv(64, 64, 5, False, True) + conv(64, 64, 3, False, True)
         + conv(192, 256, 1, False, True))
  # D = 2: 1->0, 2->1, 3->2 by 2x2/2 and 2->0, 3->1 by 4x4/4 transposed convs.
  skips = 3 * (256 * 256 * 4 + 256) + 2 * (256 * 256 * 16 + 256)
  pyramid = 4 * conv(256, 256, 3, False, True)
  arm = sum(conv(c, 3 * 2, 3) + conv(c, 3 * 4, 3) for c in sources)
  odm = 4 * (conv(256, 3 * classes, 3) + conv(256, 3 * 4, 3))
  return backbone + lateral + 4 * grf + skips + pyramid + arm + odm


PAPER_CONFIGS = [
    # (preset, size, anchors, feature sizes)
    ('ssd', 300, 8732, [38, 19, 10, 5, 3, 1]),
    ('ssd', 512, 24564, [64, 32, 16, 8, 4, 2, 1]),
    ('dfssd', 300, 15966, [38, 19, 10, 5, 3]),
    ('dfssd', 512, 64 ** 2 * 9 + (32 ** 2 + 16 ** 2 + 8 ** 2 + 4 ** 2 + 2 ** 2) * 6,
     [64, 32, 16, 8, 4, 2]),
    ('skipfpn', 320, 6375, [40, 20, 10, 5]),
    ('skipfpn', 512, 16320, [64, 32, 16, 8]),
]


@pytest.mark.parametrize('name,size,num_anchors,sizes', PAPER_CONFIGS,
                         ids=[f'{n}{s}' for n, s, _, _ in PAPER_CONFIGS])
def test_paper_configurations_by_shape(name, size, num_anchors, sizes):
  preset = config_blocks.MODELS[name](size)
  module = build(preset)
  out = models.output_shapes(module, batch=2)
  assert out['cls_logits'].shape == (2, num_anchors, 21)
  assert out['box_deltas'].shape == (2, num_anchors, 4)
  assert all(v.dtype == jnp.float32 for v in out.values())
  if name == 'skipfpn':
    assert out['arm_logits'].shape == (2, num_anchors, 2)
    assert out['arm_deltas'].shape == (2, num_anchors, 4)
  else:
    assert set(out) == {'cls_logits', 'box_deltas'}
  assert anchor_lib.prior_count(preset.anchors) == num_anchors
  pyramid = models.feature_map_shapes(module)['pyramid']
  assert [s[0] for s in pyramid] == sizes == list(preset.anchors.feature_maps)
  variables = models.abstract_variables(module)
  assert models.count_params(variables['params']) == expected_params(name, size)
  models.check_anchor_count(module, preset.model, num_anchors)


def test_ssd300_has_torchvision_parameter_count():
  # torchvision's ssd300_vgg16 at 21 classes (docs/design.md §3).
  assert expected_params('ssd', 300) == 26_285_486


def test_bfloat16_compute_keeps_float32_params_and_outputs():
  module = build(config_blocks.skipfpn_model(320), dtype='bfloat16', width=0.25)
  variables = models.abstract_variables(module)
  assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  out = models.output_shapes(module)
  assert {v.dtype for v in out.values()} == {jnp.dtype(jnp.float32)}


def test_dfssd_options_by_shape():
  preset = config_blocks.dfssd_model(300)
  preset.model.dfssd.update(fusion='learned', fuse_levels='all', pool='max')
  module = build(preset, width=1 / 16)
  out = models.output_shapes(module)
  assert out['cls_logits'].shape == (1, 15966, 21)
  pyramid = models.feature_map_shapes(module)['pyramid']
  # Every level is a fused map of fusion_channels (256 / 16) at its own size.
  assert pyramid == [(s, s, 16) for s in (38, 19, 10, 5, 3)]
  params = models.abstract_variables(module)['params']['neck']
  assert {k for k in params if k.startswith('fused')} == {
      'fused', 'fused_fc7', 'fused_conv8_2', 'fused_conv9_2', 'fused_conv10_2'}
  assert params['fused']['fusion_weights'].shape == (5,)


def test_backbone_batch_norm_replaces_every_bias_with_bn():
  preset = config_blocks.ssd_model(300)
  plain = models.abstract_variables(build(preset, width=1 / 16))
  module = build(config_blocks.ssd_model(300), width=1 / 16, backbone_batch_norm=True)
  variables = models.abstract_variables(module)
  convs = plain['params']['backbone']
  with_bn = variables['params']['backbone']
  assert set(with_bn) == set(convs)
  out_channels = 0
  for name, layer in convs.items():
    if name.startswith('l2norm'):
      continue
    channels = layer['bias'].shape[0]
    out_channels += channels
    assert set(with_bn[name]) == {'conv', 'bn'}, name
    assert set(with_bn[name]['conv']) == {'kernel'}, name
    assert with_bn[name]['conv']['kernel'].shape == layer['kernel'].shape, name
    assert with_bn[name]['bn']['scale'].shape == (channels,), name
    assert variables['batch_stats']['backbone'][name]['bn']['mean'].shape == (channels,), name
  # 13 VGG convs, fc6, fc7 and the eight SSD300 extra convs.
  assert len(variables['batch_stats']['backbone']) == 23
  # A bias per channel becomes a BN scale and shift per channel.
  assert (models.count_params(variables['params'])
          == models.count_params(plain['params']) + out_channels)


@pytest.mark.parametrize('head_cls', [heads.SSDHead, heads.TwoStepHead])
def test_head_init_small_or_xavier(head_cls):
  maps = [jnp.zeros((1, 4, 4, 32))]
  args = (maps, maps) if head_cls.takes_lateral_sources else (maps,)
  # Xavier-uniform on a 3x3x32 -> 4 * values conv: std sqrt(2 / (fan_in + fan_out)).
  for init, expected_std in [('small', lambda values: 0.01),
                             ('xavier', lambda values: math.sqrt(2.0 / (9 * 32 + 9 * 4 * values)))]:
    params = head_cls(num_anchors=(4,), num_classes=21, head_init=init).init(
        jax.random.key(0), *args)['params']
    for name, layer in params.items():
      kernel = np.asarray(layer['level0']['kernel'])
      values = kernel.shape[-1] // 4
      assert abs(kernel.std() / expected_std(values) - 1) < 0.15, (init, name, kernel.std())
      np.testing.assert_array_equal(layer['level0']['bias'], 0.0)
  with pytest.raises(ValueError, match="head_init must be one of.*'zeros'"):
    head_cls(num_anchors=(4,), num_classes=21, head_init='zeros').init(jax.random.key(0), *args)


def test_skipfpn_odd_input_size_and_full_skip_depth():
  # 300 -> 38, 19, 9, 5: the 2x / 4x / 8x upsampled maps are cropped or padded.
  preset = config_blocks.skipfpn_model(300)
  preset.model.skipfpn.skip_depth = 3
  module = build(preset, width=1 / 16)
  assert [s[0] for s in models.feature_map_shapes(module)['pyramid']] == [38, 19, 9, 5]
  neck = models.abstract_variables(module)['params']['neck']
  assert neck['skip_deconv3_to0']['kernel'].shape == (8, 8, 16, 16)
  assert models.output_shapes(module)['cls_logits'].shape[1] == 3 * (38 ** 2 + 19 ** 2 + 81 + 25)


def test_check_anchor_count_names_the_feature_sizes():
  preset = config_blocks.ssd_model(300)
  module = build(preset, width=1 / 16)
  models.check_anchor_count(module, preset.model, 8732)
  with pytest.raises(ValueError, match=r'8732.*\(38, 38\), \(19, 19\).*8000'):
    models.check_anchor_count(module, preset.model, 8000)


def test_configuration_errors_are_clear():
  with pytest.raises(ValueError, match='unknown model.neck'):
    build(config_blocks.ssd_model(300), neck='fpn')
  with pytest.raises(ValueError, match='anchors per location are given for 5 levels'):
    models.output_shapes(models.build_detector(config_blocks.ssd_model(300).model, [4] * 5))
  module = build(config_blocks.ssd_model(300), width=1 / 16)
  with pytest.raises(ValueError, match=r'images must be \[B, 300, 300, 3\]'):
    jax.eval_shape(lambda x: module.init(jax.random.key(0), x),
                   jax.ShapeDtypeStruct((1, 320, 320, 3), jnp.float32))


TINY = [
    # (id, preset, input size, extra settings)
    ('ssd300', lambda: config_blocks.ssd_model(300), 300, {}),
    ('ssd300_backbone_bn', lambda: config_blocks.ssd_model(300), 300, {'backbone_batch_norm': True}),
    ('dfssd300', lambda: config_blocks.dfssd_model(300), 300, {'fusion': 'learned', 'pool': 'max'}),
    # An odd size exercises the crop / pad of the upsampled maps (25, 12, 6, 3).
    ('skipfpn', lambda: config_blocks.skipfpn_model(320), 200, {'grf_levels': [0]}),
]


@pytest.mark.parametrize('make,size,options', [t[1:] for t in TINY], ids=[t[0] for t in TINY])
def test_tiny_forward_backward(make, size, options):
  preset = make()
  options = dict(options)
  if 'backbone_batch_norm' in options:
    preset.model.backbone_batch_norm = options.pop('backbone_batch_norm')
  neck_options = preset.model.get(preset.model.neck)
  if neck_options is not None:
    neck_options.update(options)
  module = build(preset, width=1 / 16, input_size=size)
  variables = numpy_variables(module)
  images = jnp.asarray(np.random.RandomState(1).randn(2, size, size, 3).astype(np.float32))

  def loss(params):
    out, updates = module.apply({**variables, 'params': params}, images, train=True,
                                mutable=['batch_stats'])
    return sum(jnp.mean(jnp.square(v)) for v in out.values()), (out, updates)

  step = jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(
      variables['params']).compile(compiler_options=FAST_COMPILE)
  (value, (out, updates)), grads = step(variables['params'])
  expected = models.output_shapes(module, batch=2)
  assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in expected.items()}
  assert np.isfinite(float(value))
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.all(np.isfinite(np.asarray(g))), jax.tree_util.keystr(path)
  # Every parameter takes part in the outputs (the conv kernels at least).
  kernels = [g for p, g in jax.tree_util.tree_leaves_with_path(grads) if p[-1].key == 'kernel']
  assert all(float(jnp.abs(g).max()) > 0 for g in kernels)
  if 'batch_stats' in variables:
    assert jax.tree.structure(updates['batch_stats']) == jax.tree.structure(
        variables['batch_stats'])


# ----------------------------------------------------------------- layers ---


def torch_pool_size(size, k, s, p, ceil):
  # PyTorch's formula, written out from its documentation.
  out = (math.ceil if ceil else math.floor)((size + 2 * p - k) / s) + 1
  if ceil and (out - 1) * s >= size + p:
    out -= 1
  return out


@pytest.mark.parametrize('size,k,s,p,ceil,expected', [
    (75, 2, 2, 0, True, 38), (75, 2, 2, 0, False, 37), (19, 3, 1, 1, False, 19),
    (3, 2, 2, 1, True, 2), (7, 3, 2, 0, True, 3), (20, 2, 2, 0, False, 10)])
def test_max_pool_matches_pytorch(size, k, s, p, ceil, expected):
  assert torch_pool_size(size, k, s, p, ceil) == expected
  x = np.random.RandomState(0).randn(1, size, size, 2).astype(np.float32)
  got = np.asarray(layers.max_pool2d(jnp.asarray(x), k, s, p, ceil_mode=ceil))
  padded = np.pad(x, ((0, 0), (p, p + k), (p, p + k), (0, 0)), constant_values=-np.inf)
  ref = np.stack([np.stack([padded[0, i * s:i * s + k, j * s:j * s + k].max(axis=(0, 1))
                            for j in range(expected)]) for i in range(expected)])
  np.testing.assert_array_equal(got[0], ref)


@pytest.mark.parametrize('size,k,s,p', [(6, 4, 8, 1), (5, 8, 8, 0), (4, 2, 2, 0), (3, 4, 4, 0),
                                        (5, 3, 2, 2)])
def test_conv_transpose_matches_pytorch_scatter(size, k, s, p):
  from smallssd_jax import weights  # pylint: disable=g-import-not-at-top
  rs = np.random.RandomState(0)
  x = rs.randn(1, size, size, 3).astype(np.float32)
  w = rs.randn(3, 5, k, k).astype(np.float32)      # PyTorch [in, out, kh, kw]
  b = rs.randn(5).astype(np.float32)
  out_size = (size - 1) * s + k - 2 * p
  full = np.zeros((5, (size - 1) * s + k, (size - 1) * s + k), np.float32)
  for i in range(size):
    for j in range(size):
      full[:, i * s:i * s + k, j * s:j * s + k] += np.einsum('c,cokl->okl', x[0, i, j], w)
  ref = full[:, p:p + out_size, p:p + out_size] + b[:, None, None]
  module = layers.ConvTranspose2d(5, k, s, p)
  got = module.apply({'params': {'kernel': weights.conv_transpose_weight(w), 'bias': b}},
                     jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(got)[0], ref.transpose(1, 2, 0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('size,k,s,p,canvas', [(38, 4, 8, 1, 300), (38, 8, 8, 0, 300),
                                               (16, 8, 8, 0, 128), (10, 3, 4, 0, 37),
                                               (7, 2, 3, 1, 20), (9, 4, 4, 0, 40)])
def test_deconv_avg_pool_equals_deconvolution_then_pooling(size, k, s, p, canvas):
  """The fused DF-SSD layer equals a NumPy scatter deconvolution, centred, then bin means."""
  rs = np.random.RandomState(1)
  x = rs.randn(2, size, size, 3).astype(np.float32)
  kernel = rs.randn(k, k, 3, 4).astype(np.float32)  # HWIO
  bias = rs.randn(4).astype(np.float32)
  full_size = (size - 1) * s + k
  full = np.zeros((2, full_size, full_size, 4), np.float32)
  for i in range(size):
    for j in range(size):
      full[:, i * s:i * s + k, j * s:j * s + k] += np.einsum('bc,klcd->bkld', x[:, i, j], kernel)
  out_size = full_size - 2 * p
  deconv = full[:, p:p + out_size, p:p + out_size] + bias
  before = (canvas - out_size) // 2            # centred zero pad / crop
  placed = np.zeros((2, canvas, canvas, 4), np.float32)
  src = slice(max(0, -before), max(0, -before) + min(canvas, out_size))
  dst = slice(max(0, before), max(0, before) + min(canvas, out_size))
  placed[:, dst, dst] = deconv[:, src, src]
  bins = [(math.floor(i * canvas / size), math.ceil((i + 1) * canvas / size)) for i in range(size)]
  ref = np.array([[placed[:, a:b, c:d].mean(axis=(1, 2)) for c, d in bins] for a, b in bins])
  got = layers.deconv_avg_pool(jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(bias), s, p,
                               (canvas, canvas), (size, size))
  np.testing.assert_allclose(np.asarray(got), ref.transpose(2, 0, 1, 3), rtol=1e-4, atol=1e-4)

  if canvas != 300:
    return
  # Gradients (DF-SSD300's two kernels): equal to those of the direct layers
  # (transposed conv, crop, adaptive pool).
  def direct(x, kernel):
    y = layers.ConvTranspose2d(4, k, s, p).apply({'params': {'kernel': kernel, 'bias': bias}}, x)
    return layers.adaptive_pool2d(layers.crop_or_pad(y, (canvas, canvas), True), (size, size))
  fused = lambda x, kernel: layers.deconv_avg_pool(x, kernel, bias, s, p, (canvas, canvas),
                                                   (size, size))
  probe = jnp.asarray(rs.randn(2, size, size, 4).astype(np.float32))
  grads = [jax.grad(lambda a, b: jnp.sum(f(a, b) * probe), argnums=(0, 1))(
      jnp.asarray(x), jnp.asarray(kernel)) for f in (direct, fused)]
  for want, got in zip(*grads):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


def test_deconv_avg_pool_refuses_overlapping_kernels():
  with pytest.raises(ValueError, match='kernel <= stride'):
    layers.deconv_avg_pool(jnp.zeros((1, 4, 4, 2)), jnp.zeros((5, 5, 2, 3)), None, 4, 0,
                           (16, 16), (4, 4))


@pytest.mark.parametrize('mode', ['avg', 'max'])
@pytest.mark.parametrize('size,out', [(30, 7), (16, 8), (300, 38)])
def test_adaptive_pool_matches_pytorch_bins(mode, size, out):
  x = np.random.RandomState(0).randn(1, size, size, 2).astype(np.float32)
  got = np.asarray(layers.adaptive_pool2d(jnp.asarray(x), (out, out), mode))
  bins = [(math.floor(i * size / out), math.ceil((i + 1) * size / out)) for i in range(out)]
  reduce = np.mean if mode == 'avg' else np.max
  ref = np.array([[reduce(x[0, a:b, c:d], axis=(0, 1)) for c, d in bins] for a, b in bins])
  np.testing.assert_allclose(got[0], ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('size,out', [(5, 13), (1, 4), (3, 6)])
def test_bilinear_upsampling_matches_pytorch(size, out):
  x = np.random.RandomState(0).randn(1, size, size, 1).astype(np.float32)
  got = np.asarray(layers.resize_bilinear(jnp.asarray(x), (out, out)))[0, :, :, 0]

  def weights_1d():  # F.interpolate(mode='bilinear', align_corners=False)
    m = np.zeros((out, size))
    for d in range(out):
      src = max((d + 0.5) * size / out - 0.5, 0.0)
      lo = min(int(np.floor(src)), size - 1)
      hi = min(lo + 1, size - 1)
      m[d, lo] += 1 - (src - lo)
      m[d, hi] += src - lo
    return m
  m = weights_1d()
  np.testing.assert_allclose(got, m @ x[0, :, :, 0] @ m.T, rtol=1e-5, atol=1e-6)


def test_crop_or_pad():
  x = jnp.ones((1, 298, 297, 2))
  y = layers.crop_or_pad(x, (300, 295), centred=True)
  assert y.shape == (1, 300, 295, 2)
  assert float(y[0, 0, 0, 0]) == 0 and float(y[0, 1, 0, 0]) == 1 and float(y[0, 299, 0, 0]) == 0
  z = layers.crop_or_pad(x, (300, 296), centred=False)
  assert float(z[0, 0, 0, 0]) == 1 and float(z[0, 298, 0, 0]) == 0


def test_l2norm():
  x = np.random.RandomState(0).randn(2, 3, 3, 6).astype(np.float32)
  got = layers.L2Norm(20.0).init_with_output(jax.random.key(0), jnp.asarray(x))[0]
  ref = 20.0 * x / np.linalg.norm(x, axis=-1, keepdims=True)
  np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5)


def test_l2norm_gradient_is_finite_on_an_all_zero_position():
  x = jnp.zeros((1, 2, 2, 4)).at[0, 0, 0].set(1.0)
  module = layers.L2Norm(10.0)
  variables = module.init(jax.random.key(0), x)
  grad = jax.grad(lambda v: jnp.sum(module.apply(variables, v) ** 2 + module.apply(variables, v)))(x)
  assert np.all(np.isfinite(np.asarray(grad)))


def test_scaled_channels():
  assert [layers.scaled_channels(c, 1.0) for c in (64, 1024)] == [64, 1024]
  assert [layers.scaled_channels(c, 1 / 16) for c in (64, 256, 512, 1024)] == [8, 16, 32, 64]
  assert layers.scaled_channels(256, 0.3) == 80


@pytest.mark.parametrize('shape', [(2, 5, 7, 3), (4, 1, 1, 16), (3, 8)])
def test_channel_sum_is_the_sum_over_leading_axes(shape):
  x = np.random.RandomState(0).randn(*shape).astype(np.float32)
  got = jax.jit(cpu.channel_sum)(jnp.asarray(x))
  np.testing.assert_allclose(got, x.astype(np.float64).reshape(-1, shape[-1]).sum(0),
                             rtol=1e-5, atol=1e-5)


def _random_like(tree, seed):
  rs = np.random.RandomState(seed)
  return jax.tree.map(lambda a: jnp.asarray(rs.rand(*a.shape).astype(np.float32) + 0.5), tree)


@pytest.mark.parametrize('stride,padding,dilation', [(1, 1, 1), (2, 0, 1), (1, 4, 2)])
def test_conv_matches_flax_conv_forward_and_gradients(stride, padding, dilation):
  x = jnp.asarray(np.random.RandomState(0).randn(2, 9, 11, 5).astype(np.float32))
  ours = layers.conv2d(7, 3, stride=stride, padding=padding, dilation=dilation, conv=cpu.Conv)
  ref = nn.Conv(7, (3, 3), strides=(stride, stride), padding=((padding, padding),) * 2,
                kernel_dilation=(dilation, dilation))
  variables = _random_like(ref.init(jax.random.key(0), x), 1)
  assert jax.tree.structure(ours.init(jax.random.key(0), x)) == jax.tree.structure(variables)

  def value_and_grads(module):
    loss = lambda v, x: jnp.sum(jnp.sin(module.apply(v, x)) * jnp.arange(7.0))
    return jax.value_and_grad(loss, argnums=(0, 1))(variables, x)

  pairs = zip(jax.tree.leaves(value_and_grads(ours)), jax.tree.leaves(value_and_grads(ref)))
  for got, want in pairs:
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('poison', ['none', 'input', 'kernel'])
def test_conv_nhwc_gradients_equal_the_plain_convolution(poison):
  """The stored input (models/cpu.py) changes nothing, NaNs included, and is a conditional on the CPU."""
  rs = np.random.RandomState(0)
  x, kernel = rs.randn(2, 9, 11, 5).astype(np.float32), rs.randn(3, 3, 5, 4).astype(np.float32)
  if poison == 'input':
    x[0, 0, 0, 0] = np.nan
  elif poison == 'kernel':
    kernel[0, 0, 0, 0] = np.nan   # the element the predicate is made of
  spec = (2, 1, 1)
  weights = jnp.arange(4.0)

  def grads(conv):
    loss = lambda x, k: jnp.sum(jnp.sin(conv(x, k, spec)) * weights)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))

  got = grads(cpu.conv_nhwc)(x, kernel)
  want = grads(cpu._conv_apply)(x, kernel)   # pylint: disable=protected-access
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)
  assert np.isnan(np.asarray(got[1][1])).any() == (poison != 'none')
  hlo = grads(cpu.conv_nhwc).lower(x, kernel).compile().as_text()
  assert ('conditional' in hlo) == (jax.default_backend() == 'cpu')
  # Inference (no gradient) runs the convolution alone.
  forward = jax.jit(lambda x, k: cpu.conv_nhwc(x, k, spec)).lower(x, kernel).compile()
  assert 'conditional' not in forward.as_text()


@pytest.mark.parametrize('train', [True, False])
def test_batch_norm_matches_flax_batch_norm(train):
  x = jnp.asarray(np.random.RandomState(0).randn(4, 5, 6, 3).astype(np.float32) * 3 + 1)
  ours = cpu.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)
  ref = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)
  variables = ref.init(jax.random.key(0), x)
  assert jax.tree.structure(ours.init(jax.random.key(0), x)) == jax.tree.structure(variables)
  variables = {'params': _random_like(variables['params'], 1),
               'batch_stats': _random_like(variables['batch_stats'], 2)}

  def value_and_grads(module):
    def loss(v, x):
      y, updates = module.apply(v, x, mutable=['batch_stats'])
      return jnp.sum(jnp.sin(y) * jnp.arange(3.0)), updates
    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(variables, x)

  pairs = zip(jax.tree.leaves(value_and_grads(ours)), jax.tree.leaves(value_and_grads(ref)))
  for got, want in pairs:
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_batch_norm_averages_statistics_over_the_axis():
  x = np.random.RandomState(0).randn(4, 3, 3, 2).astype(np.float32)
  joint = layers.ConvBNReLU(8, 1)
  rs = np.random.RandomState(1)
  variables = {'params': {'conv': {'kernel': jnp.asarray(rs.randn(1, 1, 2, 8), jnp.float32)},
                          'bn': {'scale': jnp.ones(8), 'bias': jnp.zeros(8)}},
               'batch_stats': {'bn': {'mean': jnp.zeros(8), 'var': jnp.ones(8)}}}
  _, want = joint.apply(variables, jnp.asarray(x), train=True, mutable=['batch_stats'])
  sharded = layers.ConvBNReLU(8, 1, axis_name='data')
  apply = lambda xs: sharded.apply(variables, xs, train=True, mutable=['batch_stats'])[1]
  got = jax.vmap(apply, axis_name='data')(jnp.asarray(x).reshape(2, 2, 3, 3, 2))
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g)[0], np.asarray(w), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(g)[1], np.asarray(w), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('name', ['ssd', 'dfssd', 'skipfpn'])
def test_cpu_and_plain_builds_have_the_same_variables(name):
  """Checkpoints and weight files load into either build (shapes only, nothing computed)."""
  blocks = config_blocks.model(name, num_classes=4)
  blocks.model.backbone_batch_norm = True
  per_location = anchor_lib.anchors_per_location(blocks.anchors)
  shapes = [models.abstract_variables(models.build_detector(blocks.model, per_location,
                                                            backend=b)) for b in ('cpu', 'gpu')]
  assert jax.tree.structure(shapes[0]) == jax.tree.structure(shapes[1])
  assert [x.shape for x in jax.tree.leaves(shapes[0])] == [x.shape for x in jax.tree.leaves(shapes[1])]


@pytest.mark.slow
@pytest.mark.parametrize('name', ['ssd', 'dfssd', 'skipfpn'])
def test_cpu_kernels_are_a_drop_in_for_flax_layers(name):
  """The CPU build and the plain-Flax build: the same variables, the same outputs."""
  blocks = config_blocks.model(name, num_classes=4)
  blocks.model.width = 1 / 16
  blocks.model.backbone_batch_norm = True
  per_location = anchor_lib.anchors_per_location(blocks.anchors)
  on_cpu = models.build_detector(blocks.model, per_location, backend='cpu')
  plain = models.build_detector(blocks.model, per_location, backend='gpu')
  size = blocks.model.input_size
  x = jnp.asarray(np.random.RandomState(0).randn(2, size, size, 3).astype(np.float32))
  variables = plain.init(jax.random.key(0), x)
  assert jax.tree.structure(on_cpu.init(jax.random.key(0), x)) == jax.tree.structure(variables)
  for train in (False, True):
    outs = [m.apply(variables, x, train=train, mutable=['batch_stats'])[0] for m in (on_cpu, plain)]
    for k in outs[1]:
      np.testing.assert_allclose(np.asarray(outs[0][k]), np.asarray(outs[1][k]), rtol=2e-3,
                                 atol=2e-3, err_msg=f'{name} {k} train={train}')


def test_registry_names_match_the_models():
  for make in config_blocks.MODELS.values():
    model = make().model
    assert model.backbone in detector.BACKBONES
    assert model.neck in detector.NECKS
    assert model.head in detector.HEADS
  assert isinstance(build(config_blocks.ssd_model(300)), nn.Module)


def test_summary_reports_levels_priors_params_and_flops():
  from smallssd_jax.tools import summary  # pylint: disable=g-import-not-at-top
  preset = config_blocks.dfssd_model(300)
  preset.model.width = 1 / 16
  text = summary.summarize(preset, flops=True)
  assert 'fused' in text and '38 x 38 x 16' in text and '12996' in text
  assert 'priors: 15966 from the prior generator, 15966 from the feature maps' in text
  assert 'MISMATCH' not in text
  assert 'GFLOPs per image' in text
