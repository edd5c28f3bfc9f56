"""kernels/bench.py: the benchmark command runs (tiny sizes; this is not a timed test), prints the
JSON that scripts read, and builds its blocks without importing spa_core."""

import json
import subprocess
import sys

import pytest
import torch

from kernels.bench import SPAAttentionBlock, _time_pairs, main

KEYS = {"strategy", "ratio", "kept_fraction", "time_ratio", "flop_ratio", "efficiency"}


def test_bench_json(capsys):
    argv = "--json --batch 2 --grid 7 --dim 32 --heads 2 --reps 2 --warmup 0 --ratios 0.5,1.0".split()
    assert main(argv) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 4 * 2
    for r in rows:
        assert KEYS <= set(r)
        assert abs(r["efficiency"] - r["time_ratio"] / r["flop_ratio"]) < 1e-3
        assert 0 < r["kept_fraction"] <= 1
        assert 1 <= r["op_threads"] <= r["threads"]


def test_bench_table(capsys):
    assert (
        main(
            "--batch 2 --grid 7 --dim 32 --heads 2 --reps 1 --warmup 0 --ratios 0.5 --strategies varlen".split()
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "| varlen | global | 0.50 |" in out


def test_spa_block_strategies_agree():
    """varlen and pad compute the same function; mask too (it attends over the same keys)."""
    torch.manual_seed(0)
    x = torch.randn(3, 49, 32)
    counts = torch.tensor([0, 20, 49])
    ref = SPAAttentionBlock(32, 2, "varlen").eval()
    for strategy in ("pad", "mask"):
        other = SPAAttentionBlock(32, 2, strategy).eval()
        other.load_state_dict(ref.state_dict())
        torch.testing.assert_close(other(x, counts), ref(x, counts), rtol=1e-5, atol=1e-5)


def test_bench_does_not_import_spa_core():
    code = "import sys, kernels.bench; assert 'spa_core' not in sys.modules and 'harness' not in sys.modules"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


TINY = "--batch 2 --grid 7 --dim 32 --heads 2 --reps 2 --warmup 1 --ratios 0.5".split()


def test_bench_rows_carry_per_call_times(capsys):
    assert main(["--json", "--strategies", "varlen", *TINY]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    for side in ("dense", "spa"):
        assert 0 < row[f"{side}_ms_q1"] <= row[f"{side}_ms"] <= row[f"{side}_ms_q3"]


def test_bench_ops_times_each_impl_on_both_layouts_and_the_gate(capsys):
    assert main(["--ops", "--json", "--impls", "torch,cpp,ref", *TINY]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {(r["layout"], r["impl"]) for r in rows} == {
        (layout, impl) for layout in ("varlen", "containers", "gate") for impl in ("torch", "cpp", "ref")
    }
    gate = [r for r in rows if r["layout"] == "gate"]
    assert len(gate) == 3 and all(r["ratio"] is None for r in gate)  # the gate scores every token: no ratio
    for r in rows:
        assert r["ms"] > 0 and r["mmacs"] > 0 and r["gmacs_per_s"] > 0
        if r["impl"] == "torch":
            assert r["speedup"] == 1.0  # the first impl is the baseline


def test_bench_profile_prints_both_blocks(capsys):
    assert main(["--profile", "--strategies", "containers", *TINY]) == 0
    out = capsys.readouterr().out
    assert "## dense window" in out and "## SPA containers at ratio 0.5" in out
    assert "spa::varlen_attention" in out  # the SPA block's profile names our op


def test_bench_blocks_per_impl_share_the_dense_calls(capsys):
    """--impl auto,torch: one row per implementation, same layout and FLOPs, table with an impl column."""
    assert main(["--json", "--strategies", "containers", "--impl", "auto,torch", *TINY]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["impl"] for r in rows] == ["auto", "torch"]
    for key in ("strategy", "ratio", "kept_fraction", "flop_ratio", "spa_gmacs", "dense_gmacs"):
        assert rows[0][key] == rows[1][key]
    assert main(["--strategies", "varlen", "--impl", "auto,torch", *TINY]) == 0
    out = capsys.readouterr().out
    assert "| strategy | impl | dense |" in out and "| varlen | torch | global | 0.50 |" in out


def test_bench_rejects_unknown_impls(capsys):
    with pytest.raises(SystemExit):
        main(["--impl", "auto,fast", *TINY])
    assert "unknown implementation 'fast'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--ops", "--impl", "auto,torch", *TINY])


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
