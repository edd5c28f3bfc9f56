"""kernels/bench.py: the benchmark command runs (tiny sizes; this is not a timed test), prints the
JSON that scripts read, and builds its blocks without importing spa_core."""

import json
import subprocess
import sys

import torch

from kernels.bench import SPAAttentionBlock, main

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
