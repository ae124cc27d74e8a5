"""The suite's own settings (tests/conftest.py): its guard against hangs (a test blocked for good, as
a kernel whose barriers deadlock under the interpreter is, fails with its stack instead of stalling
CI), and its compiles without LLVM's optimizations."""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest


def test_every_test_carries_the_timeout(request):
  marker = request.node.get_closest_marker("timeout")
  assert marker is not None and marker.kwargs.get("method") == "thread"
  assert marker.args[0] > 0


def test_a_blocked_test_fails_instead_of_hanging(tmp_path):
  # A copy of the suite's conftest beside a test that waits forever on an event nobody sets
  # (the interpreter's deadlocked barrier wait, in miniature), with a 3-s limit.
  shutil.copy(pathlib.Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
  (tmp_path / "test_blocked.py").write_text(
      "import threading\n\ndef test_blocked():\n  threading.Event().wait()\n")
  env = dict(os.environ, DLLM_TEST_TIMEOUT_S="3")
  try:
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "test_blocked.py"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
  except subprocess.TimeoutExpired:
    pytest.fail("the blocked test was still running after 120 s: no timeout ended it")
  out = done.stdout + done.stderr
  assert done.returncode != 0, out
  assert "Timeout" in out and "test_blocked" in out, out


def test_the_suite_compiles_without_llvm_optimizations():
  # (tests/conftest.py: the suite's time is mostly compiling; DLLM_TEST_OPTIMIZE=1 turns it off)
  import jax
  on = jax.config.values["jax_disable_most_optimizations"]
  assert on == (os.environ.get("DLLM_TEST_OPTIMIZE") != "1")
