"""``python -m harness.bench MODE [options]``: one subcommand per bench mode; each prints a Markdown table as
its rows come, or with ``--json`` the rows as one JSON list (``train-step``: one object).

The flags of the bench before it had subcommands still work: ``--bias-cost``, ``--contract-cost``,
``--train-step``, ``--ops``, ``--profile`` and ``--grid-file GRID`` name the mode, no mode flag is
``blocks``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

from harness.bench import bias_cost, blocks, contract_cost, grid, ops, profile, train_step
from harness.bench.common import CLOCKS, BlockSize, Runner, Timing, machine
from harness.plugins import PluginError, load_entry_point_plugins, load_plugin
from kernels import ENV_VAR, IMPLS
from spa_core.config import SPAConfig, config_rules
from spa_core.registry import PACK_STRATEGIES

__all__ = ["main", "build_parser", "MODES"]

_RULES = config_rules(SPAConfig)
MODES = ("blocks", "bias-cost", "contract-cost", "train-step", "ops", "profile", "grid")


# --- options ----------------------------------------------------------------------------------------
# Each subcommand gets its own copies of the shared options (functions, not argparse parents: a
# parent's actions are shared objects, and one subcommand's defaults would leak into the others).


def _csv(cast: Callable[[str], Any] = str) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        items = tuple(cast(t.strip()) for t in text.split(",") if t.strip())
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma list, got {text!r}")
        return items

    parse.__name__ = f"comma list of {cast.__name__}"  # what argparse names in its error
    return parse


def _timing_options(p: argparse.ArgumentParser, *, reps: int, warmup: int, json_rows: bool = True) -> None:
    if json_rows:
        p.add_argument("--json", action="store_true", help="print the rows as JSON instead of the table")
    p.add_argument("--reps", type=int, default=reps, help=f"timed rounds of calls (default {reps})")
    p.add_argument(
        "--warmup",
        type=int,
        default=warmup,
        help=f"untimed rounds first (default {warmup}): the allocator's first calls page-fault fresh memory",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall: elapsed time; cpu: process CPU time, robust to other load on a shared machine "
        "when used with --threads 1",
    )
    p.add_argument("--seed", type=int, default=0)


def _size_options(p: argparse.ArgumentParser) -> None:
    d = BlockSize()
    p.add_argument("--batch", type=int, default=d.batch, help=f"images per batch (default {d.batch})")
    p.add_argument("--grid", type=int, default=d.grid, help=f"tokens per side, N = grid^2 (default {d.grid})")
    p.add_argument("--dim", type=int, default=d.dim)
    p.add_argument("--heads", type=int, default=d.num_heads)
    p.add_argument("--window", type=int, default=d.window, help="Swin's window M; containers hold L = M^2")
    p.add_argument("--spread", type=float, default=d.spread, help="relative spread of per-image counts")


def _block_options(p: argparse.ArgumentParser, *, strategies: str, ratios: str, shifts: bool = True) -> None:
    p.add_argument(
        "--strategies",
        type=_csv(),
        default=None,
        help=f"comma list of pack strategies, any PACK_STRATEGIES holds (default: {strategies})",
    )
    p.add_argument(
        "--ratios", type=_csv(float), default=_csv(float)(ratios), help=f"kept ratios (default {ratios})"
    )
    if shifts:
        p.add_argument(
            "--shifts", type=_csv(int), default=(0,), help="containers: shifts (0,3: unshifted and shifted)"
        )
    p.add_argument("--mlp-on", choices=_RULES["mlp_on"]["choices"], default="selected")
    p.add_argument(
        "--plugin", action="append", default=[], metavar="SPEC", help="load a plugin (more pack strategies)"
    )


def _position_bias_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--position-bias", choices=_RULES["position_bias"]["choices"], default="swin")


def _impl_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--impl", default=None, help="kernel implementation (default: SPA_ATTN_IMPL or auto)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m harness.bench", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="mode", required=True, metavar="MODE")

    def mode(name: str, module: Any, summary: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=summary, description=module.__doc__.split("\n\n")[0])

    b = mode("blocks", blocks, "the SPA block against its Swin block per strategy and ratio")
    _timing_options(b, reps=21, warmup=5)
    _size_options(b)
    _block_options(b, strategies="every registered one", ratios="0.1,0.25,0.5,0.75,1.0")
    _position_bias_option(b)
    b.add_argument(
        "--impl",
        type=_csv(),
        default=None,
        help="kernel implementation (default: SPA_ATTN_IMPL or auto); a comma list (auto,torch) times one "
        "SPA block per implementation against the same dense calls, one row each",
    )

    c = mode("bias-cost", bias_cost, "the share of the SPA block's time the position bias costs")
    _timing_options(c, reps=21, warmup=5)
    _size_options(c)
    _block_options(c, strategies="varlen,containers", ratios="0.5")
    _impl_option(c)

    k = mode("contract-cost", contract_cost, "what the contract checks cost an SPA block, per mode")
    _timing_options(k, reps=21, warmup=5)
    _size_options(k)
    _block_options(k, strategies="containers", ratios="0.25", shifts=False)
    _impl_option(k)

    t = mode("train-step", train_step, "a training step of an SPA backbone against its dense twin")
    _timing_options(t, reps=11, warmup=2)
    t.add_argument("--preset", default="swin_t", help="backbone preset (default swin_t)")
    t.add_argument("--image", type=int, default=112, help="image side, pixels (default 112)")
    t.add_argument("--batch", type=int, default=32)
    t.add_argument(
        "--depths", type=_csv(int), default=None, help="override the preset's depths, e.g. 2,2,6,2"
    )
    t.add_argument("--embed-dim", type=int, default=None, help="override the preset's embed_dim")
    t.add_argument("--strategy", default="containers", help="pack strategy of the SPA stages")
    t.add_argument("--ratio", type=float, default=0.25, help="kept ratio of the SPA stages (top-k)")
    t.add_argument("--mlp-on", choices=_RULES["mlp_on"]["choices"], default="selected")
    _impl_option(t)

    o = mode("ops", ops, "the varlen attention op and the gate's scores alone, per implementation")
    _timing_options(o, reps=21, warmup=5)
    _size_options(o)
    o.add_argument("--ratios", type=_csv(float), default=(0.25, 0.5), help="kept ratios (default 0.25,0.5)")
    o.add_argument(
        "--impls", type=_csv(), default=("torch", "cpp"), help="implementations, the first the baseline"
    )
    o.add_argument("--shift", type=int, default=0, help="the containers' window shift")
    _position_bias_option(o)

    f = mode("profile", profile, "torch.profiler's per-op table of each block")
    _timing_options(f, reps=21, warmup=5, json_rows=False)
    _size_options(f)
    _block_options(f, strategies="every registered one", ratios="0.1,0.25,0.5,0.75,1.0", shifts=False)
    f.add_argument("--shift", type=int, default=0, help="the containers' window shift")
    _position_bias_option(f)
    _impl_option(f)

    g = mode(
        "grid", grid, "the backbone and head forward (no NMS) of every model of a grid file, in rotation"
    )
    g.add_argument("grid_file", metavar="GRID", help="a grid file (or a built-in grid's name)")
    _timing_options(g, reps=21, warmup=5)
    _impl_option(g)
    return p


# --- the one-command bench's flags -------------------------------------------------------------------

_MODE_FLAGS = {
    "--bias-cost": "bias-cost",
    "--contract-cost": "contract-cost",
    "--train-step": "train-step",
    "--ops": "ops",
    "--profile": "profile",
}
# Options whose list became one value in a mode (the old bench took the list's first item there), or
# that a mode never read (None: dropped).
_FIRST_OF: dict[str, dict[str, str | None]] = {
    "train-step": {"--strategies": "--strategy", "--ratios": "--ratio"},
    "contract-cost": {"--shifts": None},
    "ops": {"--shifts": "--shift"},
    "profile": {"--shifts": "--shift"},
}


def subcommand_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` of the one-command bench (``[--bias-cost | --train-step | --ops | --profile |
    --grid-file GRID] [options]``) as the subcommand it names; an argv starting with a subcommand or
    ``-h`` is returned unchanged. Raises ``ValueError`` for two modes at once."""
    argv = list(argv)
    if argv and (argv[0] in MODES or argv[0] in ("-h", "--help")):
        return argv
    modes, rest, grid_file = [], [], []
    it = iter(argv)
    for a in it:
        if a in _MODE_FLAGS:
            modes.append(a)
        elif a == "--grid-file" or a.startswith("--grid-file="):
            modes.append("--grid-file")
            grid_file = [a.split("=", 1)[1] if "=" in a else next(it, "")]
        else:
            rest.append(a)
    if len(modes) > 1:
        raise ValueError(f"one mode at a time, got {', '.join(modes)}")
    mode = "grid" if modes == ["--grid-file"] else _MODE_FLAGS.get(modes[0], "") if modes else "blocks"
    renames = _FIRST_OF.get(mode, {})
    out: list[str] = []
    it = iter(rest)
    for a in it:
        opt, eq, value = a.partition("=")
        if opt in renames:
            value = value if eq else next(it, "")
            new = renames[opt]
            if new is not None:  # None: the mode has no such option (the old bench ignored it)
                out += [new, value.split(",")[0]]
        else:
            out.append(a)
    return [mode, *grid_file, *out]


