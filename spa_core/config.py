"""Typed configs of the SPA backbone (nanoGPT's ``GPTConfig`` habit) and strict dict <-> dataclass.

``SPAConfig`` says how an SPA block selects, packs and supervises; ``BackboneConfig`` the Swin-style
hierarchy around it. ``spa=None`` (or empty ``spa_stages``) is the dense Swin baseline: the same
network with plain windowed-attention blocks and no gates.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "SPAConfig",
    "BackboneConfig",
    "BACKBONE_PRESETS",
    "backbone_preset",
    "config_from_dict",
    "config_to_dict",
    "check_config",
    "checked_field",
    "config_rules",
    "rule_problem",
    "ConfigError",
]


class ConfigError(ValueError):
    """A config dict does not fit its dataclass; the message names the dotted key."""


def checked_field(
    default: Any, *, choices: tuple | None = None, registry: str | None = None, range_: tuple | None = None
) -> Any:
    """A dataclass field with the rule ``check_config`` enforces: ``choices`` (fixed values),
    ``registry`` (a name some ``spa_core.registry`` registry holds, plugins included) or ``range_``
    ``(low, high, low inclusive, high inclusive)`` (None: unbounded)."""
    meta = {
        k: v for k, v in (("choices", choices), ("registry", registry), ("range", range_)) if v is not None
    }
    return field(default=default, metadata=meta)


@dataclass
class SPAConfig:
    selection: str = checked_field(
        "gate", registry="selection_policy"
    )  # gate | topk | random | all | none | gate_random | gate_norm
    ratio: float = checked_field(0.5, range_=(0.0, 1.0, True, True))  # kept fraction per image (topk, random)
    threshold: float = checked_field(
        0.5, range_=(0.0, 1.0, False, False)
    )  # gate: keep when sigmoid(score) > threshold
    gumbel_tau: float = checked_field(
        1.0, range_=(0.0, None, False, None)
    )  # Gumbel-sigmoid temperature in training
    pack: str = checked_field("containers", registry="pack_strategy")  # containers | varlen | pad | mask
    container_len: int | None = checked_field(
        None, range_=(1, None, True, None)
    )  # containers' L; None: one window's tokens (M * M; Mh * Mw where a map clips the window)
    # "all": every token goes through the MLP; "selected": an unselected token skips the whole block
    mlp_on: str = checked_field("all", choices=("all", "selected"))
    # "swin": Swin's relative position bias and shift mask on packed pairs; "none": no position information
    position_bias: str = checked_field("swin", choices=("swin", "none"))
    gate_scaling: bool = (
        True  # kept tokens enter attention as sigmoid(score) * token (the paper); False: unscaled
    )
    gate: str = checked_field("linear", registry="gate")
    supervision: str = checked_field("labels", registry="supervision_mode")  # labels | none
    alpha: float = checked_field(
        0.01, range_=(0.0, None, True, None)
    )  # weight of the gate loss (paper: 0.01)
    # None: a token is positive if any object pixel falls in it; else the covered fraction must reach it
    label_coverage: float | None = checked_field(None, range_=(0.0, 1.0, False, True))
    attn_impl: str = checked_field(
        "auto", choices=("auto", "triton", "cpp", "torch", "ref")
    )  # kernels' dispatcher


@dataclass
class BackboneConfig:
    variant: str = checked_field("spa", registry="model_variant")  # "spa" | "dense" (plugins add more)
    patch_size: int = 4
    # How pixels become stage-1 tokens. "patch": Swin's, one patch_size x patch_size conv of stride
    # patch_size, then LayerNorm. "patch2": two non-overlapping convs (2 x 2 of stride 2, then
    # patch_size/2 of its stride) with a LayerNorm over channels and a GELU between: each token still
    # sees only its own patch (padding and the patch grid behave as "patch"), but a from-scratch model
    # learns faster (dense mAP 0.067 -> 0.107 after 400 steps of 8 built-in images, one seed, project
    # notes). A Swin checkpoint holds a "patch" embedding only.
    stem: str = checked_field("patch", choices=("patch", "patch2"))
    in_chans: int = 3
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.2
    spa_stages: tuple[int, ...] = (3, 4)  # 1-based stages built from SPA blocks
    extra_stage3_blocks: int = checked_field(
        0, range_=(0, None, True, None)
    )  # the paper adds 4, paid for by the savings
    spa: SPAConfig | None = field(default_factory=SPAConfig)  # None -> dense baseline
    # How padding takes part in attention, in the dense and the SPA blocks alike (padding: the zero
    # tokens Swin adds where a map is not a multiple of the window, and the batch padding of images
    # given as ``image_sizes``). "mask": a padding token is never a key of a real token (nor merged into
    # one), so a map's padding changes nothing; "attend": as Swin and mmdetection, zero tokens after the
    # norm take part in attention (the outputs then depend on how much padding a window holds).
    pad_keys: str = checked_field("mask", choices=("mask", "attend"))
    # A Swin checkpoint on disk (official or timm layout; ``spa_core.pretrained``) loaded into the
    # backbone when it is built (a path every worker can read: absolute, or relative to where the
    # trial runs); None: every weight initialised at random.
    pretrained: str | None = None

    @property
    def is_dense(self) -> bool:
        return self.variant == "dense" or self.spa is None or not self.spa_stages


BACKBONE_PRESETS: dict[str, dict[str, Any]] = {
    # The paper's Swin-T-sized SPT (for GPUs): 28M-parameter class, window 7.
    "swin_t": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7),
    # Tiny sizes that train on a CPU in minutes.
    "tiny": dict(
        embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), window_size=4, drop_path_rate=0.0
    ),
    "micro": dict(
        embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=4, drop_path_rate=0.0
    ),
}


def stem_problem(cfg: BackboneConfig) -> str | None:
    """What keeps ``cfg.stem`` from building (``patch2`` halves a patch twice: an even ``patch_size``)
    or from loading ``cfg.pretrained`` (a Swin checkpoint has Swin's one-conv ``patch`` embedding), or
    None. The grid loader asks before anything runs, the backbone when it is built."""
    if cfg.stem == "patch2" and cfg.patch_size % 2:
        return f"model.stem 'patch2' splits a patch in two steps: model.patch_size must be even, got {cfg.patch_size}"
    if cfg.stem != "patch" and cfg.pretrained:
        return (
            f"model.pretrained loads a Swin checkpoint, whose patch embedding is one conv: model.stem "
            f"{cfg.stem!r} would have no source in it; set model.stem: patch"
        )
    return None


def backbone_preset(name: str, **overrides: Any) -> BackboneConfig:
    """A ``BackboneConfig`` from a named size, with overrides (``spa=None`` for the dense baseline)."""
    if name not in BACKBONE_PRESETS:
        raise KeyError(f"unknown backbone preset {name!r}; known: {sorted(BACKBONE_PRESETS)}")
    return BackboneConfig(**{**BACKBONE_PRESETS[name], **overrides})


def config_to_dict(cfg: Any) -> Any:
    """Dataclass -> plain JSON-able dict (tuples become lists)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, list | tuple):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: config_to_dict(v) for k, v in cfg.items()}
    return cfg


