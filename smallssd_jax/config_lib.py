"""Parsing config values: booleans that may be 'auto', and list fields from the command line."""

from __future__ import annotations

import ast
from typing import Any

from absl import flags as absl_flags
from ml_collections import config_flags


_TRUE, _FALSE = ('true', '1', 'yes', 'on'), ('false', '0', 'no', 'off')


def auto_bool(value: Any, field: str) -> bool | str:
  """A config switch that may be 'auto': returns 'auto', True or False.

  Such fields hold the string 'auto' by default, so the command line
  (`--config.data.X=False`) sets them as strings: 'true' / 'false' (any
  case), 1 / 0, yes / no and on / off are read as booleans; anything else is
  an error naming `field`.
  """
  if isinstance(value, bool):
    return value
  text = str(value).strip().lower()
  if text == 'auto':
    return 'auto'
  if text in _TRUE:
    return True
  if text in _FALSE:
    return False
  raise ValueError(f"{field} must be True, False or 'auto', got {value!r}")


def parse_list(value: Any) -> list:
  """A list-valued config field from the command line.

  `'[100, 200]'` or `"['flip', 'zoom_out']"` (Python literals), or comma
  separated items (`100,200`, `flip,zoom_out`), each read as a Python literal
  where it is one and as a string otherwise. An empty string is `[]`.
  """
  if isinstance(value, (list, tuple)):
    return list(value)
  text = str(value).strip()
  if not text:
    return []
  try:
    parsed = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    parsed = None
  if isinstance(parsed, (list, tuple)):
    return list(parsed)

  def item(part: str) -> Any:
    try:
      return ast.literal_eval(part)
    except (ValueError, SyntaxError):
      return part
  return [item(p.strip()) for p in text.split(',')]


class ListParser(absl_flags.ArgumentParser):
  """absl parser for list-valued config fields (`--config.optim.boundaries=100,200`)."""

  def parse(self, argument):
    return parse_list(argument)

  def flag_type(self):
    return 'list'


def register_flag_parsers() -> None:
  """Lets `--config.<field>=...` set list fields too (ml_collections handles scalars and tuples)."""
  config_flags.register_flag_parser_for_type(list, ListParser())
