"""The benchmark of SPA (Select and Pack Attention, arXiv 2410.23608) on CPU: ``python -m harness.bench
MODE``, one runner per mode, every one timing spa_core's own blocks and backbones (no second
implementation), calls in rotation (``harness.task.timing``) so that machine load falls on both sides
of a ratio alike.

- ``blocks`` (``harness.bench.blocks``): the SPA block against the dense Swin block it replaces, per
  pack strategy, shift and kept ratio: time ratio, FLOP ratio, efficiency;
- ``bias-cost`` (``bias_cost``): the share of the SPA block's time Swin's position bias costs;
- ``contract-cost`` (``contract_cost``): what the contract checks of ``spa_core.contracts`` cost it;
- ``train-step`` (``train_step``): a training step of an SPA backbone against its dense twin;
- ``ops`` (``ops``): the varlen attention op and the gate's scores alone, per kernel implementation;
- ``profile`` (``profile``): torch.profiler's per-op table of each block;
- ``grid`` (``grid``): the backbone and head forward of every model of a grid file.

Shared: the input size and timing settings (``common``), the bench's selection of per-image counts
(``selection``), the block pair and its FLOP count (``pair``); the command line (``cli``).
"""

from harness.bench.bias_cost import BiasCostRunner
from harness.bench.blocks import BlocksRunner
from harness.bench.cli import main
from harness.bench.common import BlockSize, Runner, Timing
from harness.bench.contract_cost import ContractCostRunner
from harness.bench.grid import GridRunner
from harness.bench.ops import OpsRunner
from harness.bench.pair import block_pair
from harness.bench.profile import ProfileRunner
from harness.bench.selection import BENCH_SELECTION, KeptCounts, bench_selection
from harness.bench.train_step import TrainStepRunner

__all__ = [
    "main",
    "Runner",
    "BlockSize",
    "Timing",
    "BlocksRunner",
    "BiasCostRunner",
    "ContractCostRunner",
    "TrainStepRunner",
    "OpsRunner",
    "ProfileRunner",
    "GridRunner",
    "block_pair",
    "bench_selection",
    "KeptCounts",
    "BENCH_SELECTION",
]
