"""Options: one table of names and defaults, validated, and the README's option table agrees."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from areplica.errors import ConfigurationError
from areplica.options import Options

README = Path(__file__).resolve().parents[2] / "README.md"
ROW = re.compile(r"^\| `(\w+)` \| `([^`]*)`")


def readme_options() -> dict[str, str]:
    text = README.read_text()
    section = text.split("\n## Options\n", 1)[1].split("\n## ", 1)[0]
    return {m.group(1): m.group(2) for line in section.splitlines() if (m := ROW.match(line))}


def test_readme_lists_every_option_with_its_default() -> None:
    documented = readme_options()
    assert set(documented) == set(Options.names())
    for name, default in Options.defaults().items():
        if name == "primary_wait":  # None in code: 0, or 5.0 with a Patroni source
            assert documented[name] == "0"
            continue
        shown = f'"{default}"' if isinstance(default, str) else repr(default)
        assert documented[name] == shown, name


def test_environment_uses_the_same_table() -> None:
    env = {
        "X_POOL_SIZE": "20",
        "X_MAX_LAG": "none",
        "X_FALLBACK_TO_PRIMARY": "off",
        "X_CAUSAL_WAIT": "0.5",
        "X_WEIGHTS": "replica-1=2, replica-2=1",
        "X_POLICY": "least_busy",
    }
    parsed = Options.from_env("X_", env)
    assert parsed == {
        "pool_size": 20,
        "max_lag": None,
        "fallback_to_primary": False,
        "causal_wait": 0.5,
        "weights": {"replica-1": 2.0, "replica-2": 1.0},
        "policy": "least_busy",
    }
    options = Options.build(parsed)
    assert options.pool_size == 20 and options.max_lag is None


@pytest.mark.parametrize(
    ("env", "option"),
    [
        ({"X_POOL_SIZE": "ten"}, "pool_size"),
        ({"X_FALLBACK_TO_PRIMARY": "maybe"}, "fallback_to_primary"),
        ({"X_WEIGHTS": "a"}, "weights"),
        ({"X_HEALTH_TIMEOUT": "soon"}, "health_timeout"),
    ],
)
def test_bad_environment_values_name_the_option(env: dict[str, str], option: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        Options.from_env("X_", env)
    assert info.value.option == option


def test_options_are_frozen_and_floats() -> None:
    options = Options.build({"health_interval": 1, "primary_weight": 2})
    assert options.health_interval == 1.0 and isinstance(options.health_interval, float)
    with pytest.raises(AttributeError):
        options.pool_size = 3  # type: ignore[misc]
