"""KITTI 2D detection AP as the DF-SSD paper reports it ('kitti').

The paper merges KITTI's 8 classes into 3 (1 pedestrian = Pedestrian +
Person_sitting, 2 vehicle = Car + Van + Truck + Tram, 3 other = Cyclist +
Misc) and reports "VOC-style" mAP. Our reading: the VOC devkit's matching,
IoU (inclusive pixel widths, as for KITTI converted to VOC format) and AP
(`voc.py`) at IoU 0.5, with the VOC2007 11-point AP by default
(`use_07_metric=False` gives the area AP), and DontCare regions ignored.

DontCare regions belong to no class, so every ground truth flagged `ignore`
is made an ignored (difficult-like) object of every class, whatever label
the loader gave it: a detection of any class whose best overlap is a
DontCare region with IoU >= 0.5 is neither a true nor a false positive, and
DontCare never counts as a positive.

The official KITTI benchmark metric (easy / moderate / hard, 40 recall
points, IoU 0.7 for vehicles) is not implemented. Notes for whoever adds it,
from the devkit's `evaluate_object.cpp` (its C++ is the authority; the popular
Python port differs): ground truth is too small when `y2 - y1 < MIN_HEIGHT`
(the port writes `<=`); a detection's height is truncated to an int before
`< MIN_HEIGHT`, and a too-small detection of ANY class is "ignored" rather
than skipped, so it can absorb an object of the evaluated class; score
thresholds come from a first pass that assigns each object its highest-scoring
detection, precision at each threshold from a second pass that assigns the
highest-overlap detection; a detection whose overlap with a DontCare region,
over its own area, exceeds the class IoU is not a false positive.

Boxes are `[ymin, xmin, ymax, xmax]` in pixels.
"""

from __future__ import annotations

import numpy as np

from smallssd_jax.metrics import inputs
from smallssd_jax.metrics import voc

CLASS_NAMES = ('pedestrian', 'vehicle', 'other')
NUM_CLASSES = len(CLASS_NAMES)


def dont_care_for_every_class(gt: inputs.GroundTruth,
                              num_classes: int = NUM_CLASSES) -> inputs.GroundTruth:
  """Ground truth with each `ignore` box repeated as an ignored object of every class."""
  real = np.flatnonzero(~gt.ignore)
  dont_care = np.flatnonzero(gt.ignore)
  index = np.concatenate([real, np.repeat(dont_care, num_classes)])
  labels = np.concatenate([gt.labels[real], np.tile(np.arange(1, num_classes + 1),
                                                    len(dont_care))])
  # Image-major order, as the matcher's tie-breaking expects of flat inputs.
  order = np.argsort(gt.image[index], kind='stable')
  index, labels = index[order], labels[order]
  return inputs.GroundTruth(
      image=gt.image[index], boxes=gt.boxes[index], labels=labels, ignore=gt.ignore[index],
      area=gt.area[index],
      occluded=gt.occluded[index], truncated=gt.truncated[index], image_sizes=gt.image_sizes)


def evaluate(gt: inputs.GroundTruth, dets: inputs.Detections,
             use_07_metric: bool = True, iou_threshold: float = 0.5) -> dict[str, float]:
  """VOC-style KITTI AP over the 3 merged classes; keys as `voc.evaluate`."""
  return voc.evaluate(dont_care_for_every_class(gt), dets, NUM_CLASSES,
                      use_07_metric=use_07_metric, iou_threshold=iou_threshold)