def rule_problem(rule: dict[str, Any], value: Any) -> str | None:
    """What is wrong with ``value`` under a field's rule (``checked_field``: ``choices``, ``registry``,
    ``range``), or ``None``. The one place these rules are checked: ``check_config`` uses it on a
    built config, the harness's grid loader on each key of a file (adding the file and line)."""
    from spa_core.registry import ALL_REGISTRIES

    if value is None:
        return None
    if "choices" in rule and value not in rule["choices"]:
        return f"{value!r} is not one of {', '.join(map(str, rule['choices']))}"
    if "registry" in rule:
        reg = ALL_REGISTRIES[rule["registry"]]
        if value not in reg:
            return (
                f"unknown {reg.name} {value!r}; registered: {', '.join(reg) or 'nothing'} "
                "(plugins add more: `plugins:` in a grid, --plugin, or an entry point)"
            )
    if "range" in rule and isinstance(value, int | float) and not isinstance(value, bool):
        lo, hi, lo_in, hi_in = rule["range"]
        ok = (lo is None or value > lo or (lo_in and value == lo)) and (
            hi is None or value < hi or (hi_in and value == hi)
        )
        if not ok:
            left = "" if lo is None else f"{'>=' if lo_in else '>'} {lo}"
            right = "" if hi is None else f"{'<=' if hi_in else '<'} {hi}"
            return f"expected a value {' and '.join(x for x in (left, right) if x)}, got {value!r}"
    return None


def check_config(cfg: Any, path: str = "") -> None:
    """Check every field of dataclass ``cfg`` (recursively) against the rule its field declares
    (``rule_problem``). Raises ``ConfigError`` naming the dotted key, the value and what is allowed."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{path}.{f.name}" if path else f.name
        if dataclasses.is_dataclass(value):
            check_config(value, key)
            continue
        problem = rule_problem(dict(f.metadata), value)
        if problem is not None:
            raise ConfigError(f"{key}: {problem}")


def config_rules(cls: type, prefix: str = "") -> dict[str, dict[str, Any]]:
    """Dotted key -> the rule its field declares (``choices`` / ``registry`` / ``range``), for every
    field of dataclass ``cls`` and its nested dataclasses: what a loader can check key by key."""
    hints = typing.get_type_hints(cls)
    rules: dict[str, dict[str, Any]] = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        args = (hints[f.name], *typing.get_args(hints[f.name]))
        sub = [a for a in args if isinstance(a, type) and dataclasses.is_dataclass(a)]
        if sub:
            rules.update(config_rules(sub[0], key + "."))
        elif f.metadata:
            rules[key] = dict(f.metadata)
    return rules


def config_from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, strictly: unknown keys and wrong types raise ``ConfigError``
    naming the dotted key and what was expected. Missing keys take the dataclass defaults."""
    if data is None:
        data = {}
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{path or cls.__name__}: expected a mapping for {cls.__name__}, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(
            f"unknown key {where}{unknown[0]} for {cls.__name__}; expected one of: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{path}.{name}" if path else name)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        choices = [a for a in args if a is not type(None)]
        if len(choices) == 1:  # Optional[X]: X's own message is the useful one
            return _coerce(choices[0], value, path)
        for a in choices:
            try:
                return _coerce(a, value, path)
            except ConfigError:
                pass
        raise ConfigError(f"{path}: {value!r} does not fit {_tname(tp)}")
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return config_from_dict(tp, value, path)
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path}: expected a list ({_tname(tp)}), got {value!r}")
        item = args[0] if args else Any
        out = [_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    return value


def _tname(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
