"""Pretrained weights from PyTorch state dicts into the Flax parameter tree (docs/design.md §1, §8).

Three sources:

* torchvision `vgg16` (ImageNet classifier, `features.N` / `classifier.N`):
  the conv layers go to conv1_1 ... conv5_3; fc6 and fc7 are made from
  `classifier.0` / `classifier.3` by decimation, as the SSD paper does after
  ParseNet / DeepLab: fc6's 4096 x 25088 weight is read as 4096 x 512 x 7 x 7,
  every 4th output channel (0, 4, ...) and every 3rd spatial tap (0, 3, 6) are
  kept, giving 1024 x 512 x 3 x 3 applied with dilation (the holes replace the
  taps dropped); fc7 keeps every 4th row and column of its 4096 x 4096 weight
  (1024 x 1024, a 1x1 conv). fc7's input subsampling is the same
  every-4th set as fc6's outputs, so the two stay consistent;
* SSD's reduced-fc VGG16 (`vgg16_reducedfc.pth`, ssd.pytorch's
  `nn.ModuleList` indices `0` ... `33`: convs at 0, 2, 5, 7, 10, 12, 14, 17,
  19, 21, 24, 26, 28, fc6 at 31, fc7 at 33), already decimated;
* torchvision `ssd300_vgg16`: the whole SSD300 (`load_torchvision_ssd300`).

PyTorch conv weights are OIHW, Flax's HWIO. `.pth` files need torch
(`pip install smallssd-jax[convert]`) and are read with
`torch.load(path, map_location='cpu', weights_only=True)`; `.npz` files (the
same keys, NumPy arrays) and in-memory dicts need nothing but NumPy.

Input conventions differ between the sources, and the converters fold the
difference into conv1_1 so that one data normalisation (docs/design.md §2: RGB,
0..255 minus (123, 117, 104), `config.data`) serves all of them:

* torchvision's ImageNet `vgg16` wants `(x / 255 - mean) / std`; its mean is
  within 0.7 grey levels of SSD's, and its std is folded into conv1_1
  (`fold_imagenet_std`);
* the reduced-fc VGG16 was trained on BGR input (Caffe): conv1_1's input
  channels are reversed unless the data pipeline feeds BGR (`bgr_input`);
* torchvision's `ssd300_vgg16` wants RGB minus (123, 117, 104), as is.

A state dict whose keys or shapes do not fit raises one ValueError listing
the missing, unexpected and mis-shaped keys together.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from smallssd_jax import anchors as anchors_lib
from smallssd_jax import models
from smallssd_jax import config_blocks

PyTree = Any
StateDict = Mapping[str, np.ndarray]

VGG16_CONVS = ('conv1_1', 'conv1_2', 'conv2_1', 'conv2_2', 'conv3_1', 'conv3_2', 'conv3_3',
               'conv4_1', 'conv4_2', 'conv4_3', 'conv5_1', 'conv5_2', 'conv5_3')
# Positions of the convs in torchvision's `vgg16().features` and in
# ssd.pytorch's `vgg` ModuleList (which continues with pool5, fc6 = 31, fc7 = 33).
VGG16_FEATURE_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
SSD300_EXTRAS = ('conv8_1', 'conv8_2', 'conv9_1', 'conv9_2', 'conv10_1', 'conv10_2',
                 'conv11_1', 'conv11_2')
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)

# torchvision ssd300_vgg16's COCO priors (DefaultBoxGenerator arguments).
TORCHVISION_SSD300_SCALES = (0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05)


# ------------------------------------------------------------- reading ---


def _to_numpy(value: Any) -> np.ndarray:
  if hasattr(value, 'detach'):  # a torch tensor; bfloat16 has no NumPy twin
    value = value.detach().cpu()
    if value.is_floating_point():
      value = value.float()
    value = value.numpy()
  return np.asarray(value)


def read_state_dict(path_or_state_dict: str | os.PathLike | StateDict) -> dict[str, np.ndarray]:
  """`{key: float array}` from a `.pth` / `.pt` file (needs torch), an `.npz` file or a dict.

  A checkpoint that wraps its weights under 'state_dict' or 'model' is unwrapped.
  """
  if isinstance(path_or_state_dict, Mapping):
    state = path_or_state_dict
  else:
    path = os.fspath(path_or_state_dict)
    if not os.path.exists(path):
      raise FileNotFoundError(f'weight file {path} does not exist')
    if path.endswith('.npz'):
      try:
        with np.load(path, allow_pickle=False) as f:
          state = {k: f[k] for k in f.files}
      except Exception as e:  # pylint: disable=broad-except  (zip, pickle, format errors)
        raise ValueError(f'{path} is not a readable .npz of arrays ({type(e).__name__}: {e}); '
                         'save weights with numpy.savez(path, **state_dict)') from e
    else:
      try:
        import torch  # pylint: disable=g-import-not-at-top
      except ImportError as e:
        raise ImportError(f'reading {path} needs PyTorch: pip install "smallssd-jax[convert]", '
                          'or save the state dict as .npz (numpy.savez(path, **state_dict))') from e
      state = torch.load(path, map_location='cpu', weights_only=True)
  for wrapper in ('state_dict', 'model'):
    if isinstance(state.get(wrapper), Mapping):
      state = state[wrapper]
  return {str(k): _to_numpy(v) for k, v in state.items()}


# ---------------------------------------------------------- conversions ---


def conv_weight(w: np.ndarray) -> np.ndarray:
  """PyTorch OIHW conv weight -> Flax HWIO kernel."""
  return np.transpose(w, (2, 3, 1, 0))


def conv_transpose_weight(w: np.ndarray) -> np.ndarray:
  """PyTorch ConvTranspose2d weight `[in, out, kh, kw]` -> `layers.ConvTranspose2d` HWIO."""
  return np.transpose(w, (2, 3, 0, 1))


def _xy_to_yx(values: np.ndarray) -> np.ndarray:
  """Swaps x and y within every group of 4 along axis 0 ([dx, dy, dw, dh] -> [dy, dx, dh, dw])."""
  n = values.shape[0]
  grouped = values.reshape((n // 4, 4) + values.shape[1:])
  return grouped[:, [1, 0, 3, 2]].reshape(values.shape)


def decimate_fc6(w: np.ndarray, conv5_channels: int) -> np.ndarray:
  """classifier.0 weight (4096 x 512*7*7) -> fc6 (1024 x 512 x 3 x 3), SSD / ParseNet decimation."""
  return w.reshape(w.shape[0], conv5_channels, 7, 7)[::4, :, ::3, ::3]


def decimate_fc7(w: np.ndarray) -> np.ndarray:
  """classifier.3 weight (4096 x 4096) -> fc7 (1024 x 1024 x 1 x 1)."""
  return w[::4, ::4, None, None]


@dataclasses.dataclass(frozen=True)
class _Tensor:
  """One Flax parameter made from state-dict tensors by `make(*tensors)`."""
  path: tuple[str, ...]        # under params
  keys: tuple[str, ...]        # state-dict keys read
  make: Callable[..., np.ndarray]


def _conv(prefix: str, path: tuple[str, ...], weight_fn=conv_weight, bias_fn=lambda b: b
          ) -> list[_Tensor]:
  return [_Tensor(path + ('kernel',), (f'{prefix}.weight',), lambda w: weight_fn(w)),
          _Tensor(path + ('bias',), (f'{prefix}.bias',), bias_fn)]


def _flip_input(kernel: np.ndarray) -> np.ndarray:
  return kernel[:, :, ::-1, :]


def _vgg_convs(prefix: str, conv1_1_fn: Callable[[np.ndarray], np.ndarray] | None = None
               ) -> list[_Tensor]:
  out = []
  for name, index in zip(VGG16_CONVS, VGG16_FEATURE_INDICES):
    fn = conv_weight
    if name == 'conv1_1' and conv1_1_fn is not None:
      fn = lambda w, f=conv1_1_fn: f(conv_weight(w))
    out += _conv(f'{prefix}{index}', ('backbone', name), fn)
  return out


def torchvision_vgg16_tensors(fold_imagenet_std: bool = True, bgr_input: bool = False
                              ) -> list[_Tensor]:
  """The backbone tensors of torchvision's ImageNet `vgg16` (see the module doc)."""
  def conv1_1(kernel):  # HWIO, I in RGB order
    if fold_imagenet_std:
      kernel = kernel / (255.0 * np.asarray(IMAGENET_STD_RGB, np.float32))[None, None, :, None]
    return _flip_input(kernel) if bgr_input else kernel

  return _vgg_convs('features.', conv1_1) + [
      # features.28 (conv5_3) is read for its channel count, which fc6's input is.
      _Tensor(('backbone', 'fc6', 'kernel'), ('classifier.0.weight', 'features.28.weight'),
              lambda w, conv5_3: conv_weight(decimate_fc6(w, conv5_3.shape[0]))),
      _Tensor(('backbone', 'fc6', 'bias'), ('classifier.0.bias',), lambda b: b[::4]),
      _Tensor(('backbone', 'fc7', 'kernel'), ('classifier.3.weight',),
              lambda w: conv_weight(decimate_fc7(w))),
      _Tensor(('backbone', 'fc7', 'bias'), ('classifier.3.bias',), lambda b: b[::4]),
  ]


