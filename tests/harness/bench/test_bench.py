"""harness/bench/: the benchmark times spa_core's own blocks (no second implementation), its modes run
and print their fields (tiny sizes; nothing here is a timed test)."""

import json
from pathlib import Path

import pytest
import torch

import harness.bench as bench
from harness.bench import BENCH_SELECTION, STRATEGIES, _time_pairs, bench_selection, block_pair, main
from spa_core.block import SPABlock, SwinBlock
from spa_core.registry import SELECTION_POLICIES

KEYS = {"strategy", "ratio", "kept_fraction", "time_ratio", "flop_ratio", "efficiency"}
TINY = "--batch 2 --grid 7 --dim 32 --heads 2 --reps 2 --warmup 0 --ratios 0.5".split()
SIZE = dict(dim=32, num_heads=2, grid=14, window=7)
SMOKE_GRID = Path(__file__).resolve().parents[3] / "ablations" / "grids" / "smoke.yaml"


def test_bench_json_rows_and_the_efficiency_identity(capsys):
    assert main(["--json", *TINY, "--grid", "4", "--window", "2", "--shifts", "0,1"]) == 0
    rows = json.loads(capsys.readouterr().out)
    # containers at two shifts, the global strategies unshifted
    assert [(r["strategy"], r["shift"]) for r in rows] == [
        ("varlen", 0), ("containers", 0), ("containers", 1), ("pad", 0), ("mask", 0)
    ]  # fmt: skip
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
    assert main(["--strategies", "varlen", *TINY]) == 0
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
    monkeypatch.setattr(bench, "fvcore_macs", lambda module, inputs: 1)  # count only the timed calls
    assert main(["--json", "--strategies", "pad", *TINY, "--reps", "3", "--warmup", "1"]) == 0
    assert calls == {"spa": 4, "swin": 4}


@pytest.mark.parametrize("strategy,shift", [(s, 0) for s in STRATEGIES] + [("containers", 3)])
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
    assert main(["--bias-cost", "--json", *TINY, "--shifts", "0,3"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["strategy"], r["shift"]) for r in rows] == [
        ("varlen", 0),
        ("containers", 0),
        ("containers", 3),
    ]
    for r in rows:
        assert r["ratio"] == 0.5 and r["swin_ms"] > 0 and r["none_ms"] > 0
        assert r["bias_share_q1"] <= r["bias_share"] <= r["bias_share_q3"] < 1
    assert main(["--bias-cost", *TINY]) == 0
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
    argv = "--train-step --preset micro --image 64 --batch 2 --reps 2 --warmup 0".split()
    assert main([*argv, "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    for key in ("speedup", "speedup_q1", "speedup_q3", "flop_ratio", "efficiency", "dense_ms", "spa_ms"):
        assert r[key] > 0, key
    assert abs(r["efficiency"] - r["speedup"] / r["flop_ratio"]) < 1e-3
    assert r["kept_fraction"] == pytest.approx(0.25, abs=0.05) and r["strategy"] == "containers"
    assert r["flop_ratio"] > 1 and 0 < r["dense_spa_stage_share"] < 1
    table = bench._format_train(r)  # what the command prints without --json
    assert (
        "| model | kept | step ms (IQR) | speedup (IQR) |" in table and "| SPA containers | 0.250 |" in table
    )


def test_ops_times_each_impl_on_both_layouts_with_the_bias_and_the_gate(capsys):
    assert main(["--ops", "--json", "--impls", "torch,cpp", *TINY]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {(r["layout"], r["impl"]) for r in rows} == {
        (layout, impl) for layout in ("varlen", "containers", "gate") for impl in ("torch", "cpp")
    }
    for r in rows:
        assert r["ms"] > 0 and r["mmacs"] > 0
        assert r["position_bias"] == ("none" if r["layout"] == "gate" else "swin")
        assert r["speedup"] == 1.0 or r["impl"] != "torch"  # the first impl is the baseline


def test_profile_prints_both_blocks(capsys):
    assert main(["--profile", "--strategies", "containers", *TINY]) == 0
    out = capsys.readouterr().out
    assert "## dense window" in out and "## SPA containers at ratio 0.5" in out


def test_blocks_per_impl_share_the_dense_calls(capsys):
    """--impl auto,torch: one row per implementation, same layout and FLOPs, table with an impl column."""
    assert main(["--json", "--strategies", "containers", "--impl", "auto,torch", *TINY]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["impl"] for r in rows] == ["auto", "torch"]
    for key in ("strategy", "ratio", "kept_fraction", "flop_ratio", "spa_gmacs", "dense_gmacs"):
        assert rows[0][key] == rows[1][key]


def test_rejects_unknown_impls_and_two_modes(capsys):
    with pytest.raises(SystemExit):
        main(["--impl", "auto,fast", *TINY])
    assert "unknown implementation 'fast'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--ops", "--impl", "auto,torch", *TINY])
    with pytest.raises(SystemExit):
        main(["--ops", "--bias-cost", *TINY])
    assert "one mode at a time" in capsys.readouterr().err


def test_time_pairs_alternates_which_block_goes_first_for_every_impl():
    calls = []
    ticks = iter(range(10_000))
    spas = {name: (lambda name=name: calls.append(name)) for name in ("a", "b")}
    out = _time_pairs(lambda: calls.append("dense"), spas, reps=4, warmup=1, clock=lambda: next(ticks))
    assert all(len(td) == len(ts) == 4 for td, ts in out.values())
    pairs = [calls[i : i + 2] for i in range(0, len(calls), 2)]  # 5 rounds x 2 impls, one pair each
    for name in ("a", "b"):
        mine = [p for p in pairs if name in p]
        assert len(mine) == 5
        dense_first = [p[0] == "dense" for p in mine]
        assert all(x != y for x, y in zip(dense_first, dense_first[1:])), dense_first


def test_grid_file_mode_times_every_model_of_a_grid(capsys):
    assert main(["--grid-file", str(SMOKE_GRID), "--reps", "1", "--warmup", "0", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["model"] for r in rows] == ["ratio=0.25", "ratio=0.5", "dense"]
    assert [r["kept_fraction"] for r in rows] == [0.25, 0.5, 1.0]
    assert rows[-1]["speedup"] == 1.0 and all(r["ms"] > 0 for r in rows)
