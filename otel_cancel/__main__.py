"""``python -m otel_cancel`` runs the CLI."""

from .cli import main

raise SystemExit(main())