def reduced_fc_vgg16_tensors(bgr_input: bool = False) -> list[_Tensor]:
  """The tensors of SSD's `vgg16_reducedfc.pth` (ssd.pytorch ModuleList indices)."""
  return (_vgg_convs('', None if bgr_input else _flip_input)
          + _conv('31', ('backbone', 'fc6')) + _conv('33', ('backbone', 'fc7')))


def torchvision_ssd300_backbone_tensors(bgr_input: bool = False) -> list[_Tensor]:
  """torchvision ssd300_vgg16's VGG part: conv1_1 ... fc7 and the conv4_3 L2Norm scale."""
  out = []
  for name, index in zip(VGG16_CONVS, VGG16_FEATURE_INDICES):
    if index < 23:   # `backbone.features` = vgg.features[:23], up to conv4_3's ReLU
      prefix = f'backbone.features.{index}'
    else:            # `backbone.extra.0` = vgg.features[23:30] (pool4, conv5_x) + fc
      prefix = f'backbone.extra.0.{index - 23}'
    fn = conv_weight
    if bgr_input and name == 'conv1_1':
      fn = lambda w: _flip_input(conv_weight(w))
    out += _conv(prefix, ('backbone', name), fn)
  out += _conv('backbone.extra.0.7.1', ('backbone', 'fc6'))
  out += _conv('backbone.extra.0.7.3', ('backbone', 'fc7'))
  out.append(_Tensor(('backbone', 'l2norm_conv4_3', 'scale'), ('backbone.scale_weight',),
                     lambda s: s))
  return out


