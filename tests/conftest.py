"""Shared test setup: CPU only, absl flags parsed (grain workers need them)."""

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import smallssd_jax  # noqa: E402,F401  (applies the CPU XLA defaults first)
from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()
