"""``python -m otel_cancel`` runs the CLI."""

from .cli import console_main

raise SystemExit(console_main())
