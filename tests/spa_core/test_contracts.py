"""spa_core/contracts.py: a variant that breaks its registry's contract is stopped where the core
receives its output, by an error naming the entry, its file and line, the rule and the shapes seen;
every registered variant (built-ins now, any variant the moment it is registered) passes its contract
on random inputs."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spa_core import contracts
from spa_core.backbone import BackboneOutput
from spa_core.block import SPABlock, SPABlockInfo
from spa_core.config import SPAConfig, backbone_preset
from spa_core.contracts import ContractError
from spa_core.loss import gate_loss
from spa_core.pack import pack, unpack
from spa_core.registry import GATES, MODEL_VARIANTS, PACK_STRATEGIES, SELECTION_POLICIES, SUPERVISION_MODES
from spa_core.select import select_tokens


@pytest.fixture(autouse=True)
def _always():
    with contracts.checking("always"):
        yield


# --- deliberately broken plugins, one per rule --------------------------------------------------------------

# Each plugin's registered object starts on line 8 of its file (after the shared header).
_HEADER = """\
import dataclasses
import torch
from torch import nn
from spa_core.pack import pack_varlen
from spa_core.attention import attend_varlen
from spa_core.select import Selection
from spa_core.strategies import PackStrategy
"""
_LINE = 8

BROKEN = {
    "selection_policy": {
        # the issue's case: a (B, C) mask (the tokens' channels) instead of (B, N)
        "mask_bc": """\
def select_mask_bc(scores, *, cfg, training, generator=None, tokens=None):
    mask = torch.ones(tokens.shape[0], tokens.shape[2], dtype=torch.bool)
    return Selection(mask=mask, counts=mask.sum(1), weight=torch.ones_like(scores))
""",
        "counts_off": """\
def select_counts_off(scores, *, cfg, training, generator=None, tokens=None):
    mask = scores > 0
    return Selection(mask=mask, counts=torch.full_like(mask.sum(1), 3), weight=torch.ones_like(scores))
""",
        "float_mask": """\
def select_float_mask(scores, *, cfg, training, generator=None, tokens=None):
    mask = (scores > 0).float()
    return Selection(mask=mask, counts=mask.sum(1).long(), weight=torch.ones_like(scores))
""",
        "weight_b1": """\
def select_weight_b1(scores, *, cfg, training, generator=None, tokens=None):
    mask = scores > 0
    return Selection(mask=mask, counts=mask.sum(1), weight=torch.ones(scores.shape[0], 1))
""",
        "nan_weight": """\
def select_nan_weight(scores, *, cfg, training, generator=None, tokens=None):
    mask = scores > 0
    return Selection(mask=mask, counts=mask.sum(1), weight=torch.full_like(scores, float("nan")))
""",
        "a_tuple": """\
def select_a_tuple(scores, *, cfg, training, generator=None, tokens=None):
    mask = scores > 0
    return mask, mask.sum(1), torch.ones_like(scores)
""",
    },
    "gate": {
        "scores_bn1": """\
class ScoresBN1(nn.Module):
    def __init__(self, dim, cfg=None):
        super().__init__()
        self.lin = nn.Linear(dim, 1)

    def forward(self, x, prev_scores=None):
        return self.lin(x)
""",
        "nan_scores": """\
class NaNScores(nn.Module):
    def __init__(self, dim, cfg=None):
        super().__init__()

    def forward(self, x, prev_scores=None):
        return x.sum(-1) * float("nan")
""",
    },
    "supervision_mode": {
        "nan_loss": """\
def supervise_nan(blocks, labels, *, alpha):
    return blocks[0].logits.sum() * float("nan")
""",
        "vector_loss": """\
def supervise_vector(blocks, labels, *, alpha):
    return blocks[0].logits.sum(1)
""",
    },
    "pack_strategy": {
        "drops_one": """\
def pack_drops_one(x, mask, *, cfg, order=None):
    p = pack_varlen(x, mask, cfg=cfg, order=order)
    return dataclasses.replace(p, tokens=p.tokens[1:], indices=p.indices[1:], strategy="drops_one")
""",
        "reversed": """\
