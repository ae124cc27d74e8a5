"""Run configs: every shipped config loads, overrides apply, bad keys are clear errors, and the
full-size configs describe the published model sizes (shapes only, nothing allocated)."""

import dataclasses
import math
import pathlib
import textwrap

import jax
import pytest

from dllm_jax import run_config, training
from dllm_jax.config import ConfigError

CONFIGS = sorted((pathlib.Path(__file__).parent.parent / "configs").glob("*.py"))


def test_configs_are_shipped():
  assert {p.stem for p in CONFIGS} >= {"tiny", "smollm2_gsm8k", "qwen2.5_1.5b", "qwen2.5_7b"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
@pytest.mark.parametrize("kind", ["diffusion", "ar"])
def test_every_config_loads_with_either_objective(path, kind):
  cfg = run_config.load(path, [f"objective.kind={kind}"])
  assert isinstance(cfg, run_config.Config)
  assert cfg.objective.kind == kind
  assert cfg.data.block_size == cfg.objective.block_size
  # A run config survives the JSON written into the run directory.
  assert run_config.from_json(run_config.to_json(cfg)) == cfg


def test_overrides_reach_nested_fields_with_types():
  cfg = run_config.load(CONFIGS[0].parent / "tiny.py",
                        ["train.steps=7", "train.learning_rate=1e-4", "mesh.data=2",
                         "mesh.fsdp=4", "model.remat=full", "data.num_epochs=none",
                         "train.export_hf=true", "init.source=/some/dir"])
  assert cfg.train.steps == 7 and isinstance(cfg.train.steps, int)
  assert cfg.train.learning_rate == 1e-4
  assert (cfg.mesh.data, cfg.mesh.fsdp) == (2, 4)
  assert cfg.model.remat == "full"
  assert cfg.data.num_epochs is None
  assert cfg.train.export_hf is True
  assert cfg.init.source == "/some/dir"


def test_override_text_is_read_by_the_field_type():
  tiny = CONFIGS[0].parent / "tiny.py"
  # Every spelling of a boolean, in any case, both ways (a "false" read as true would keep
  # data.shuffle on); None in any case for an Optional field.
  for text, want in (("false", False), ("False", False), ("0", False), ("no", False),
                     ("OFF", False), ("true", True), ("TRUE", True), ("1", True),
                     ("yes", True), ("on", True)):
    assert run_config.load(tiny, [f"data.shuffle={text}"]).data.shuffle is want, text
  for text in ("none", "None", "NULL"):
    assert run_config.load(tiny, [f"data.num_epochs={text}"]).data.num_epochs is None, text
  # Only the first "=" ends the key (a value may hold one, e.g. a path); spaces around a key,
  # as a quoted shell argument may carry, are not part of it.
  assert run_config.load(tiny, ["init.source=/data/a=b"]).init.source == "/data/a=b"
  assert run_config.load(tiny, [" train.steps =12"]).train.steps == 12
  # A tuple is comma-separated, its items of the element type; empty items are dropped.
  for text, want in (("", ()), ("5", (5,)), ("5, 7,", (5, 7))):
    assert run_config.load(tiny, [f"model.stop_token_ids={text}"]).model.stop_token_ids == want
  # The largest 64-bit seed is a seed; one past it is refused (test_bad_values_are_clear_errors).
  assert run_config.load(tiny, [f"train.seed={2**63 - 1}"]).train.seed == 2**63 - 1


def test_fields_that_must_agree_across_sections_change_together():
  tiny = CONFIGS[0].parent / "tiny.py"
  cfg = run_config.load(tiny, ["data.block_size=8", "objective.block_size=8"])
  assert cfg.data.block_size == cfg.objective.block_size == 8
  with pytest.raises(ConfigError, match="differs from objective.block_size"):
    run_config.load(tiny, ["data.block_size=8"])
  # Named by the overrides given, not by the sections they are in ("--set train, objective").
  with pytest.raises(ConfigError, match=r"^--set train.steps=5, objective.block_size=8: "
                                        "data.block_size=16 differs"):
    run_config.load(tiny, ["train.steps=5", "objective.block_size=8"])


def test_unknown_key_lists_the_valid_ones():
  tiny = CONFIGS[0].parent / "tiny.py"
  with pytest.raises(ConfigError) as e:
    run_config.load(tiny, ["train.stepz=3"])
  msg = str(e.value)
  assert "stepz" in msg and "valid keys" in msg
  for name in (f.name for f in dataclasses.fields(training.TrainConfig)):
    assert name in msg
  with pytest.raises(ConfigError, match="valid keys: model, init, data, objective, train, mesh"):
    run_config.load(tiny, ["trian.steps=3"])


def test_repeated_key_is_an_error():
  with pytest.raises(ConfigError, match="given twice"):
    run_config.load(CONFIGS[0].parent / "tiny.py", ["train.steps=3", "train.steps=4"])
  # A section given a value after one of its fields is named as a section, as in the other order.
  with pytest.raises(ConfigError, match="'train' is a section"):
    run_config.load(CONFIGS[0].parent / "tiny.py", ["train.steps=3", "train=5"])


@pytest.mark.parametrize("override, match", [
    ("train.steps=many", "expected an integer"),
    ("train.steps=0", "train.steps=0"),
    ("train.schedule=linear", "expected 'constant' or 'cosine'"),
    ("mesh.data=0", "mesh.data=0"),
    ("objective.block_size=8", "differs from objective.block_size|data.block_size"),
    ("train", "expected KEY=VALUE"),
    ("train=3", "is a section"),
    # Values a run would otherwise take without a word, or fail on far from the setting.
    ("train.min_lr_ratio=-1", r"train.min_lr_ratio=-1.0: expected a value in \[0, 1\]"),
    ("train.schedule=constant", "min_lr_ratio=0.1 applies to the cosine schedule only"),
    ("train.learning_rate=nan", "train.learning_rate=nan: must be a positive number"),
    ("train.adam_b2=1.5", r"train.adam_b2=1.5: expected a value in \[0, 1\)"),
    ("train.grad_clip=-1", "train.grad_clip=-1.0: must be a finite number >= 0"),
    ("train.eval_batches=-3", "train.eval_batches=-3: must be >= 0"),
    ("train.run_dir=", "train.run_dir is empty"),
    ("data.seed=-1", r"data.seed=-1: expected 0 <= seed < 2\*\*32"),
    ("data.max_records=-1", "data.max_records=-1: must be >= 0"),
    ("data.synthetic_size=0", "data.synthetic_size=0: must be at least 1"),
    ("train.seed=99999999999999999999999", "out of range \\(a 64-bit integer\\)"),
    ("mesh.num_processes=-5", "mesh.num_processes=-5, mesh.process_id=-1: expected"),
    ("mesh.process_id=-7", "mesh.process_id=-7: expected"),
    ("model.rope_theta=-5", "model.rope_theta=-5.0: a finite positive number expected"),
    ("model.rms_norm_eps=nan", "model.rms_norm_eps=nan: a finite positive number expected"),
    # An unknown head three keys deep is named like one two deep (was a KeyError).
    ("foo.bar.baz=1", "--set foo.bar.baz: unknown key 'foo' in Config; valid keys"),
    ("model.foo.bar=1", "--set model.foo.bar: unknown key 'foo' in ModelConfig"),
    # A field is not a section to set keys under (unchecked, dataclasses raises a TypeError).
    ("train.steps.x=1", "--set train.steps.x: train.steps is not a config section"),
    # An integer field takes no fraction (2.5 steps truncated to 2 would pass without a word).
    ("train.steps=2.5", "--set train.steps=2.5: expected an integer"),
    # A tuple written as a list: named, with how to write one.
    ("model.stop_token_ids=[1,2]", r"--set model.stop_token_ids=\[1,2\]: an item of it is not int "
     r"\(expected an integer\); write the items comma-separated without brackets, e.g. --set "
     r"model.stop_token_ids=1,2"),
    ("mesh.coordinator_address=nonsense",
     "mesh.coordinator_address='nonsense': expected HOST:PORT"),
    ("train.adam_eps=0", "train.adam_eps=0: must be > 0"),
    ("data.shuffle=maybe", "--set data.shuffle=maybe: expected a boolean"),
    ("train.seed=9223372036854775808", "train.seed=9223372036854775808: out of range"),
    ("train.log_every=0", "train.log_every=0: must be at least 1"),
    ("train.warmup_ratio=1.5", r"train.warmup_ratio=1.5: expected a value in \[0, 1\]"),
    ("data.num_epochs=0", "data.num_epochs=0: must be positive or None"),
    ("data.seed=4294967296", r"data.seed=4294967296: expected 0 <= seed < 2\*\*32"),
])
def test_bad_values_are_clear_errors(override, match):
  with pytest.raises(ConfigError, match=match):
    run_config.load(CONFIGS[0].parent / "tiny.py", [override])


def test_a_config_file_value_of_the_wrong_type_is_named(tmp_path):
  # A config file is Python: shuffle="false" would read as true, a string lr would fail inside
  # optax. Each section checks its fields' types first.
  for section, field, value, want in (("data", "shuffle", '"false"', "bool"),
                                      ("train", "learning_rate", '"1e-4"', "float"),
                                      ("train", "steps", "10.0", "int"),
                                      ("model", "num_layers", "True", "int"),
                                      # (a bool is not a number, an int not a bool, and a
                                      # tuple's items are of its element type)
                                      ("train", "learning_rate", "True", "float"),
                                      ("data", "shuffle", "1", "bool"),
                                      ("model", "stop_token_ids", "(2.5,)",
                                       r"tuple\[int, \.\.\.\]$")):
    bad = tmp_path / f"{field}.py"
    cls = {"data": "DataConfig", "train": "TrainConfig", "model": "ModelConfig"}[section]
    bad.write_text(textwrap.dedent(f"""
        from dllm_jax.config import ModelConfig, TrainConfig
        from dllm_jax.data import DataConfig
        from dllm_jax.run_config import Config
        def get_config():
          return Config({section}={cls}({field}={value}))
        """))
    with pytest.raises(ConfigError, match=f"{section}.{field}=.* expected {want}"):
      run_config.load(bad)
  # An integer past 64 bits, from a file as from --set (it overflowed in the middle of a run).
  for section, field in (("data", "synthetic_size"), ("train", "seed")):
    bad = tmp_path / f"{field}_range.py"
    cls = {"data": "DataConfig", "train": "TrainConfig"}[section]
    bad.write_text(textwrap.dedent(f"""
        from dllm_jax.config import TrainConfig
        from dllm_jax.data import DataConfig
        from dllm_jax.run_config import Config
        def get_config():
          return Config({section}={cls}({field}=10**20))
        """))
    with pytest.raises(ConfigError, match=f"{section}.{field}=10{{20}}: out of range"):
      run_config.load(bad)


def test_two_auto_mesh_axes_is_an_error():
  with pytest.raises(ConfigError, match="at most one axis may be -1"):
    run_config.load(CONFIGS[0].parent / "tiny.py", ["mesh.fsdp=-1"])


def test_config_file_must_return_a_run_config(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("def get_config():\n  return {'train': {}}\n")
  with pytest.raises(ConfigError, match="must return dllm_jax.run_config.Config"):
    run_config.load(bad)
  # A section of the wrong class is named too: it would fail far from the file, mid-run.
  bad.write_text("from dllm_jax.data import DataConfig\nfrom dllm_jax.run_config import Config\n"
                 "def get_config():\n  return Config(train=DataConfig())\n")
  with pytest.raises(ConfigError, match="config.train is a DataConfig; expected a TrainConfig"):
    run_config.load(bad)
  with pytest.raises(ConfigError, match="does not exist"):
    run_config.load(tmp_path / "missing.py")


def test_a_config_file_that_fails_is_one_error_naming_it(tmp_path):
  # Its own error (a field name's typo, a syntax error, an exception) with the file and line,
  # not a traceback; a file that is not Python is named as such.
  for text, match in (("from dllm_jax.config import TrainConfig\ndef get_config():\n"
                       "  return TrainConfig(stpes=5)\n",
                       r"bad.py: TypeError: .*unexpected keyword argument 'stpes' \(line 3\)"),
                      ("def get_config(:\n", r"bad.py: SyntaxError: "),
                      ("get_config = 5\n", "defines no get_config\\(\\) function")):
    bad = tmp_path / "bad.py"
    bad.write_text(text)
    with pytest.raises(ConfigError, match=match):
      run_config.load(bad)
  other = tmp_path / "conf.yaml"
  other.write_text("{}")
  with pytest.raises(ConfigError, match="conf.yaml is not a Python file"):
    run_config.load(other)
  # A JSON config is a run's config.json, whole: a section missing would take its defaults.
  other = tmp_path / "conf.json"
  other.write_text("{}")
  with pytest.raises(ConfigError, match=r"conf.json is not a run's config.json \(it lacks the "
                                        r"sections \['model', 'init'"):
    run_config.load(other)
  other.write_text(run_config.to_json(run_config.Config()))
  assert run_config.load(other, ["train.steps=7"]).train.steps == 7


def test_saved_config_with_unknown_key_is_rejected():
  text = run_config.to_json(run_config.Config()).replace('"steps"', '"stepz"')
  with pytest.raises(ConfigError, match="stepz"):
    run_config.from_json(text)


# Published parameter counts: Qwen2.5-1.5B 1,543,714,304 (tied embeddings) and Qwen2.5-7B
# 7,615,616,512; SmolLM2-135M 134,515,008.
@pytest.mark.parametrize("name, expected", [
    ("qwen2.5_1.5b", 1_543_714_304),
    ("qwen2.5_7b", 7_615_616_512),
    ("smollm2_gsm8k", 134_515_008),
])
def test_full_size_configs_have_the_published_shapes(name, expected):
  cfg = run_config.load(CONFIGS[0].parent / f"{name}.py")
  shapes = training.abstract_params(cfg.model)  # jax.eval_shape: nothing is allocated
  assert sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes)) == expected
  m = cfg.model
  assert shapes["layers"]["attn"]["q"]["kernel"].shape == (
      m.num_layers, m.hidden_size, m.num_heads, m.head_dim)
  assert shapes["layers"]["mlp"]["down"]["kernel"].shape == (
      m.num_layers, m.intermediate_size, m.hidden_size)
  assert ("lm_head" in shapes) == (not m.tie_embeddings)


