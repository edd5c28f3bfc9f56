"""Helpers shared by the report tests: the default grid's variants and a result row as a trial
writes it."""

# the default grid's variant names, each with its selection, ratio and true mAP effect
DEFAULT_VARIANTS = {
    "topk-0.25": ("topk", 0.25, -0.04),
    "topk-0.5": ("topk", 0.5, 0.0),
    "topk-0.75": ("topk", 0.75, 0.0),
    "random-0.5": ("random", 0.5, -0.08),
    "gate": ("gate", 0.5, 0.05),
    "gate-nosup": ("gate", 0.5, 0.0),
}


def result_row(name, seed, selection=None, ratio=None, **metrics) -> dict:
    """A finished trial's row of experiment "exp": the dense baseline when ``selection`` is None, else
    an SPA variant (supervision "none" when the name says nosup)."""
    return {
        "experiment": "exp",
        "name": name,
        "seed": seed,
        "status": "done",
        "config_hash": f"{name}-{seed}",
        "model.variant": "spa" if selection else "dense",
        "model.spa.selection": selection,
        "model.spa.ratio": ratio,
        "model.spa.supervision": None if selection is None else ("none" if "nosup" in name else "labels"),
        "error": None,
        **metrics,
    }
