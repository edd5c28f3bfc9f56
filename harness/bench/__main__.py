"""``python -m harness.bench``: see ``harness.bench``."""

from harness.bench import main

raise SystemExit(main())
