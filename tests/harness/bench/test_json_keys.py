"""The JSON keys of every bench mode, in order: scripts that users wrote read them, so a change here is
a change of interface. Captured from the bench before it became one runner per mode (commit 45c430b)."""

import json
from pathlib import Path

import pytest

from harness.bench import main
from harness.bench.cli import subcommand_argv

SMOKE_GRID = Path(__file__).resolve().parents[3] / "ablations" / "grids" / "smoke.yaml"
TINY = "--batch 2 --grid 4 --window 2 --dim 32 --heads 2 --reps 1 --warmup 0 --ratios 0.5".split()
ENV = ("reps", "threads", "op_threads", "kernel_threads", "clock")

# One row's keys as the JSON has them, written as text: the order of a row reads at a glance.
BLOCK_KEYS = (
    *"strategy ratio shift kept_fraction time_ratio time_ratio_q1 time_ratio_q3 flop_ratio efficiency".split(),
    *"efficiency_q1 efficiency_q3 dense_gmacs spa_gmacs dense_ms dense_ms_q1 dense_ms_q3 spa_ms".split(),
    *"spa_ms_q1 spa_ms_q3 dense position_bias mlp_on impl".split(),
    *ENV,
)
BIAS_COST_KEYS = (
    *"strategy ratio shift kept_fraction bias_share bias_share_q1 bias_share_q3 swin_ms swin_ms_q1".split(),
    *"swin_ms_q3 none_ms none_ms_q1 none_ms_q3 mlp_on impl".split(),
    *ENV,
)
TRAIN_STEP_KEYS = (
    *"preset image batch depths embed_dim window spa_stages strategy mlp_on ratio kept_fraction".split(),
    *"speedup speedup_q1 speedup_q3 flop_ratio efficiency efficiency_q1 efficiency_q3".split(),
    *"dense_fwd_gmacs spa_fwd_gmacs dense_spa_stage_share dense_ms dense_ms_q1 dense_ms_q3".split(),
    *"spa_ms spa_ms_q1 spa_ms_q3 impl".split(),
    *ENV,
)
OPS_KEYS = (*"layout ratio impl mmacs position_bias ms ms_q1 ms_q3 gmacs_per_s speedup".split(), *ENV)
GRID_KEYS = (*"grid model kept_fraction batch ms ms_q1 ms_q3 speedup".split(), *ENV)

# mode: (the subcommand's argv, the same run in the one-command bench's flags, keys, rows or None)
MODES = {
    "blocks": (["blocks", "--json", *TINY], ["--json", *TINY], BLOCK_KEYS, 4),
    "blocks per impl": (
        ["blocks", "--json", "--strategies", "containers", "--impl", "auto,torch", *TINY],
        ["--json", "--strategies", "containers", "--impl", "auto,torch", *TINY],
        BLOCK_KEYS,
        2,
    ),
    "bias cost": (["bias-cost", "--json", *TINY], ["--bias-cost", "--json", *TINY], BIAS_COST_KEYS, 2),
    "train step": (
        "train-step --preset micro --image 64 --batch 2 --reps 1 --warmup 0 --json".split(),
        "--train-step --preset micro --image 64 --batch 2 --reps 1 --warmup 0 --json".split(),
        TRAIN_STEP_KEYS,
        None,  # one object, not a list
    ),
    "ops": (["ops", "--json", *TINY], ["--ops", "--json", *TINY], OPS_KEYS, 6),
    "grid": (
        ["grid", str(SMOKE_GRID), "--reps", "1", "--warmup", "0", "--json"],
        ["--grid-file", str(SMOKE_GRID), "--reps", "1", "--warmup", "0", "--json"],
        GRID_KEYS,
        3,
    ),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_the_old_flags_name_the_same_run(mode):
    argv, old, _, _ = MODES[mode]
    assert subcommand_argv(old) == argv


@pytest.mark.parametrize("mode", list(MODES))
def test_json_keys_of_every_mode(mode, capsys):
    argv, _, keys, n_rows = MODES[mode]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    if n_rows is None:
        assert isinstance(out, dict)
        rows = [out]
    else:
        assert isinstance(out, list) and len(out) == n_rows
        rows = out
    for row in rows:
        assert tuple(row) == keys