# --- running a mode ----------------------------------------------------------------------------------


def _strategies(a: argparse.Namespace, default: Sequence[str] | None) -> tuple[str, ...]:
    for spec in a.plugin:
        load_plugin(spec)
    load_entry_point_plugins()
    names = tuple(a.strategies or default or PACK_STRATEGIES)
    for name in names:
        PACK_STRATEGIES.get(name)  # KeyError naming the registry and what it holds
    return names


def _check_impl(impl: str | None) -> str | None:
    if impl is not None and impl.lower() not in IMPLS:
        raise ValueError(f"unknown implementation {impl!r}; known: {', '.join(IMPLS)}")
    return impl


def _size(a: argparse.Namespace) -> BlockSize:
    return BlockSize(a.batch, a.grid, a.dim, a.heads, a.window, a.spread)


def _runner(a: argparse.Namespace) -> Runner | profile.ProfileRunner:
    timing = Timing(a.reps, a.warmup, a.clock, a.seed)
    if a.mode == "blocks":
        impls = tuple(_check_impl(i) for i in a.impl) if a.impl else (None,)
        return blocks.BlocksRunner(
            _size(a),
            timing,
            strategies=_strategies(a, None),
            ratios=a.ratios,
            shifts=a.shifts,
            position_bias=a.position_bias,
            mlp_on=a.mlp_on,
            impls=impls,
        )
    if a.mode == "profile":
        return profile.ProfileRunner(
            _size(a),
            timing,
            strategies=_strategies(a, None),
            ratios=a.ratios,
            shift=a.shift,
            position_bias=a.position_bias,
            mlp_on=a.mlp_on,
            impl=_check_impl(a.impl),
        )
    if a.mode == "ops":
        for impl in a.impls:
            _check_impl(impl)
        return ops.OpsRunner(
            _size(a), timing, ratios=a.ratios, impls=a.impls, shift=a.shift, position_bias=a.position_bias
        )
    if _check_impl(a.impl) is not None:  # the other modes take the implementation from the environment
        os.environ[ENV_VAR] = a.impl
    if a.mode == "bias-cost":
        strategies = _strategies(a, ("varlen", "containers"))
        return bias_cost.BiasCostRunner(
            _size(a), timing, strategies=strategies, ratios=a.ratios, shifts=a.shifts, mlp_on=a.mlp_on
        )
    if a.mode == "contract-cost":
        strategies = _strategies(a, ("containers",))
        return contract_cost.ContractCostRunner(
            _size(a), timing, strategies=strategies, ratio=a.ratios[0], mlp_on=a.mlp_on
        )
    if a.mode == "train-step":
        PACK_STRATEGIES.get(a.strategy)
        return train_step.TrainStepRunner(
            timing,
            preset=a.preset,
            image=a.image,
            batch=a.batch,
            ratio=a.ratio,
            strategy=a.strategy,
            mlp_on=a.mlp_on,
            depths=a.depths,
            embed_dim=a.embed_dim,
        )
    return grid.GridRunner(a.grid_file, timing)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        argv = subcommand_argv(sys.argv[1:] if argv is None else argv)
    except ValueError as e:
        parser.error(str(e))
    a = parser.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        runner = _runner(a)
    except (ValueError, PluginError) as e:
        parser.error(str(e))
    except KeyError as e:  # an unknown registry name: the message names the registry and what it holds
        parser.error(str(e.args[0]) if e.args else str(e))
    if isinstance(runner, profile.ProfileRunner):
        print(runner.run())
        return 0
    impl = ",".join(a.impl) if a.mode == "blocks" and a.impl else getattr(a, "impl", None)
    if not a.json:
        print(runner.title(machine(impl)))
        print(runner.header())
    rows = []
    for row in runner.rows():
        rows.append(row)
        if not a.json:
            print(runner.format_row(row), flush=True)
    if a.json:
        json.dump(rows[0] if runner.json_object else rows, sys.stdout)
        print()
    return 0