def test_pretrained_configs_require_a_source():
  cfg = run_config.load(CONFIGS[0].parent / "qwen2.5_7b.py")
  with pytest.raises(ConfigError, match="init.source is empty"):
    training.build_model(cfg)


def test_a_config_path_that_is_a_directory_is_named_as_one(tmp_path):
  with pytest.raises(ConfigError, match=f"config file {tmp_path} is a directory; give a Python "
                                        "config file"):
    run_config.load(tmp_path)


def test_adam_eps_zero_and_a_malformed_coordinator_address_are_refused():
  # adam_eps=0 trained with a normal-looking loss while unused tokens' embeddings became NaN;
  # a malformed address failed inside gRPC (an IndexError, or a crash of the process).
  from dllm_jax.config import MeshConfig, TrainConfig

  with pytest.raises(ConfigError, match=r"train.adam_eps=0: must be > 0"):
    TrainConfig(adam_eps=0.0)
  for address in ("nonsense", "localhost:notaport", "host:99999", ":80", "host:0"):
    with pytest.raises(ConfigError, match=r"mesh.coordinator_address=.*expected HOST:PORT"):
      MeshConfig(coordinator_address=address)
  for address in ("localhost:1234", "10.0.0.1:65535", "[::1]:80"):
    assert MeshConfig(coordinator_address=address).coordinator_address == address