def pack_reversed(x, mask, *, cfg, order=None):
    p = pack_varlen(x, mask, cfg=cfg, order=order)
    return dataclasses.replace(p, tokens=p.tokens.flip(0), indices=p.indices.flip(0), strategy="reversed")
""",
        "wrong_name": """\
def pack_wrong_name(x, mask, *, cfg, order=None):
    return pack_varlen(x, mask, cfg=cfg, order=order)
""",
        "bad_attend": """\
def attend_flat(q, k, v, packed, *, softmax_scale=None, impl=None, bias=None):
    return attend_varlen(q, k, v, packed, softmax_scale=softmax_scale, impl=impl).flatten(1)
""",
        "nan_macs": """\
def macs_nan(counts, n, c, container_len):
    return float("nan")
""",
    },
}

RULES = {
    ("selection_policy", "mask_bc"): r"mask must be \(B, N\) = \(2, 16\) torch.bool.*got mask \(2, 8\)",
    ("selection_policy", "counts_off"): r"counts must equal mask.sum\(1\).*got counts \[3",
    ("selection_policy", "float_mask"): r"mask must be \(B, N\).*got mask \(2, 16\) torch.float32",
    ("selection_policy", "weight_b1"): r"weight must be \(B, N\) = \(2, 16\).*got weight \(2, 1\)",
    ("selection_policy", "nan_weight"): r"weight must be finite.*32 NaN or infinite",
    ("selection_policy", "a_tuple"): r"returns a spa_core.select.Selection.*got tuple",
    ("gate", "scores_bn1"): r"scores \(B, N\) = \(2, 16\).*got scores \(2, 16, 1\)",
    ("gate", "nan_scores"): r"scores must not be NaN",
    ("supervision_mode", "nan_loss"): r"the loss must be finite; got nan",
    ("supervision_mode", "vector_loss"): r"scalar tensor \(shape \(\)\).*got the loss \(2,\)",
    ("pack_strategy", "drops_one"): r"every kept token once \(T = mask.sum\(\)\); got T = 10 for 11",
    ("pack_strategy", "reversed"): r"packed image by image, in the given order",
    ("pack_strategy", "wrong_name"): r"strategy is the entry's name 'wrong_name'.*got strategy 'varlen'",
    ("pack_strategy", "bad_attend"): r"attend returns \(T, H, D\) = \(11, 2, 2\).*got the output \(11, 4\)",
    ("pack_strategy", "nan_macs"): r"attention_macs returns a finite number >= 0; got nan",
}

CASES = [(reg, name) for reg, plugins in BROKEN.items() for name in plugins]


def _load(tmp_path, reg: str, name: str):
    """The broken plugin as a module file of its own; returns (path, its registered object)."""
    path = tmp_path / f"broken_{name}.py"
    path.write_text(_HEADER + textwrap.dedent(BROKEN[reg][name]))
    spec = importlib.util.spec_from_file_location(f"broken_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    objs = [v for k, v in vars(mod).items() if getattr(v, "__module__", None) == spec.name]
    assert len(objs) == 1
    return path, objs[0]


def _provoke(reg: str, name: str, obj) -> None:
    """Register the broken object and run the core's call that receives what it returns."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 4, 8)  # (B, H, W, C): N = 16 tokens
    if reg == "pack_strategy":
        from spa_core.attention import attend_varlen
        from spa_core.pack import pack_varlen
        from spa_core.strategies import PackStrategy

        def pack_named(x, mask, *, cfg, order=None):  # varlen's layout under this entry's name
            return dataclasses.replace(pack_varlen(x, mask, cfg=cfg, order=order), strategy=name)

        parts = {"pack": pack_named, "attend": attend_varlen, "attention_macs": lambda *a: 1.0}
        parts[{"bad_attend": "attend", "nan_macs": "attention_macs"}.get(name, "pack")] = obj
        PACK_STRATEGIES.register(name, PackStrategy(**parts))  # the registration probes it
        return
    registry = {"selection_policy": SELECTION_POLICIES, "gate": GATES, "supervision_mode": SUPERVISION_MODES}[
        reg
    ]
    registry.register(name, obj)
    if reg == "selection_policy":
        SPABlock(8, 2, 4, SPAConfig(selection=name)).train()(x)
    elif reg == "gate":
        SPABlock(8, 2, 4, SPAConfig(gate=name, selection="all")).train()(x)
    else:
        blk = SPABlock(8, 2, 4, SPAConfig(selection="topk")).train()
        info = blk(x)[1]
        gate_loss([info], {(4, 4): torch.zeros(2, 4, 4)}, SPAConfig(supervision=name))


