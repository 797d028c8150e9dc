"""The chain service's endpoints (see ``chain_app``) served by a FastAPI app. It never imports otel_cancel.

FastAPI builds its middleware stack itself (it does not call Starlette's), so this
app shows whether ``opentelemetry-instrument`` puts otel-cancel's middleware in a
FastAPI app too.
"""

from __future__ import annotations

from chain_app import stream, work
from fastapi import FastAPI

app = FastAPI()
app.add_api_route("/stream", stream)
app.add_api_route("/work", work)
