"""Detection data: sources (tfds, native folders, built-in), SSD augmentation, grain pipelines.

This package knows nothing of models, losses or training; see pipeline.py for
the batch dict it produces (docs/architecture.md) and records.py for the
example dict every source yields.
"""

from smallssd_jax.datasets.pipeline import make_eval_batches
from smallssd_jax.datasets.pipeline import make_train_iterator
from smallssd_jax.datasets.records import BadExampleError
from smallssd_jax.datasets.sources import class_names
from smallssd_jax.datasets.sources import get_source

__all__ = ['BadExampleError', 'class_names', 'get_source', 'make_eval_batches',
           'make_train_iterator']
