"""The built-in dataset written out as a YOLO-format (or VOC-style) folder: data you can
train on as your own (`configs/custom.py`), and an end-to-end check of those readers.

  python -m smallssd_jax.tools.export_builtin --out=/tmp/builtin_yolo [--format=yolo|voc] \
      [--config=configs/default.py] [--train=512] [--val=150]

Splits: the built-in train split as 'train', its test split as 'val'. Images
are PNG (lossless: the same pixels as the generated ones).
"""

from __future__ import annotations

import pathlib
from xml.etree import ElementTree

from absl import app
from absl import flags
from PIL import Image

from smallssd_jax import _xla
from smallssd_jax.datasets import builtin


def write_yolo(cfg, out: str, counts: dict[str, int]) -> str:
  """`cfg`: a `data.builtin` block; `counts`: {'train': n, 'val': n}. Returns `out`."""
  root = pathlib.Path(out)
  names = builtin.SHAPES[:int(cfg.num_classes)]
  root.mkdir(parents=True, exist_ok=True)
  (root / 'data.yaml').write_text('names:\n' + ''.join(f'  - {n}\n' for n in names))
  for split, n in counts.items():
    images, labels = root / 'images' / split, root / 'labels' / split
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    for i in range(n):
      ex = builtin.render(cfg, 'train' if split == 'train' else 'test', i)
      Image.fromarray(ex['image']).save(images / f'{i:06d}.png')
      lines = []
      for (y0, x0, y1, x1), label in zip(ex['boxes'], ex['labels']):
        lines.append(f'{int(label) - 1} {(x0 + x1) / 2:.6f} {(y0 + y1) / 2:.6f} '
                     f'{x1 - x0:.6f} {y1 - y0:.6f}')
      (labels / f'{i:06d}.txt').write_text('\n'.join(lines) + ('\n' if lines else ''))
  return out


def write_voc(cfg, out: str, counts: dict[str, int]) -> str:
  """The same as a VOC-style folder (1-based inclusive pixel boxes, as the devkit)."""
  root = pathlib.Path(out)
  names = builtin.SHAPES[:int(cfg.num_classes)]
  for sub in ('Annotations', 'JPEGImages', 'ImageSets/Main'):
    (root / sub).mkdir(parents=True, exist_ok=True)
  (root / 'classes.txt').write_text(''.join(f'{n}\n' for n in names))
  for split, n in counts.items():
    ids = []
    for i in range(n):
      ex = builtin.render(cfg, 'train' if split == 'train' else 'test', i)
      image_id = f'{split}_{i:06d}'
      ids.append(image_id)
      # PNG bytes under the .jpg name the VOC reader expects: decoders read the content.
      Image.fromarray(ex['image']).save(root / 'JPEGImages' / f'{image_id}.jpg', format='PNG')
      h, w = ex['image'].shape[:2]
      ann = ElementTree.Element('annotation')
      size = ElementTree.SubElement(ann, 'size')
      for tag, v in (('width', w), ('height', h), ('depth', 3)):
        ElementTree.SubElement(size, tag).text = str(v)
      for (y0, x0, y1, x1), label in zip(ex['boxes'], ex['labels']):
        obj = ElementTree.SubElement(ann, 'object')
        ElementTree.SubElement(obj, 'name').text = names[int(label) - 1]
        ElementTree.SubElement(obj, 'difficult').text = '0'
        box = ElementTree.SubElement(obj, 'bndbox')
        for tag, v in (('xmin', x0 * w), ('ymin', y0 * h), ('xmax', x1 * w), ('ymax', y1 * h)):
          ElementTree.SubElement(box, tag).text = str(int(round(v)) + (1 if 'min' in tag else 0))
      ElementTree.ElementTree(ann).write(root / 'Annotations' / f'{image_id}.xml')
    (root / 'ImageSets' / 'Main' / f'{split}.txt').write_text('\n'.join(ids) + '\n')
  return out


def main(argv):
  del argv
  from smallssd_jax import config_blocks  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  cfg = config_blocks.load_config(f.config).data.builtin
  writer = {'yolo': write_yolo, 'voc': write_voc}[f.format]
  out = writer(cfg, f.out, {'train': f.train, 'val': f.val})
  print(f'wrote {f.train} train and {f.val} val images to {out} ({f.format})')


if __name__ == '__main__':
  _xla.apply_cpu_xla_defaults()     # before any JAX backend starts
  flags.DEFINE_string('out', None, 'Folder to write.')
  flags.DEFINE_enum('format', 'yolo', ['yolo', 'voc'], 'Folder layout.')
  flags.DEFINE_string('config', 'configs/default.py', 'Config whose built-in data to write.')
  flags.DEFINE_integer('train', 512, 'Train images.')
  flags.DEFINE_integer('val', 150, 'Validation images.')
  flags.mark_flags_as_required(['out'])
  app.run(main)
