"""Running a grid: trials planned against the results store, scheduled on Ray Tune, each trained,
evaluated and measured under Ray Train and DeepSpeed, its row written to the store.

``runner`` (plan, schedule, resume), ``trial`` (one Tune trial: attempts, watchdog, rows),
``progress`` (the driver's live view), ``tracking`` (MLflow / W&B). What a trial computes is the
task's (``harness.task``); what a report says of the rows is ``harness.report``'s.
"""
