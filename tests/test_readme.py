"""The README's Python examples run as written, and print what the README says they print: a
user's first contact with the project must not rot while the code around it changes."""

import contextlib
import io
import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks():
  """[(code, the README text that follows it up to the next block)] for each ```python block."""
  text = README.read_text(encoding="utf-8")
  parts = re.split(r"```python\n(.*?)```", text, flags=re.S)
  # re.split alternates prose and captured code: prose, code, prose, code, ..., prose.
  return [(parts[i], parts[i + 1]) for i in range(1, len(parts), 2)]


def _run(code):
  namespace, out = {"__name__": "readme_example"}, io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(compile(code, str(README), "exec"), namespace)  # pylint: disable=exec-used
  return namespace, out.getvalue()


def test_readme_has_the_examples_this_file_checks():
  blocks = [code for code, _ in _python_blocks()]
  assert len(blocks) == 2, f"README.md has {len(blocks)} python blocks: update this test"
  assert "load_pretrained" in blocks[0] and "def pipeline" in blocks[1]


def test_quick_start_prints_what_the_readme_says():
  code, after = _python_blocks()[0]
  claim = re.match(r"\s*prints `([^`]+)`", after)
  assert claim, "the quick start's block is no longer followed by 'prints `...`'"
  _, printed = _run(code)
  assert printed.strip().splitlines()[-1] == claim.group(1)


def test_generate_in_your_own_jit_example_runs_as_described():
  code, after = _python_blocks()[1]
  ns, _ = _run(code)
  batch, new = ns["prompts"].shape[0], ns["decode_cfg"].max_new_tokens
  # "`tokens` is `[batch, max_new_tokens]`, valid up to `lengths` (the stop token included)"
  assert "`tokens` is `[batch, max_new_tokens]`" in after
  assert ns["tokens"].shape == (batch, new)
  lengths = np.asarray(ns["lengths"])
  assert lengths.shape == (batch,) and np.all((lengths >= 1) & (lengths <= new))
  per_forward = np.asarray(ns["tokens_per_forward"])
  assert per_forward.shape == (batch,) and np.all(per_forward > 0)
  # A row ends at its first stop token, or at max_new_tokens.
  for row, n in zip(np.asarray(ns["tokens"]), lengths):
    stops = np.flatnonzero(np.isin(row[:n], ns["decode_cfg"].stop_token_ids))
    assert n == new or (stops.size and stops[0] == n - 1)