def torchvision_ssd300_extra_tensors() -> list[_Tensor]:
  """conv8_1 ... conv11_2 (`backbone.extra.1` ... `.4`, each a 1x1 then a 3x3 conv)."""
  out = []
  for i, name in enumerate(SSD300_EXTRAS):
    out += _conv(f'backbone.extra.{i // 2 + 1}.{2 * (i % 2)}', ('backbone', name))
  return out


def torchvision_ssd300_head_tensors(num_levels: int = 6) -> list[_Tensor]:
  """The SSD head, box outputs reordered from torchvision's [dx, dy, dw, dh] to [dy, dx, dh, dw]."""
  out = []
  for level in range(num_levels):
    out += _conv(f'head.classification_head.module_list.{level}',
                 ('head', 'classification', f'level{level}'))
    out += _conv(f'head.regression_head.module_list.{level}',
                 ('head', 'regression', f'level{level}'),
                 weight_fn=lambda w: conv_weight(_xy_to_yx(w)), bias_fn=_xy_to_yx)
  return out


class StateDictMismatch(ValueError):
  """A state dict that does not fit the model: keys missing, unexpected or mis-shaped."""


def _flatten(params: PyTree) -> dict[tuple[str, ...], Any]:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(params))


def _convert(state: StateDict, tensors: Sequence[_Tensor], flat: dict[tuple[str, ...], Any]
             ) -> tuple[dict[tuple[str, ...], np.ndarray], list[str], list[str], list[str]]:
  """Makes every tensor; returns (converted, missing keys, mis-shaped descriptions, read keys)."""
  converted, missing, misshaped, read = {}, [], [], []
  for t in tensors:
    absent = [k for k in t.keys if k not in state]
    if absent:
      missing += [k for k in absent if k not in missing]
      continue
    read += list(t.keys)
    name = '/'.join(t.path)
    if t.path not in flat:
      misshaped.append(f'{t.keys[0]}: the model has no parameter {name}')
      continue
    try:
      value = np.asarray(t.make(*(state[k] for k in t.keys)), np.float32)
    except ValueError as e:  # a reshape that cannot work (decimation of odd shapes)
      misshaped.append(f'{t.keys[0]} {tuple(state[t.keys[0]].shape)}: {e}')
      continue
    want = tuple(flat[t.path].shape)
    if value.shape != want:
      misshaped.append(f'{t.keys[0]} {tuple(state[t.keys[0]].shape)} -> {value.shape}, '
                       f'but {name} is {want}')
      continue
    converted[t.path] = value.astype(flat[t.path].dtype)
  return converted, missing, misshaped, read


