"""Configs as code: import a Python file by path and call its `get_config()`."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def load_config_file(path: str | Path, expected: type | None = None):
  """`get_config()` of the file at `path`; ValueError / FileNotFoundError naming the problem.

  expected: the type get_config() must return (None: anything).
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"config file {path} does not exist")
  spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
  if spec is None or spec.loader is None:
    raise ValueError(f"cannot import {path}")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"{path} has no get_config()")
  config = module.get_config()
  if expected is not None and not isinstance(config, expected):
    raise ValueError(f"{path}: get_config() returned {type(config).__name__}, "
                     f"not a {expected.__name__}")
  return config