@pytest.mark.parametrize("reg,name", CASES, ids=[f"{r}-{n}" for r, n in CASES])
def test_a_broken_plugin_is_stopped_naming_its_file_line_rule_and_shapes(tmp_path, reg, name):
    path, obj = _load(tmp_path, reg, name)
    registry = {"selection_policy": SELECTION_POLICIES, "gate": GATES, "supervision_mode": SUPERVISION_MODES,
                "pack_strategy": PACK_STRATEGIES}[reg]  # fmt: skip
    try:
        with pytest.raises(ContractError) as info:
            _provoke(reg, name, obj)
    finally:
        if name in registry:
            registry.unregister(name)
    msg = str(info.value)
    assert msg.startswith(f"{reg} {name!r} ("), msg
    assert f"{path}:{_LINE}" in msg, msg  # the registered function's (or class's) own file and line
    assert re.search(RULES[reg, name], msg), msg
    assert "docstring in spa_core/registry.py" in msg
    assert info.value.registry == reg and info.value.name == name


def test_a_broken_pack_strategy_is_not_registered(tmp_path):
    _, obj = _load(tmp_path, "pack_strategy", "drops_one")
    with pytest.raises(ContractError):
        _provoke("pack_strategy", "drops_one", obj)
    assert "drops_one" not in PACK_STRATEGIES


def test_off_checks_nothing_and_first_stops_value_checks_after_the_first_calls(tmp_path):
    _, obj = _load(tmp_path, "selection_policy", "counts_off")
    SELECTION_POLICIES.register("counts_off", obj)
    s = torch.randn(2, 16)
    try:
        with contracts.checking("off"):
            select_tokens(s, SPAConfig(selection="counts_off"), training=True)  # unchecked
        with contracts.checking("first"):
            contracts.reset()
            with pytest.raises(ContractError, match="counts must equal"):
                select_tokens(s, SPAConfig(selection="counts_off"), training=True)
            for _ in range(contracts.VALUE_CHECKS - 1):  # the entry's remaining checked calls
                with pytest.raises(ContractError):
                    select_tokens(s, SPAConfig(selection="counts_off"), training=True)
            select_tokens(s, SPAConfig(selection="counts_off"), training=True)  # past them: not read back
            with pytest.raises(ContractError, match=r"mask must be \(B, N\)"):  # shapes: every call
                contracts.check_selection(obj(s[:, :8], cfg=None, training=True), s, "counts_off", obj)
            contracts.reset()  # a new trial: checked again
            with pytest.raises(ContractError, match="counts must equal"):
                select_tokens(s, SPAConfig(selection="counts_off"), training=True)
    finally:
        SELECTION_POLICIES.unregister("counts_off")
        contracts.reset()


def test_nothing_is_checked_while_torch_jit_traces(tmp_path):
    """fvcore traces the model; a check would add its own ops to the traced graph."""
    _, obj = _load(tmp_path, "selection_policy", "counts_off")

    def f(s):
        sel = contracts.check_selection(obj(s, cfg=None, training=False), s, "counts_off", obj)
        return sel.weight * s

    traced = torch.jit.trace(f, torch.randn(2, 16), check_trace=False)
    graph = str(traced.graph)
    assert "aten::eq" not in graph and "aten::isfinite" not in graph


def test_mode_is_validated():
    with pytest.raises(ValueError, match="first, always, off"):
        contracts.set_mode("sometimes")


# --- every registered variant passes its contract on random inputs ---------------------------------------

_SHAPES = st.tuples(st.integers(1, 4), st.integers(1, 7), st.integers(1, 7))  # B, H, W


@pytest.mark.parametrize("name", list(SELECTION_POLICIES))
@settings(max_examples=25, deadline=None)
@given(shape=_SHAPES, ratio=st.floats(0, 1), threshold=st.floats(0.05, 0.95), training=st.booleans(),
       seed=st.integers(0, 2**16))  # fmt: skip
