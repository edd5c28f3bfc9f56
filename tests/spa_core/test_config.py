"""spa_core/config.py: the one place the config's rules are checked, and the rules a loader reads."""

from __future__ import annotations

import dataclasses

import pytest

from spa_core.config import BackboneConfig, ConfigError, SPAConfig, check_config, config_rules


def test_defaults_pass():
    check_config(BackboneConfig())
    check_config(SPAConfig())


@pytest.mark.parametrize(
    "key,value",
    [
        ("spa.ratio", 1.01),
        ("spa.threshold", 0.0),
        ("spa.pack", "scatter"),
        ("variant", "huge"),
        ("extra_stage3_blocks", -1),
        ("spa.mlp_on", "none"),
    ],
)
def test_nested_fields_are_checked_by_dotted_key(key, value):
    cfg = BackboneConfig()
    *head, last = key.split(".")
    target = cfg.spa if head else cfg
    setattr(target, last, value)
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        check_config(cfg)


def test_rules_cover_every_constrained_field():
    rules = config_rules(BackboneConfig)
    assert rules["spa.ratio"]["range"] == (0.0, 1.0, True, True)
    assert rules["spa.selection"] == {"registry": "selection_policy"}
    assert rules["spa.position_bias"]["choices"] == ("swin", "none")
    constrained = {f"spa.{f.name}" for f in dataclasses.fields(SPAConfig) if f.metadata}
    assert constrained <= set(rules)
