"""harness/bench/: the benchmark times spa_core's own blocks (no second implementation), its modes run
and print their fields (tiny sizes; nothing here is a timed test). The JSON keys: test_json_keys.py."""

import json
from pathlib import Path

import pytest
import torch

import harness.bench.blocks
from harness.bench import (
    BENCH_SELECTION,
    BlockSize,
    Timing,
    TrainStepRunner,
    bench_selection,
    block_pair,
    main,
)
from harness.plugins import isolated_registries
from spa_core.block import SPABlock, SwinBlock
from spa_core.registry import PACK_STRATEGIES, SELECTION_POLICIES

KEYS = {"strategy", "ratio", "kept_fraction", "time_ratio", "flop_ratio", "efficiency"}
TINY = "--batch 2 --grid 7 --dim 32 --heads 2 --reps 2 --warmup 0 --ratios 0.5".split()
SIZE = dict(dim=32, num_heads=2, grid=14, window=7)
SMOKE_GRID = Path(__file__).resolve().parents[3] / "ablations" / "grids" / "smoke.yaml"


def test_bench_json_rows_and_the_efficiency_identity(capsys):
    assert main(["blocks", "--json", *TINY, "--grid", "4", "--window", "2", "--shifts", "0,1"]) == 0
    rows = json.loads(capsys.readouterr().out)
    # every registered strategy; containers at two shifts, the global strategies unshifted
    expect = [(s, shift) for s in PACK_STRATEGIES for shift in ((0, 1) if s == "containers" else (0,))]
    assert [(r["strategy"], r["shift"]) for r in rows] == expect
    for r in rows:
        assert KEYS <= set(r)
        assert abs(r["efficiency"] - r["time_ratio"] / r["flop_ratio"]) < 1e-3
        assert 0 < r["kept_fraction"] <= 1
        assert 1 <= r["op_threads"] <= r["threads"]
        assert r["position_bias"] == "swin" and r["mlp_on"] == "selected"
        for side in ("dense", "spa"):
            assert 0 < r[f"{side}_ms_q1"] <= r[f"{side}_ms"] <= r[f"{side}_ms_q3"]
        assert r["dense"] == ("window" if r["strategy"] == "containers" else "global")
    by = {r["strategy"]: r for r in rows}
    # mlp_on selected: an unselected token skips the block, so FLOPs fall with the kept tokens
    assert by["varlen"]["flop_ratio"] > 1.5 and by["mask"]["flop_ratio"] > 1.2


def test_bench_table(capsys):
    assert main(["blocks", "--strategies", "varlen", *TINY]) == 0
    out = capsys.readouterr().out
    assert "| strategy | dense | shift | ratio |" in out and "| varlen | global | 0 | 0.50 |" in out


def test_the_timed_blocks_are_spa_core_blocks(monkeypatch, capsys):
    """Every timed call goes through spa_core's SPABlock and SwinBlock: no second implementation."""
    calls = {"spa": 0, "swin": 0}
    spa_forward, swin_forward = SPABlock.forward, SwinBlock.forward

    def count(name, forward):
        def wrapped(self, *a, **k):
            calls[name] += 1
            return forward(self, *a, **k)

        return wrapped

    monkeypatch.setattr(SPABlock, "forward", count("spa", spa_forward))
    monkeypatch.setattr(SwinBlock, "forward", count("swin", swin_forward))
    monkeypatch.setattr(harness.bench.blocks, "fvcore_macs", lambda module, inputs: 1)  # only timed calls
    assert main(["blocks", "--json", "--strategies", "pad", *TINY, "--reps", "3", "--warmup", "1"]) == 0
    assert calls == {"spa": 4, "swin": 4}


@pytest.mark.parametrize("strategy,shift", [(s, 0) for s in PACK_STRATEGIES] + [("containers", 3)])
@pytest.mark.parametrize("mlp_on", ["all", "selected"])
def test_keep_all_spa_block_is_the_swin_block(strategy, shift, mlp_on):
    """With every token kept and gate scaling off, the timed SPA block computes its dense Swin block
    (Swin's bias and shift mask included): the rows compare one block with and without selection."""
    torch.manual_seed(0)
    with bench_selection() as policy:
        dense, spa = block_pair(strategy, shift=shift, mlp_on=mlp_on, gate_scaling=False, **SIZE)
        assert type(spa) is SPABlock and type(dense) is SwinBlock
        assert spa.cfg.position_bias == "swin" and spa.attn.relative_position_bias_table is not None
        x = torch.randn(3, 14, 14, 32)
        policy.counts = torch.full((3,), 14 * 14)
        with torch.inference_mode():
            torch.testing.assert_close(spa(x)[0], dense(x), rtol=1e-4, atol=1e-4)


