"""Loading config files outside absl (tests, notebooks, the tools)."""

from __future__ import annotations

import importlib.util
import pathlib

import ml_collections


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads `path/to/config.py[:arg]` the way `config_flags.DEFINE_config_file` does."""
  path, _, arg = spec.partition(':')
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'config file not found: {path}')
  module_spec = importlib.util.spec_from_file_location(f'_config_{path.stem}', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()
