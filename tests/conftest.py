import importlib.util
import os
import pathlib

import pytest

# Eight fake CPU devices for the sharding tests; set before jax is first imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture(scope="session")
def load_benchmark():
  """load_benchmark("matvec"): benchmarks/matvec.py as a fresh module (the benchmarks are
  scripts, not a package), so its bookkeeping is tested without a GPU."""
  root = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"

  def load(name):
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", root / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
  return load
