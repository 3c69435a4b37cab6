"""Detector modules (pure Flax linen): VGG16 backbones, DF-SSD / SkipFPN-GRF necks, heads.

`build_detector(config.model, anchors_per_location)` is the entry point; the
parts are importable for reuse and tests.
"""

from smallssd_jax.models.detector import BACKBONES
from smallssd_jax.models.detector import Detector
from smallssd_jax.models.detector import HEADS
from smallssd_jax.models.detector import NECKS
from smallssd_jax.models.detector import abstract_variables
from smallssd_jax.models.detector import build_detector
from smallssd_jax.models.detector import check_anchor_count
from smallssd_jax.models.detector import feature_map_shapes
from smallssd_jax.models.detector import output_shapes
from smallssd_jax.models.layers import count_params

__all__ = [
    'BACKBONES', 'Detector', 'HEADS', 'NECKS', 'abstract_variables', 'build_detector',
    'check_anchor_count', 'count_params', 'feature_map_shapes', 'output_shapes',
]
