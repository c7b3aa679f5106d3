"""Typed configuration: dataclasses per component, YAML files and dotted overrides.

Each component owns its config dataclass (``ParallelConfig`` in ``moe_rl.parallel``,
``ModelConfig`` in ``moe_rl.models`` ...). This package only loads them: a YAML file and
``a.b.c=value`` overrides are merged onto the dataclass schema with OmegaConf's structured
configs, which reject unknown keys and wrong types with the full dotted path of the field.
The result is a plain dataclass instance (no OmegaConf objects escape), so
``__post_init__`` validation on every dataclass runs on the final values.
"""

from moe_rl.config.loader import ConfigError, load_config, to_yaml

__all__ = ["ConfigError", "load_config", "to_yaml"]
