"""``python -m training ...`` is the ``fedtune`` command (and what torchrun starts)."""

from training.cli import main

raise SystemExit(main())
