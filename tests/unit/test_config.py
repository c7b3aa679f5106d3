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
