"""``spa-harness``: run a grid on Ray, see where it stands, report on it, list the variants.

    spa-harness run GRID [--results DIR|URI] [--results-shared] [--address ADDR] [--max-concurrent N]
                         [--smoke] [--dry-run] [--rerun] [--plugin FILE] [--name NAME] [--track mlflow[=URI]|wandb[=PROJECT]]
    spa-harness status RESULTS
    spa-harness report RESULTS [--baseline NAME] [--format md|csv|html|json] [--out DIR|FILE] [--merge]
    spa-harness variants

``run`` expands GRID (``harness.grid.load_grid``), runs the trials that have no finished row yet
(``harness.run.runner.run_grid``) into ``RESULTS/<grid name>``, prints each failed trial's error (its
type, message, the user-code line it came from and its error.txt) and the comparison report
(``harness.report``: deltas paired by seed with 95% intervals and verdicts; a 120-column table).
``--track`` also logs each trial that runs to MLflow or W&B (``harness.run.tracking``).
``report`` reports each experiment of RESULTS apart, or all as one with ``--merge``.
On a Ray cluster (``--address``, ``RAY_ADDRESS``, or inside ``ray job submit``) ``--results`` must be
a store every node sees: an object-store URI, a ``file://`` URI or a path with ``--results-shared``;
a plain local path is refused (docs/cluster.md).
``run`` (``--dry-run`` too) prints a ``warning:`` line on stderr for each base key that an axis
overrides in every value (``harness.grid``), naming both places, and a ``rerun:`` line for each
trial that runs again although a row of it is stored, saying why (``--dry-run``: in its state column).
Exit status: 0 when every trial is done, 1 when some failed, 2 for a bad grid, plugin or arguments
(one ``error:`` line, no traceback). ``run``, ``status`` and ``report`` print a ``warning:`` line
for every row file of the store that cannot be read (its trial counts as not done).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from harness.config import smoke_overrides
from harness.grid import GridError, load_grid
from harness.names import UnsafeNameError, check_name
from harness.plugins import (
    PluginError,
    list_variants,
    load_entry_point_plugins,
    load_plugin,
    resolve_plugin_spec,
)
from harness.provenance import short_commit
from harness.report import report_command, write_report_files
from harness.results import Experiment, ResultsStore, damaged_files, load, split_uri, trial_states

# The run chain (harness.run) is imported by the commands that run or watch trials, not here: it
# brings Ray Tune and Ray Train, about 2 s of start-up that `report` and `variants` do not need.

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spa-harness", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a grid of trials (each a DeepSpeed job) on Ray Tune")
    r.add_argument("grid", help="grid file (YAML), e.g. ablations/grids/smoke.yaml")
    r.add_argument(
        "--results",
        default=os.environ.get("SPA_HARNESS_RESULTS", "results"),
        help="results store: a folder or a pyarrow filesystem URI such as s3://bucket/spa "
        "(default: ./results); the experiment goes to RESULTS/<grid name>. On a Ray cluster "
        "every node writes rows here: an object-store URI, a file:// URI, or --results-shared",
    )
    r.add_argument(
        "--results-shared",
        action="store_true",
        default=os.environ.get("SPA_HARNESS_RESULTS_SHARED", "") not in ("", "0"),
        help="--results is a folder every node of the cluster sees at the same path (NFS, a "
        "shared mount); without it a plain path is refused on a cluster",
    )
    r.add_argument(
        "--name",
        default=None,
        help="experiment name, a plain name: letters, digits and ._-=,+, not starting with '.', "
        "at most 100 characters (default: the grid's name)",
    )
    r.add_argument(
        "--address",
        default=None,
        help="Ray cluster to run on (default: $RAY_ADDRESS, else an embedded local Ray)",
    )
    r.add_argument(
        "--max-concurrent",
        type=int,
        default=None,
        help="trials running at once (default: as resources allow)",
    )
    r.add_argument(
        "--dry-run", action="store_true", help="print the expanded trials and their resources; run nothing"
    )
    r.add_argument("--smoke", action="store_true", help="few steps, little data: a quick end-to-end check")
    r.add_argument(
        "--rerun",
        action="store_true",
        help="run every trial again, even those with a finished row in this experiment or, by "
        "config hash, in another experiment of RESULTS (which are otherwise reused, not run)",
    )
    r.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="FILE",
        help="plugin module or .py file registering variants (repeatable)",
    )
    r.add_argument(
        "--no-progress",
        action="store_true",
        help="no live table or summary lines: one line per trial start and end only",
    )
    r.add_argument("--no-report", action="store_true", help="do not print the comparison table at the end")
    r.add_argument(
        "--track",
        default=None,
        metavar="mlflow[=URI]|wandb[=PROJECT]",
        help="log each trial (config, curves, final metrics, status) and the report to MLflow "
        "(default URI: the file store RESULTS/<experiment>/mlruns) or W&B (offline unless WANDB_MODE "
        "says otherwise; run files in WANDB_DIR or RESULTS/<experiment>/wandb)",
    )

    s = sub.add_parser("status", help="done / running / failed / pending per trial")
    s.add_argument("results", help="a results store or one experiment's folder (or URI)")

    rep = sub.add_parser("report", help="comparison tables and plots of a results store")
    rep.add_argument("results")
    rep.add_argument("--baseline", default=None)
    rep.add_argument(
        "--format",
        default=None,
        choices=("md", "csv", "html", "json"),
        help="default: the suffix of --out, else md",
    )
    rep.add_argument(
        "--out",
        default=None,
        help="a file (report.html: plots embedded) or a folder (DIR/index.html or "
        "DIR/report.<format>, plots in DIR/plots); default: print",
    )
    rep.add_argument(
        "--merge",
        action="store_true",
        help="one report over every experiment of RESULTS (default: one section each)",
    )

    v = sub.add_parser("variants", help="every registered variant and where it came from")
    v.add_argument("--plugin", action="append", default=[], metavar="FILE", help="also load this plugin")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"run": _run, "status": _status, "report": _report, "variants": _variants}[args.command](args)
    except KeyboardInterrupt:
        print(
            "interrupted; finished trials are kept: run the same command again to continue", file=sys.stderr
        )
        return 130
    except BrokenPipeError:  # output piped into head & co.
        sys.stderr.close()
        return 0


def _console() -> Console:
    return Console() if sys.stdout.isatty() else Console(width=160)


def _error(console: Any, text: str) -> None:
    """One ``error:`` line, never wrapped (a log reader greps it); ``text`` is not markup."""
    console.print(f"[red]error:[/] {escape(text)}", markup=True, highlight=False, soft_wrap=True)


def _warn_damaged(path: str, experiment: str | None = None) -> None:
    """A ``warning:`` line on stderr per store file that is there but cannot be read."""
    try:
        found = (
            damaged_files(path)
            if experiment is None
            else ResultsStore(path).experiment(experiment).damaged_rows()
        )
    except (OSError, ValueError):
        return  # a store that cannot be listed has its own error where it is read
    for d in found:
        why = "its trial counts as not done" if d.path.endswith("row.json") else "read as absent"
        print(f"warning: damaged file {d}; {why}", file=sys.stderr)


def _run(args: argparse.Namespace) -> int:
    from harness.run.runner import cluster_address, plan, results_problem, run_grid, trial_resources
    from harness.run.tracking import TrackingError, parse_track

    console = _console()
    try:
        if args.name is not None:
            check_name(args.name, "--name")
        track = parse_track(args.track)
        grid = load_grid(
            args.grid, extra_plugins=args.plugin, overrides=smoke_overrides() if args.smoke else None
        )
    except (GridError, UnsafeNameError, TrackingError) as e:
        _error(console, str(e))
        return 2
    for w in grid.warnings:  # what the grid sets but no trial uses, before anything runs
        print(f"warning: {w}", file=sys.stderr)
    experiment = args.name or grid.name
    problem = results_problem(args.results, cluster_address(args.address), shared=args.results_shared)
    if problem is not None:
        _error(console, problem)
        return 2
    _warn_damaged(args.results, experiment)
    if args.dry_run:
        _print_dry_run(
            console,
            grid,
            plan(grid.trials, ResultsStore(args.results), experiment, rerun=args.rerun),
            trial_resources,
            args,
        )
        return 0
    try:
        summary = run_grid(
            grid.trials,
            results=args.results,
            experiment=experiment,
            address=args.address,
            max_concurrent=args.max_concurrent,
            rerun=args.rerun,
            progress=not args.no_progress,
            source=args.grid,  # as typed: under `ray job submit` grid.source is in Ray's temporary copy
            track=track,
            results_shared=args.results_shared,
            report_files=write_report_files,
            comparisons=grid.comparisons.to_dict(),
            on_plan=lambda planned: _print_reruns(console, planned),
        )
    except TrackingError as e:
        _error(console, str(e))
        return 2
    counts: dict[str, int] = {}
    for s in summary.states.values():
        counts[s] = counts.get(s, 0) + 1
    reused = summary.reused
    console.print(
        f"{experiment}: "
        + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        + f" in {summary.wall_s:.0f} s"
        + (" (resumed)" if summary.restored else "")
        + (
            "; rows not run again: "
            + ", ".join(
                f"{n} reused from experiment {e}" if e != experiment else f"{n} kept from earlier runs"
                for e, n in sorted(reused.items())
            )
            + " (--rerun runs them)"
            if reused
            else ""
        )
        + f"\nresults: {summary.uri}",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    if summary.tracking is not None:
        t = summary.tracking
        console.print(
            f"tracking: {t.kind} {t.uri} (experiment {t.experiment}, grid run {t.parent_run_id})"
            + (
                f"\noffline W&B runs: {t.dir}/wandb (upload: wandb sync {t.dir}/wandb/offline-run-*)"
                if t.kind == "wandb" and t.mode in ("offline", "dryrun")
                else ""
            ),
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
    _print_failures(console, summary)
    if not args.no_report:
        try:
            print(report_command(summary.uri, fmt="md"))
        except Exception as e:  # the report is a convenience here; the rows are what matter
            console.print(f"(no report: {type(e).__name__}: {e})", markup=False)
    return 0 if summary.ok else 1


def _print_reruns(console: Any, planned: list) -> None:
    """One line per trial that runs although the experiment has a row of it, saying why."""
    for p in planned:
        if p.state == "pending" and p.reason and p.reason != "--rerun":
            console.print(f"rerun: {p.name} (seed {p.cfg.seed}): {p.reason}", markup=False, highlight=False,
                          soft_wrap=True)  # fmt: skip


def _print_failures(console: Any, summary: Any) -> None:
    """Each trial that did not finish, with the first line of its error."""
    exp = Experiment(*split_uri(summary.uri))
    for p in summary.trials:
        state = summary.states.get(p.config_hash)
        if state in ("failed", "timeout"):
            error = ((exp.read_row(p.config_hash) or {}).get("error") or "").splitlines()
            console.print(
                f"{state}: {p.name} ({p.config_hash}): {error[0] if error else '?'}",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )


def _print_dry_run(console: Any, grid: Any, planned: list, trial_resources, args: argparse.Namespace) -> None:
    table = Table(title=f"{grid.name}: {len(planned)} trials ({grid.source})")
    for col in ("trial", "seed", "config hash", "workers", "CPUs", "GPUs", "timeout s", "retries", "state"):
        table.add_column(col)
    for p in planned:
        r = p.cfg.resources
        state = {"done": "done (kept)", "reused": f"reused from {p.reused_from}"}.get(p.state, "would run")
        if p.reason:
            state += f": {p.reason}"
        table.add_row(
            p.name,
            str(p.cfg.seed),
            p.config_hash,
            str(r.workers),
            f"{r.workers * r.cpus_per_worker:g}",
            f"{r.workers * r.gpus_per_worker:g}",
            f"{r.timeout_s:g}",
            str(r.retries),
            state,
        )
    console.print(table)
    if args.smoke:
        console.print("--smoke: steps, data and benchmark shrunk (harness.config.smoke_overrides)")


def _status(args: argparse.Namespace) -> int:
    from harness.run.progress import render_states

    _warn_damaged(args.results)
    states = trial_states(args.results)
    console = _console()
    if not states:
        console.print(f"no experiments at {args.results}")
        return 1
    console.print(render_states(states))
    counts: dict[str, int] = {}
    for s in states:
        counts[s["state"]] = counts.get(s["state"], 0) + 1
    console.print(", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    _warn_commits(states)
    df = load(args.results)
    done = df[df["status"] == "done"]
    if len(done) and "overhead_s" in done.columns:
        console.print(
            f"per done trial, median: wall {done['wall_s'].median():.2f} s, measured work "
            f"{done['work_s'].median():.2f} s, harness overhead {done['overhead_s'].median():.2f} s "
            f"(over {len(done)} trials)"
        )
    return 0


def _warn_commits(states: list[dict[str, Any]]) -> None:
    """A ``warning:`` line when the rows of one experiment come from more than one commit."""
    by_exp: dict[str, dict[str, int]] = {}
    for s in states:
        if s.get("git_commit"):
            commits = by_exp.setdefault(str(s.get("experiment")), {})
            commits[str(s["git_commit"])] = commits.get(str(s["git_commit"]), 0) + 1
    for exp, commits in by_exp.items():
        if len(commits) > 1:
            parts = ", ".join(f"{short_commit(c)} ({n})" for c, n in sorted(commits.items()))
            print(f"warning: {exp}: the rows come from {len(commits)} commits: {parts}", file=sys.stderr)


def _report(args: argparse.Namespace) -> int:
    _warn_damaged(args.results)
    text = report_command(
        args.results,
        baseline=args.baseline,
        fmt=args.format,
        out=args.out,
        merge=args.merge,
        warn=lambda w: print(f"warning: {w}", file=sys.stderr),
    )
    if args.out is None:
        print(text)
    else:
        print(f"report written to {args.out}")
    return 0


def _variants(args: argparse.Namespace) -> int:
    try:
        load_entry_point_plugins()
    except PluginError as e:
        _error(_console(), f"plugins: {e}")
        return 2
    for spec in args.plugin:  # as `run` loads and reports them (harness.grid.load_grid)
        try:
            load_plugin(resolve_plugin_spec(spec))
        except PluginError as e:
            _error(_console(), f"--plugin: {e}")
            return 2
    df = list_variants()
    print(df.to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
