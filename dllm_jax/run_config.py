"""The top-level config of a training run: one typed, frozen tree of every section.

It lives apart from `config.py` because its data and objective sections are defined beside the code
that reads them (`data.py`, `objective.py`), which itself imports `config.py`.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import typing
from typing import Sequence

from dllm_jax import config as config_lib
from dllm_jax.config import (CheckpointConfig, ConfigError, InitConfig, MeshConfig, ModelConfig,
                             TrainConfig)
from dllm_jax.data import DataConfig
from dllm_jax.objective import ObjectiveConfig


@dataclasses.dataclass(frozen=True)
class Config:
  model: ModelConfig = ModelConfig()
  init: InitConfig = InitConfig()
  data: DataConfig = DataConfig()
  objective: ObjectiveConfig = ObjectiveConfig()
  train: TrainConfig = TrainConfig()
  mesh: MeshConfig = MeshConfig()
  checkpoint: CheckpointConfig = CheckpointConfig()

  def __post_init__(self):
    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(self):
      if not isinstance(getattr(self, f.name), hints[f.name]):
        raise ConfigError(f"config.{f.name} is a {type(getattr(self, f.name)).__name__}; "
                          f"expected a {hints[f.name].__name__}")
    if self.data.block_size != self.objective.block_size:
      raise ConfigError(f"data.block_size={self.data.block_size} differs from objective.block_size="
                        f"{self.objective.block_size}; set both to the same value")


def load(path: str | pathlib.Path, overrides: Sequence[str] = ()) -> Config:
  """A config file (Python defining `get_config() -> Config`, or a run's config.json, which
  `--resume` can then be given as it is) with `--set` overrides applied."""
  path = pathlib.Path(path)
  if path.suffix == ".json" and path.is_file():
    try:
      cfg = from_json(path.read_text(encoding="utf-8"), str(path))
    except (ValueError, TypeError) as e:  # (JSON, UTF-8 and field errors; ConfigError is one)
      raise ConfigError(e if isinstance(e, ConfigError) else f"config file {path}: {e}") from None
    return config_lib.apply_overrides(cfg, overrides)
  cfg = config_lib.load_config_file(path)
  if not isinstance(cfg, Config):
    raise ConfigError(f"config file {path}: get_config() returned a {type(cfg).__name__}; it must "
                      "return dllm_jax.run_config.Config")
  return config_lib.apply_overrides(cfg, overrides)


def to_json(cfg: Config) -> str:
  return json.dumps(config_lib.to_dict(cfg), indent=2)


def from_json(text: str, where: str = "config.json") -> Config:
  """A run's config.json (`to_json`) as the Config it was; every section is required, since one
  missing would silently take its defaults."""
  raw = json.loads(text)
  missing = [f.name for f in dataclasses.fields(Config)
             if not isinstance(raw, dict) or f.name not in raw]
  if missing:
    raise ConfigError(f"config file {where} is not a run's config.json (it lacks the sections "
                      f"{missing}); give the one a run wrote, or a .py config")
  return config_lib.from_dict(Config, raw, where)