def test_every_selection_policy_meets_its_contract(name, shape, ratio, threshold, training, seed):
    B, H, W = shape
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(B, H * W, generator=g) * 3
    tokens = torch.randn(B, H * W, 5, generator=g)
    cfg = SPAConfig(selection=name, ratio=ratio, threshold=threshold)
    sel = select_tokens(scores, cfg, training=training, generator=g, tokens=tokens)  # checked inside
    assert sel.mask.shape == scores.shape


@pytest.mark.parametrize("name", list(GATES))
@settings(max_examples=15, deadline=None)
@given(shape=_SHAPES, dim=st.sampled_from([1, 8, 24]), prev=st.booleans(), seed=st.integers(0, 2**16))
def test_every_gate_meets_its_contract(name, shape, dim, prev, seed):
    B, H, W = shape
    g = torch.Generator().manual_seed(seed)
    gate = GATES.get(name)(dim, SPAConfig(gate=name))
    x = torch.randn(B, H * W, dim, generator=g)
    s = gate(x, torch.randn(B, H * W, generator=g) if prev else None)
    contracts.check_gate_scores(s, x, name, GATES.get(name))


@pytest.mark.parametrize("name", list(PACK_STRATEGIES))
def test_every_pack_strategy_passes_the_probe(name):
    contracts.probe_pack_strategy(name, PACK_STRATEGIES.get(name))


@pytest.mark.parametrize("name", list(PACK_STRATEGIES))
@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 4), N=st.sampled_from([1, 3, 7, 16, 49, 113]), L=st.integers(1, 20),
       p=st.floats(0, 1), seed=st.integers(0, 2**16))  # fmt: skip
def test_every_pack_strategy_meets_its_contract(name, B, N, L, p, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, 6, generator=g)
    mask = torch.rand(B, N, generator=g) < p
    mask[0] = p > 0.5  # an image that keeps nothing or everything
    order = torch.randperm(N, generator=g)
    packed = pack(x, mask, name, cfg=SPAConfig(pack=name, container_len=L), order=order)  # checked inside
    torch.testing.assert_close(unpack(packed), x * mask[..., None], rtol=0, atol=0)
    counts = mask.sum(1).tolist()
    macs = PACK_STRATEGIES.get(name).attention_macs(counts, N, 6, L)
    contracts.check_attention_macs(macs, name, PACK_STRATEGIES.get(name).attention_macs, counts)


@pytest.mark.parametrize("name", list(SUPERVISION_MODES))
@settings(max_examples=15, deadline=None)
@given(grids=st.lists(st.tuples(st.integers(1, 6), st.integers(1, 6)), min_size=1, max_size=3, unique=True),
       B=st.integers(1, 3), alpha=st.floats(0, 10), seed=st.integers(0, 2**16))  # fmt: skip
def test_every_supervision_mode_meets_its_contract(name, grids, B, alpha, seed):
    g = torch.Generator().manual_seed(seed)
    blocks, labels = [], {}
    for i, (h, w) in enumerate(grids):
        logits = (torch.randn(B, h * w, generator=g) * 5).requires_grad_(True)
        mask = torch.rand(B, h * w, generator=g) < 0.5
        blocks.append(SPABlockInfo(3, i, logits, (h, w), mask, mask.sum(1), mask.float().mean()))
        labels[(h, w)] = (torch.rand(B, h, w, generator=g) < 0.3).float()
    loss = gate_loss(blocks, labels, SPAConfig(supervision=name, alpha=alpha))  # checked inside
    loss.backward()


@pytest.mark.parametrize("name", list(MODEL_VARIANTS))
def test_every_model_variant_meets_its_contract(name):
    model = MODEL_VARIANTS.get(name)(backbone_preset("micro", variant=name))
    out = model(torch.randn(2, 3, 40, 56))
    assert isinstance(out, BackboneOutput) and len(out.features) == 4
    for f, stride in zip(out.features, (4, 8, 16, 32)):
        assert f.shape[0] == 2 and f.shape[2:] == (-(-40 // stride), -(-56 // stride))