def test_spa_block_holds_the_swin_blocks_weights():
    with bench_selection():
        dense, spa = block_pair("containers", shift=3, **SIZE)
    own = spa.state_dict()
    shared = dense.state_dict()
    assert set(own) - set(shared) == {"gate.score.weight", "gate.score.bias"}
    for k, v in shared.items():
        assert torch.equal(own[k], v), k


def test_kept_counts_policy_keeps_each_images_best_tokens_and_is_scoped():
    assert BENCH_SELECTION not in SELECTION_POLICIES
    with bench_selection() as policy:
        policy.counts = torch.tensor([0, 2, 4])
        scores = torch.tensor([[3.0, 1.0, 2.0, 0.0]] * 3)
        sel = SELECTION_POLICIES.get(BENCH_SELECTION)(scores, cfg=None, training=False)
        assert sel.mask.tolist() == [[False] * 4, [True, False, True, False], [True] * 4]
        assert sel.counts.tolist() == [0, 2, 4]
    assert BENCH_SELECTION not in SELECTION_POLICIES  # code iterating the registry never meets it


def test_bias_cost_mode(capsys):
    assert main(["bias-cost", "--json", *TINY, "--shifts", "0,3"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["strategy"], r["shift"]) for r in rows] == [
        ("varlen", 0),
        ("containers", 0),
        ("containers", 3),
    ]
    for r in rows:
        assert r["ratio"] == 0.5 and r["swin_ms"] > 0 and r["none_ms"] > 0
        assert r["bias_share_q1"] <= r["bias_share"] <= r["bias_share_q3"] < 1
    assert main(["bias-cost", *TINY]) == 0
    out = capsys.readouterr().out
    assert (
        "| strategy | shift | ratio | kept | bias share (IQR) |" in out and "| containers | 0 | 0.50 |" in out
    )