def _raise_mismatch(what: str, missing: Sequence[str], unexpected: Sequence[str],
                    misshaped: Sequence[str], unset: Sequence[str] = ()) -> None:
  if not (missing or unexpected or misshaped or unset):
    return
  lines = [f'{what}: the state dict does not fit the model.']
  for title, items in (('missing keys', missing), ('unexpected keys', unexpected),
                       ('mis-shaped keys', misshaped),
                       ('model parameters the state dict does not set', unset)):
    if items:
      lines.append(f'  {title} ({len(items)}):')
      lines += [f'    {item}' for item in items]
  raise StateDictMismatch('\n'.join(lines))


def _apply(params: PyTree, converted: Mapping[tuple[str, ...], np.ndarray]) -> PyTree:
  flat = _flatten(params)
  flat.update(converted)
  return flax.traverse_util.unflatten_dict(flat)


def _convert_strict(what: str, state: StateDict, tensors: Sequence[_Tensor], params: PyTree,
                    ignore: Callable[[str], bool] = lambda k: False,
                    require_all: bool = False) -> PyTree:
  flat = _flatten(params)
  converted, missing, misshaped, read = _convert(state, tensors, flat)
  unexpected = sorted(k for k in set(state) - set(read) if not ignore(k))
  unset = ['/'.join(p) for p in flat if p not in converted] if require_all else []
  _raise_mismatch(what, missing, unexpected, misshaped, unset)
  return _apply(params, converted)


def convert_vgg16(state_dict: StateDict, params: PyTree, *, fold_imagenet_std: bool = True,
                  bgr_input: bool = False) -> PyTree:
  """torchvision `vgg16` ImageNet weights -> the backbone's conv1_1 ... fc7 in `params`.

  Everything else in `params` (extra layers, necks, heads, L2Norm scales) is
  left as it is. `classifier.6` (the 1000-way classifier) is ignored.

  Args:
    state_dict: torchvision `vgg16().state_dict()` as NumPy arrays (`read_state_dict`).
    params: the detector's `params` tree (arrays or `jax.ShapeDtypeStruct`s).
    fold_imagenet_std: divide conv1_1 by 255 * ImageNet std so that the
      model takes 0..255 mean-subtracted input (the library's normalisation).
    bgr_input: the model will be fed BGR images (conv1_1's channels reversed).
  """
  return _convert_strict('torchvision vgg16', state_dict,
                         torchvision_vgg16_tensors(fold_imagenet_std, bgr_input), params,
                         ignore=lambda k: k.startswith('classifier.6.'))


