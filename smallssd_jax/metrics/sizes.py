"""COCO object-size buckets, used by every metric.

A box's size is its continuous area `(ymax - ymin) * (xmax - xmin)` in pixels
of the original image; ground truth may bring its own 'area' instead (COCO's
annotation area, the segmentation's, which the official COCO numbers bucket
by). Detections always use their box area, as pycocotools does.
The bounds are pycocotools' `Params.areaRng`, inclusive at both ends exactly
as pycocotools tests them (`area < lo or area > hi` is outside): an object of
exactly 32^2 pixels is both small and medium.

For VOC and KITTI, AP for a bucket follows the COCO convention: ground truth
outside the bucket is ignored (like a difficult object: a detection matched to
it is neither a true nor a false positive), and a false positive whose own box
lies outside the bucket is dropped; the metric's own matching and AP flavour
are otherwise unchanged.
"""

from __future__ import annotations

import numpy as np

# name -> (lo, hi) area in pixels^2, pycocotools' values.
AREA_RANGES = {
    'all': (0.0, 1e5**2),
    'small': (0.0, 32.0**2),
    'medium': (32.0**2, 96.0**2),
    'large': (96.0**2, 1e5**2),
}

# Result-key suffix of each bucket: 'APs', 'APm', 'APl'.
BUCKET_KEYS = {'small': 's', 'medium': 'm', 'large': 'l'}


def outside(area: np.ndarray, bucket: str) -> np.ndarray:
  """Boolean mask of areas outside `bucket`, with pycocotools' comparisons."""
  lo, hi = AREA_RANGES[bucket]
  return (area < lo) | (area > hi)
