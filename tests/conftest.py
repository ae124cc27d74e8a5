import importlib.util
import os
import pathlib

import pytest

# Eight fake CPU devices for the sharding tests; set before jax is first imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compile without LLVM's optimizations: most of the suite's time is XLA compiling small test
# programs (one interpreted kernel test: 96 compiles, 11 of its 18 s), each run once or a few
# times, so faster compiles outweigh slower code (a sample of 23 tests: 151 s -> 108 s). The
# programs compute the same values; the subprocesses the tests start (train.py, the jax 0.11
# run) inherit it. DLLM_TEST_OPTIMIZE=1 compiles as users do.
if os.environ.get("DLLM_TEST_OPTIMIZE") != "1":
  os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# XLA's CPU client runs host callbacks on a pool as large as the cores (2 in CI). The Mosaic GPU
# interpreter runs each warpgroup of a CTA as its own execution whose barrier waits block in such
# callbacks: with three warpgroups, two waiting ones can hold both threads while the third never
# starts (a hang seen under jax 0.10.2 and 0.11.2, always with the race detector, once without).
# PJRT_NPROC sizes that pool (at least 8, whatever the environment says).
if int(os.environ.get("PJRT_NPROC") or 0) < 8:
  os.environ["PJRT_NPROC"] = "8"


# A test that runs past this many seconds fails instead of hanging the suite: a kernel whose
# barriers deadlock under the interpreter blocks in a host callback forever, where no exception
# can reach it. pytest-timeout's thread method dumps every thread's stack and ends the process
# (under xdist, the worker: reported as that test's failure). 600 s is ~3x the slowest test
# (jax 0.11's kernel checks, ~175 s on a 2-core machine). DLLM_TEST_TIMEOUT_S overrides it.
TEST_TIMEOUT_S = float(os.environ.get("DLLM_TEST_TIMEOUT_S") or 600)


def pytest_configure(config):
  if not config.pluginmanager.hasplugin("timeout"):
    raise pytest.UsageError(
        "tests/conftest.py: the pytest-timeout plugin is missing, so a deadlocked kernel test "
        "would hang the suite instead of failing; install the test dependencies with "
        "`python3 -m pip install -r requirements-dev.txt`")


# Run first: tests/test_jax011.py is one test of ~4-7 minutes (a whole pytest run under jax 0.11).
# Collected in file order it starts mid-suite, and if it is handed out late, one worker runs it
# alone at the end while the other idles.
FIRST = ("tests/test_jax011.py",)


def pytest_collection_modifyitems(config, items):
  for item in items:
    if item.get_closest_marker("timeout") is None:
      item.add_marker(pytest.mark.timeout(TEST_TIMEOUT_S, method="thread"))
  items.sort(key=lambda item: not item.nodeid.startswith(FIRST))  # stable: the rest keep order


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


@pytest.fixture(scope="session")
def lower_for_cuda():
  """lower_for_cuda(fn, *args): the text of jit(fn) lowered for CUDA on the CPU, targeting an
  H200: jax 0.11's Triton lowering asks the device for its compute capability and, with no GPU,
  takes it from an abstract device (jax 0.10's lowers the same under it)."""
  import jax

  device = jax.sharding.AbstractDevice("NVIDIA H200", None, "cuda")
  mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)

  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def lower(fn, *args):
    # The arguments on the mesh too: an argument without it and a value computed under it have
    # different avals, so jit sites that share one lowering on a GPU would not share it here.
    args = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated)
            if isinstance(a, jax.ShapeDtypeStruct) and a.sharding is None else a for a in args]
    with jax.sharding.use_abstract_mesh(mesh):
      return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  return lower