def convert_reduced_fc_vgg16(state_dict: StateDict, params: PyTree, *,
                             bgr_input: bool = False) -> PyTree:
  """SSD's `vgg16_reducedfc.pth` -> the backbone's conv1_1 ... fc7.

  The weights were trained on BGR input minus (104, 117, 123); unless
  `bgr_input`, conv1_1's input channels are reversed so the model takes RGB
  minus (123, 117, 104) as torchvision's port of the same weights does.
  """
  return _convert_strict('reduced-fc vgg16', state_dict, reduced_fc_vgg16_tensors(bgr_input),
                         params)


def convert_torchvision_ssd300(state_dict: StateDict, params: PyTree, *,
                               bgr_input: bool = False) -> PyTree:
  """torchvision `ssd300_vgg16` -> every parameter of our SSD300 (all must be set)."""
  tensors = (torchvision_ssd300_backbone_tensors(bgr_input) + torchvision_ssd300_extra_tensors()
             + torchvision_ssd300_head_tensors())
  return _convert_strict('torchvision ssd300_vgg16', state_dict, tensors, params, require_all=True)


# ------------------------------------------------------------ SSD300 ---


def torchvision_ssd300_config(num_classes: int = 91,
                              width: float = 1.0) -> ml_collections.ConfigDict:
  """`model` and `anchors` configs of torchvision's `ssd300_vgg16` (COCO priors, clipped).

  Images: RGB, `255 * x - (123, 117, 104)` (torchvision's image_mean
  (0.48235, 0.45882, 0.40784) with std 1/255), no std division.
  """
  preset = config_blocks.ssd_model(300, num_classes)
  preset.model.width = width
  preset.anchors = ml_collections.ConfigDict(dict(
      style='ssd',
      feature_maps=list(preset.anchors.feature_maps),   # 38, 19, 10, 5, 3, 1
      steps=[8, 16, 32, 64, 100, 300],
      scales=list(TORCHVISION_SSD300_SCALES),
      aspect_ratios=[[2], [2, 3], [2, 3], [2, 3], [2], [2]],
      clip=True,
  ))
  return preset


def load_torchvision_ssd300(path_or_state_dict: str | os.PathLike | StateDict,
                            num_classes: int = 91) -> tuple[models.Detector, PyTree, np.ndarray]:
  """A Flax SSD300 carrying torchvision `ssd300_vgg16` weights (docs/design.md §8).

  Args:
    path_or_state_dict: a `.pth` (needs torch) or `.npz` file, or a state dict.
    num_classes: classes including background (91 for torchvision's COCO model).

  Returns:
    `(model, variables, anchors)`: `model.apply(variables, images)` on
    `[B, 300, 300, 3]` RGB images normalised as `255 * x - (123, 117, 104)`
    returns `cls_logits [B, 8732, num_classes]` and `box_deltas [B, 8732, 4]`
    (`[dy, dx, dh, dw]`); `anchors` is float32 `[8732, 4]` `[cy, cx, h, w]`
    normalised (torchvision's COCO priors), so
    `decode_boxes(out['box_deltas'], anchors)` gives `[ymin, xmin, ymax, xmax]`
    boxes normalised to [0, 1].
  """
  state = read_state_dict(path_or_state_dict)
  config = torchvision_ssd300_config(num_classes)
  model = models.build_detector(config.model, anchors_lib.anchors_per_location(config.anchors))
  params = convert_torchvision_ssd300(state, models.abstract_variables(model)['params'])
  variables = {'params': jax.tree.map(jnp.asarray, params)}
  priors = anchors_lib.from_config(config.anchors, 300)
  models.check_anchor_count(model, config.model, priors.shape[0])
  return model, variables, priors


# ------------------------------------------------------ init_from files ---


