"""Config files: TOML in configs/ (default.toml, sweep.toml, cluster.toml) -> a validated
LeapfrogConfig (configs.schema). Missing keys keep their defaults; unknown sections and
keys, and values of the wrong type, are errors that name them."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

from configs.schema import DRAFTER_SECTIONS, ConfigError, DrafterConfigs, LeapfrogConfig

CONFIG_DIR = Path(__file__).resolve().parent  # the TOML files ship beside this module


def _section(cls, values: dict, name: str):
    known = {f.name: f.type for f in dataclasses.fields(cls)}
    unknown = set(values) - set(known)
    if unknown:
        raise ConfigError(f"[{name}]: unknown keys {sorted(unknown)}; known: {sorted(known)}")
    values = dict(values)
    for key, value in values.items():
        expected = type(getattr(cls(), key))
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = values[key] = float(value)  # TOML writes 1.0 as 1 as often as not
        if not isinstance(value, expected) or isinstance(value, bool) != (expected is bool):
            raise ConfigError(f"[{name}] {key} must be {expected.__name__}, got {value!r}")
    return cls(**values)


def load_config(path: str | Path | None = None) -> LeapfrogConfig:
    """Read a config file (default: configs/default.toml); missing keys keep their defaults."""
    path = Path(path) if path is not None else CONFIG_DIR / "default.toml"
    return config_from_dict(read_toml(path), str(path))


def read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None


def config_from_dict(data: dict, source: str) -> LeapfrogConfig:
    top = {f.name: f for f in dataclasses.fields(LeapfrogConfig) if f.name != "drafters"}
    drafters = {DRAFTER_SECTIONS.get(f.name, f.name): f for f in dataclasses.fields(DrafterConfigs)}
    unknown = set(data) - set(top) - set(drafters)
    if unknown:
        raise ConfigError(f"{source}: unknown sections {sorted(unknown)}; known: {sorted([*top, *drafters])}")

    def read(sections: dict, cls) -> object:
        return cls(**{f.name: _section(f.default_factory, data.get(name, {}), name) for name, f in sections.items()})

    config = read(top, LeapfrogConfig)
    config.drafters = read(drafters, DrafterConfigs)
    return config.validate()
