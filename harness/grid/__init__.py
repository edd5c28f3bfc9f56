"""Grid files: what an ablation runs, expanded into fully resolved trial configs.

A grid is one YAML file (the built-in ones live in ``ablations/grids/``)::

    name: my-ablation                 # default: the file's stem
    description: SPA vs dense at two ratios
    extends: default.yaml             # another grid (relative to this file, or a built-in's name);
                                      # this file changes only what differs
    plugins: [plugins/feature_norm.py, my_pkg.variants]   # dotted modules or .py files to import
    base:                             # TrialConfig keys, nested or dotted (``train.steps: 40``)
      preset: micro
      model.spa.selection: topk
    resources: {workers: 1, cpus_per_worker: 1}           # shorthand for base ``resources.*``
    axes:                             # crossed; a key is a dotted path into the trial config ...
      model.spa.ratio: [0.25, 0.5]
      model.spa.pack: [containers, varlen]
      selection:                      # ... or a named axis whose values are labelled config diffs
        topk50: {model.spa.selection: topk, model.spa.ratio: 0.5}
        gate: {model.spa.selection: gate}
    exclude:                          # drop crossed points matching every key of a rule
      - {model.spa.pack: varlen, model.spa.ratio: 0.25}   # a value may be a list: any of them
    points:                           # extra trials: diffs over base, not crossed with the axes
      - {name: dense, model.variant: dense}
    seeds: 3                          # a count (seeds 0..2) or a list of seeds; every trial repeats
    equivalence_margin: 0.01          # |delta mAP| below this is no difference that matters (the report)
    contrasts:                        # paired comparisons between two variants besides the baseline's:
      - [gate, gate-random]           # gate - gate-random per seed, labelled "gate vs gate-random"
    # or a mapping label -> pair:  contrasts: {where-the-gate-looks: [gate, gate-random]}

Merging under ``extends``: ``base``/``resources`` by dotted key (a child key replaces the parent's
key and anything under or over it), ``axes`` by axis (``null`` removes a parent's axis), ``plugins``
appended, ``points``/``exclude``/``seeds``/``name``/``description``/``equivalence_margin``/
``contrasts`` replaced when given. A base key
that an axis overrides in every value reaches no crossed trial: ``Grid.warnings`` names both places
(``harness.grid.expand``), and the command line prints it.

``equivalence_margin`` and ``contrasts`` change no trial: they say how the report judges the rows
(``harness.report.stats``) and travel to it in ``Grid.comparisons`` (the run writes them into the
experiment's ``experiment.json``). A contrast names two variants of the grid (points or crossed
trials, by trial name); a name the grid does not have is an error at the contrast's line.

Every trial is ``base`` + one value per axis (or one point) + its seed, resolved with
``harness.config.trial_from_dict``; its ``name`` is the point's name, or one part per axis joined by
commas (``ratio=0.25`` for a config key, the bare label for a named axis), the same for all seeds of
a variant, so a report groups by it, its ``plugins`` the absolute specs to load
before building it, and, when the grid has a dense variant (``model.variant: dense``), its
``baseline`` that variant's name, model and head (not hashed): what its speedup is timed against.
Anything wrong (an empty file, a top level that is not a mapping, a grid that names no trial: no
``base``, ``axes`` or ``points`` of its own or inherited; an unknown top-level key or config key, a
wrong type, a name no registry holds, a file that does not exist, an exclude rule that matches
nothing, two trials with the same config, a contrast naming a variant the grid does not have)
raises ``GridError`` naming the file, the line and the key and what was expected, before anything
runs.

Names that become parts of paths are plain names (``harness.names``: letters, digits and
``. _ - = , +``, not starting with ``.``, at most 100 characters): the grid's ``name`` (or its
file's stem), each point's ``name`` and each label of a named axis. A crossed trial's name is made
of its labels; where it names a folder it is mapped onto a plain name.

The package's rooms, from the file to the trials:

- ``yaml_lines``: reading YAML with the line of every key; ``GridError``; the located values (``Val``,
  ``Loc``: a value and the file, line and key an error about it names) that every later room carries.
- ``spec``: finding a grid file, reading its top-level keys, following ``extends`` and merging.
- ``checks``: one config key and value alone (known key, type, registry name, range); plain names.
- ``comparisons``: ``equivalence_margin`` and ``contrasts``, read and checked; ``Comparisons``.
- ``expand``: plugins loaded, axes crossed, excludes and points applied, trials resolved: ``load_grid``
  and ``Grid``.
"""

from harness.grid.comparisons import Comparisons, Contrast
from harness.grid.expand import Grid, load_grid
from harness.grid.spec import BUILTIN_GRIDS_DIR, TOP_LEVEL_KEYS
from harness.grid.yaml_lines import GridError

__all__ = ["Grid", "GridError", "load_grid", "Comparisons", "Contrast", "BUILTIN_GRIDS_DIR", "TOP_LEVEL_KEYS"]
