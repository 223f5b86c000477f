"""The shutdown matrix's WSGI app: Flask with `ConcurrencyWSGIMiddleware` (see deployment_apps.py)."""

from __future__ import annotations

from flask import Flask, request

from starlette_concurrency import ConcurrencyWSGIMiddleware

from .deployment_apps import Deferrer, defer_one, facade

concurrency = facade()
deferrer = Deferrer(concurrency)
app = Flask(__name__)


@app.get("/defer")
def defer() -> str:
    defer_one(concurrency, int(request.args["id"]), float(request.args.get("seconds", "0.02")))
    return "deferred"


@app.get("/thread")
def thread() -> str:
    deferrer.start()
    return "started"


@app.get("/health")
def health() -> str:
    return "ok"


app.wsgi_app = ConcurrencyWSGIMiddleware(app.wsgi_app, concurrency=concurrency)  # type: ignore[method-assign]
