"""Reporting on a results store: the rows it holds turned into comparison tables, statistics and plots.

The report reads what the run chain (``harness.run``) wrote to the store and nothing else of it:
``command`` (``spa-harness report``), ``tables`` (rows aggregated per variant, paired deltas),
``stats`` (intervals, tests, verdicts), ``axes`` (one table per grid axis), ``render`` (Markdown,
CSV, HTML, JSON) and ``plots``.
"""

from harness.report.command import (
    FORMATS,
    build_report,
    build_reports,
    compare,
    report_command,
    write_report,
    write_report_files,
)

__all__ = [
    "FORMATS",
    "build_report",
    "build_reports",
    "compare",
    "report_command",
    "write_report",
    "write_report_files",
]
