"""The strict config loader: YAML + dotted overrides onto dataclasses; unknown keys, wrong
types and malformed overrides are errors that name the field (and the file)."""

from dataclasses import dataclass, field

import pytest

from moe_rl.config import ConfigError, load_config, to_yaml
from moe_rl.parallel import ParallelConfig
from moe_rl.train.config import OptimConfig


@dataclass
class Root:
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    name: str = "run"


def test_defaults_file_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("parallel:\n  tensor_parallel: 2\noptim:\n  lr: 1.0e-5\n")
    cfg = load_config(Root, f, ["parallel.expert_parallel=4", "optim.lr=3e-6", "name=x"])
    assert isinstance(cfg, Root) and isinstance(cfg.parallel, ParallelConfig)
    assert cfg.parallel.tensor_parallel == 2 and cfg.parallel.expert_parallel == 4
    assert cfg.optim.lr == pytest.approx(3e-6) and cfg.name == "x"
    assert cfg.parallel.expert_tensor_parallel is None
    # round trip through the YAML a run logs
    g = tmp_path / "back.yaml"
    g.write_text(to_yaml(cfg))
    assert load_config(Root, g) == cfg


@pytest.mark.parametrize("overrides,needle", [
    (["parallel.tensor_paralel=2"], "parallel.tensor_paralel"),
    (["optim.lr=fast"], "optim.lr"),
    (["parallel.sequence_parallel=maybe"], "parallel.sequence_parallel"),
    (["nosuch=1"], "nosuch"),
    (["parallel"], "dotted.key=value"),
])
def test_bad_overrides_name_the_field(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(Root, None, overrides)
    assert needle in str(e.value)


def test_unknown_key_in_file_names_file_and_field(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("optim:\n  lr: 1.0e-5\n  betas: [0.9, 0.95]\n")
    with pytest.raises(ConfigError) as e:
        load_config(Root, f)
    assert "bad.yaml" in str(e.value) and "optim.betas" in str(e.value)


def test_post_init_validation_runs_on_final_values():
    with pytest.raises(ValueError, match="lr_decay_style 'cosin'"):
        load_config(Root, None, ["optim.lr_decay_style=cosin"])
    with pytest.raises(ValueError, match="min_lr"):
        load_config(Root, None, ["optim.lr=1e-6", "optim.min_lr=1e-5"])


def test_not_yaml_and_not_mapping(tmp_path):
    f = tmp_path / "x.yaml"
    f.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(Root, f)
    f.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Root, f)


def test_fields_are_documented_by_a_trailing_comment():
    """House style, one convention for the whole package: ``lr: float = 1e-6  # peak learning
    rate``; a string statement below a field (an attribute docstring) is the other one."""
    import ast
    import pathlib

    import moe_rl

    found = []
    for path in sorted(pathlib.Path(moe_rl.__file__).parent.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                for a, b in zip(node.body, node.body[1:]):
                    if (isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr)
                            and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str)):
                        found.append(f"{path.name}:{b.lineno} {node.name}.{ast.unparse(a.target)}")
    assert found == []


def test_a_key_repeated_in_a_yaml_file_is_refused_with_its_lines(tmp_path):
    """PyYAML keeps the last of two equal keys silently: the first ``train:`` block was lost."""
    f = tmp_path / "dup.yaml"
    f.write_text("optim:\n  lr: 1.0e-5\nname: a\noptim:\n  lr: 2.0e-5\n")
    with pytest.raises(ConfigError, match=r"dup.yaml: key 'optim' appears twice in one mapping \(lines 1 and 4\)"):
        load_config(Root, f)
    f.write_text("optim:\n  lr: 1.0e-5\n  min_lr: 0.0\n  lr: 2.0e-5\n")
    with pytest.raises(ConfigError, match=r"dup.yaml: key 'lr' appears twice in one mapping \(lines 2 and 4\)"):
        load_config(Root, f)
    # a key next to a merge key overrides the merged one: that is no repetition
    import yaml

    from moe_rl.config.loader import _UniqueKeyLoader

    text = "a: &a {x: 1, y: 2}\nb:\n  <<: *a\n  x: 3\n"
    assert yaml.load(text, Loader=_UniqueKeyLoader) == {"a": {"x": 1, "y": 2}, "b": {"x": 3, "y": 2}}


def _run_config(*overrides, path=None):
    from moe_rl.config.run import RunConfig

    return load_config(RunConfig, path, list(overrides))


@pytest.mark.parametrize("override, message", [
    ("rewards.rewards={name: x}", "override 'rewards.rewards={name: x}': rewards.rewards: expected a list, got a mapping"),
    ("rewards={rewards: {name: x}}", "rewards.rewards: expected a list, got a mapping"),
    ("train.steps=[1", "override 'train.steps=[1': the value is not valid YAML"),
    ("data.extra_paths=[a, b", "override 'data.extra_paths=[a, b': the value is not valid YAML"),
    ("rewards.rewards.3.fn=x", "override 'rewards.rewards.3.fn=x': rewards.rewards[3]"),
    ("rewards.rewards.0.nope=x", "override 'rewards.rewards.0.nope=x'"),
])
def test_overrides_that_used_to_crash_are_config_errors_naming_the_override(override, message):
    with pytest.raises(ConfigError) as e:
        _run_config(override)
    assert message in str(e.value)


def test_overrides_into_lists_and_sentences_work():
    """A list index is a key; a value YAML cannot read, or reads as ``a: b``, is the sentence it looks like."""
    cfg = _run_config("rewards.rewards.0.fn=format", "data.system_prompt=Think: then answer: 42")
    assert [(r.name, r.fn) for r in cfg.rewards.rewards] == [("math", "format")]
    assert cfg.data.system_prompt == "Think: then answer: 42"
    cfg = _run_config("rewards.rewards=[{name: a, fn: format}, {name: b, weight: 0.5}]", "data.system_prompt=a: b")
    assert [(r.name, r.fn, r.weight) for r in cfg.rewards.rewards] == [("a", "format", 1.0), ("b", "math", 0.5)]
    assert cfg.data.system_prompt == "a: b"
    assert _run_config("data.system_prompt=x", "data.system_prompt=").data.system_prompt == ""


def test_a_mapping_where_the_schema_has_a_list_names_the_file_and_field(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("rewards:\n  rewards:\n    name: x\n")
    with pytest.raises(ConfigError, match=r"r.yaml: rewards.rewards: expected a list, got a mapping"):
        _run_config(path=f)
    f.write_text("rewards:\n  - name: x\n")
    with pytest.raises(ConfigError, match=r"r.yaml: rewards: expected a mapping, got a list"):
        _run_config(path=f)