def detect_format(state_dict: StateDict) -> str:
  """'torchvision_ssd300' | 'torchvision_vgg16' | 'reduced_fc_vgg16', from the keys."""
  if 'backbone.features.0.weight' in state_dict:
    return 'torchvision_ssd300'
  if 'features.0.weight' in state_dict and 'classifier.0.weight' in state_dict:
    return 'torchvision_vgg16'
  if '0.weight' in state_dict and '31.weight' in state_dict:
    return 'reduced_fc_vgg16'
  sample = sorted(state_dict)[:6]
  raise ValueError('unrecognised state dict: expected torchvision ssd300_vgg16 '
                   "('backbone.features.0.weight'), torchvision vgg16 ('features.0.weight', "
                   "'classifier.0.weight') or SSD's reduced-fc VGG16 ('0.weight' ... '33.weight'); "
                   f'got keys like {sample}')


def load_pretrained(path_or_state_dict: str | os.PathLike | StateDict, params: PyTree,
                    model_cfg: ml_collections.ConfigDict | None = None, *,
                    bgr_input: bool = False) -> tuple[PyTree, str]:
  """Starts any detector from a VGG16 / SSD300 weight file (`config.init_from`).

  The VGG16 part must fit exactly (any mismatch raises). From an
  `ssd300_vgg16` file, the extra layers conv8_1 ... conv11_2 and the heads
  are taken too where the model has them with the same shapes (an SSD300 with
  another class count keeps its own heads; DF-SSD keeps the extra layers);
  the report says what was loaded and what was left at its initialisation.

  Args:
    path_or_state_dict: `.pth`, `.npz` or a state dict, in any of the three layouts.
    params: the model's `params` tree.
    model_cfg: `config.model` (only named in the report).
    bgr_input: the data pipeline feeds BGR (`config.data.bgr`).

  Returns:
    `(params, report)`.
  """
  if model_cfg is not None and model_cfg.backbone_batch_norm:
    where = 'a state dict' if isinstance(path_or_state_dict, Mapping) else repr(path_or_state_dict)
    raise ValueError(f'init_from {where}: model.backbone_batch_norm=True, but the '
                     'VGG16 / SSD300 weight files have no BatchNorm in the backbone; set '
                     'model.backbone_batch_norm=False to start from them')
  state = read_state_dict(path_or_state_dict)
  kind = detect_format(state)
  name = model_cfg.name if model_cfg is not None else 'model'
  if kind == 'torchvision_vgg16':
    out = convert_vgg16(state, params, bgr_input=bgr_input)
    return out, (f'{name}: VGG16 conv1_1..conv5_3 from torchvision vgg16, fc6/fc7 decimated from '
                 'classifier.0/3, conv1_1 scaled by 1/(255 std); the rest left at init')
  if kind == 'reduced_fc_vgg16':
    out = convert_reduced_fc_vgg16(state, params, bgr_input=bgr_input)
    order = 'BGR' if bgr_input else 'RGB (conv1_1 channels reversed)'
    return out, (f'{name}: VGG16 conv1_1..fc7 from the reduced-fc VGG16, {order}; '
                 'the rest left at init')

  flat = _flatten(params)
  backbone = torchvision_ssd300_backbone_tensors(bgr_input)
  if ('backbone', 'l2norm_conv4_3', 'scale') not in flat:
    backbone = backbone[:-1]
  converted, missing, misshaped, read = _convert(state, backbone, flat)
  _raise_mismatch('ssd300_vgg16 backbone', missing, [], misshaped)
  parts = ['VGG16 conv1_1..fc7 + conv4_3 L2Norm']
  skipped = []
  for label, tensors in (('extra layers conv8_1..conv11_2', torchvision_ssd300_extra_tensors()),
                         ('SSD heads', torchvision_ssd300_head_tensors())):
    got, part_missing, part_misshaped, part_read = _convert(state, tensors, flat)
    read += part_read
    if part_missing or part_misshaped:
      skipped.append(f'{label} ({len(part_missing) + len(part_misshaped)} tensors do not fit)')
    else:
      converted.update(got)
      parts.append(label)
  unexpected = sorted(set(state) - set(read) - {'backbone.scale_weight'})
  _raise_mismatch('ssd300_vgg16', [], unexpected, [])
  report = f'{name}: from torchvision ssd300_vgg16: {", ".join(parts)}'
  if skipped:
    report += f'; left at init: {", ".join(skipped)}'
  return _apply(params, converted), report
