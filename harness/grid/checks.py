"""Checks of what a grid sets, one key at a time, before any trial is built.

``check_key``: a dotted config key and its value alone (a key the trial config has, a value of the
right type, a name some registry holds, a choice or number within the rule its config field declares;
keys the grid sets itself refused). Rules between keys wait for the whole trial (``harness.grid.expand``
resolves it). ``is_config_key``: whether a dotted key is a path into the trial config.
``check_plain``: a name that becomes part of a path is a plain name (``harness.names``).
"""

from __future__ import annotations

from typing import Any

from harness.config import TrialConfig, flatten_config, get_dotted, set_dotted, trial_from_dict, trial_to_dict
from harness.grid.yaml_lines import Loc, Val
from harness.names import name_problem
from spa_core.config import ConfigError, config_rules, rule_problem

__all__ = ["check_key", "check_plain", "is_config_key"]

_DEFAULTS = trial_to_dict(TrialConfig())  # every config key (the default model has an spa section)

# What each config key may hold, declared once on the config dataclasses (``checked_field``): registry
# names (checked after plugins load), fixed choices, numeric ranges.
_RULES = config_rules(TrialConfig)


def is_config_key(key: str) -> bool:
    try:
        get_dotted(_DEFAULTS, key)
        return True
    except KeyError:
        return False


def check_key(key: str, v: Val) -> None:
    """One dotted key and value, alone: known key, right type, a name some registry holds."""
    if key == "seed":
        raise v.loc.error("set seeds with the top-level `seeds:` key", key)
    if key == "plugins":
        raise v.loc.error("name plugins with the top-level `plugins:` key", key)
    if key.split(".")[0] in ("baseline", "axis", "plugin_sources"):
        raise v.loc.error(
            f"`{key.split('.')[0]}` is set by the grid itself (its dense point, its axes, its plugins' sources)",
            key,
        )
    d: dict[str, Any] = {}
    set_dotted(d, key, v.value)
    try:
        trial_from_dict(d, partial=True)  # rules between keys: when the whole trial resolves
    except ConfigError as e:
        raise v.loc.error(str(e), key) from None
    except KeyError as e:
        raise v.loc.error(str(e.args[0]) if e.args else str(e), key) from None
    except (TypeError, ValueError) as e:  # a value of a shape the config cannot take (a list for a section)
        raise v.loc.error(f"a value of the wrong type or shape ({e}), got {v.value!r}", key) from None
    if isinstance(v.value, dict):  # e.g. an axis over ``model.spa`` mappings: check the names inside
        for sub, value in flatten_config(v.value, key + ".").items():
            _check_name(sub, Val(value, v.loc), key)
    _check_name(key, v, key)


def _check_name(key: str, v: Val, where: str) -> None:
    """A value that names a registry entry, one of a fixed set of choices or a number in a range
    meets the rule its config field declares (``spa_core.config.rule_problem``)."""
    problem = rule_problem(_RULES.get(key, {}), v.value)
    if problem is not None:
        raise v.loc.error(problem, where)


def check_plain(name: str, loc: Loc, what: str, key: str | None = None) -> None:
    problem = name_problem(name)
    if problem is not None:
        raise loc.error(f"{what} {name!r} is not a plain name: {problem}", key)
