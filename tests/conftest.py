"""Shared test setup: CPU only, absl flags parsed (grain workers need them)."""

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import smallssd_jax  # noqa: E402
from absl import flags  # noqa: E402

smallssd_jax.apply_cpu_xla_defaults()     # as the command-line entry points do, before JAX starts

flags.FLAGS.mark_as_parsed()