def test_contract_cost_mode(capsys, monkeypatch):
    from spa_core import contracts

    seen = []
    real = contracts.check_selection

    def spy(*args, **kwargs):  # the mode each timed call ran under
        seen.append(contracts.get_mode())
        return real(*args, **kwargs)

    monkeypatch.setattr("spa_core.select.check_selection", spy)
    assert main(["--contract-cost", "--json", *TINY, "--strategies", "containers,pad"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["strategy"] for r in rows] == ["containers", "pad"]
    for r in rows:
        assert r["off_ms"] > 0 and r["always_ms"] > 0 and r["shapes_ms"] > 0
        assert r["always_cost_q1"] <= r["always_cost"] <= r["always_cost_q3"]
    assert {"always", "first", "off"} <= set(seen) and contracts.get_mode() == "first"
    assert main(["--contract-cost", *TINY]) == 0
    assert (
        "| strategy | ratio | kept | always (IQR) | shapes (IQR) | off ms (IQR) |" in capsys.readouterr().out
    )


def test_train_step_mode(capsys):
    argv = "train-step --preset micro --image 64 --batch 2 --reps 2 --warmup 0".split()
    assert main([*argv, "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    for key in ("speedup", "speedup_q1", "speedup_q3", "flop_ratio", "efficiency", "dense_ms", "spa_ms"):
        assert r[key] > 0, key
    assert abs(r["efficiency"] - r["speedup"] / r["flop_ratio"]) < 1e-3
    assert r["kept_fraction"] == pytest.approx(0.25, abs=0.05) and r["strategy"] == "containers"
    assert r["flop_ratio"] > 1 and 0 < r["dense_spa_stage_share"] < 1
    runner = TrainStepRunner(Timing(reps=2, warmup=0), preset="micro", image=64, batch=2)
    table = runner.header() + "\n" + runner.format_row(r)  # what the command prints without --json
    assert "micro backbone" in runner.title("CPU") and "[3, 4] SPA (containers, top-k 0.25" in runner.title(
        ""
    )
    assert (
        "| model | kept | step ms (IQR) | speedup (IQR) |" in table and "| SPA containers | 0.250 |" in table
    )


def test_ops_times_each_impl_on_both_layouts_with_the_bias_and_the_gate(capsys):
    assert main(["ops", "--json", "--impls", "torch,cpp", *TINY]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {(r["layout"], r["impl"]) for r in rows} == {
        (layout, impl) for layout in ("varlen", "containers", "gate") for impl in ("torch", "cpp")
    }
    for r in rows:
        assert r["ms"] > 0 and r["mmacs"] > 0
        assert r["position_bias"] == ("none" if r["layout"] == "gate" else "swin")
        assert r["speedup"] == 1.0 or r["impl"] != "torch"  # the first impl is the baseline


def test_profile_prints_both_blocks(capsys):
    assert main(["profile", "--strategies", "containers", *TINY]) == 0
    out = capsys.readouterr().out
    assert "## dense window" in out and "## SPA containers at ratio 0.5" in out


def test_blocks_per_impl_share_the_dense_calls(capsys):
    """--impl auto,torch: one row per implementation, same layout and FLOPs, each against the same
    dense calls (one rotation of the dense block and both SPA blocks); the table has an impl column."""
    assert main(["blocks", "--json", "--strategies", "containers", "--impl", "auto,torch", *TINY]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["impl"] for r in rows] == ["auto", "torch"]
    for key in ("strategy", "ratio", "kept_fraction", "flop_ratio", "spa_gmacs", "dense_gmacs", "dense_ms"):
        assert rows[0][key] == rows[1][key], key
    assert main(["blocks", "--strategies", "containers", "--impl", "auto,torch", *TINY]) == 0
    assert "| strategy | impl | dense |" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["blocks", "--impl", "auto,fast"], "unknown implementation 'fast'"),
        (["ops", "--impls", "torch,fast"], "unknown implementation 'fast'"),
        (["blocks", "--strategies", "zip"], "no 'zip' in registry 'pack_strategy'; it holds: containers"),
        (["train-step", "--strategy", "zip"], "no 'zip' in registry 'pack_strategy'"),
        (["--ops", "--bias-cost"], "one mode at a time, got --ops, --bias-cost"),
        (["ops", "--mlp-on", "all"], "unrecognized arguments: --mlp-on"),
        (["blocks", "--reps", "0"], "reps >= 1"),
        (["blocks", "--dim", "30", "--heads", "4"], "dim 30 is not a multiple of num_heads 4"),
        (["blocks", "--ratios", ","], "expected a comma list"),
        (["blocks", "--plugin", "nothere.py"], "nothere.py"),
    ],
)
def test_bad_arguments_are_refused_naming_what_was_wrong(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_a_registered_strategy_is_benched_without_naming_it(capsys):
    """The strategies come from PACK_STRATEGIES: a plugin's strategy is a row of the default run."""
    import dataclasses

    from spa_core.strategies import PackStrategy

    varlen = PACK_STRATEGIES.get("varlen")

    def pack_plugin(*args, **kwargs):  # varlen's pack under the plugin's own name (its contract)
        return dataclasses.replace(varlen.pack(*args, **kwargs), strategy="plugin_varlen")

    with isolated_registries():
        strategy = PackStrategy(pack_plugin, varlen.attend, varlen.attention_macs)
        PACK_STRATEGIES.register("plugin_varlen", strategy, origin="test")
        assert main(["blocks", "--json", *TINY]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["strategy"] for r in rows] == sorted(["containers", "mask", "pad", "varlen", "plugin_varlen"])
    plugin = next(r for r in rows if r["strategy"] == "plugin_varlen")
    assert plugin["dense"] == "global" and plugin["flop_ratio"] > 1


def test_block_size_and_timing_refuse_bad_values():
    with pytest.raises(ValueError, match="batch must be >= 1"):
        BlockSize(batch=0)
    with pytest.raises(ValueError, match="spread"):
        BlockSize(spread=1.0)
    with pytest.raises(ValueError, match="unknown clock 'gpu'"):
        Timing(clock="gpu")
    assert BlockSize(grid=5).tokens(seed=1).shape == (32, 5, 5, 384)


def test_grid_file_mode_times_every_model_of_a_grid(capsys):
    assert main(["grid", str(SMOKE_GRID), "--reps", "1", "--warmup", "0", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["model"] for r in rows] == ["ratio=0.25", "ratio=0.5", "dense"]
    assert [r["kept_fraction"] for r in rows] == [0.25, 0.5, 1.0]
    assert rows[-1]["speedup"] == 1.0 and all(r["ms"] > 0 for r in rows)
