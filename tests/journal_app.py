"""An app with a journal, for the journal's uvicorn test: ``POST /orders/{n}`` defers `journal_targets.slow`.

``JOURNAL_PATH`` names the journal, ``JOURNAL_OUT`` the file the tasks write to; ``GET /status/{code}``
defers a task that records ``failed <n>`` and answers `code` (an error status: nothing is journaled).
"""

from __future__ import annotations

import functools
import os

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from starlette_concurrency import Concurrency, ConcurrencyMiddleware
from tests import journal_targets

concurrency = Concurrency(workers=2, journal=os.environ["JOURNAL_PATH"], env_file=None)
OUT = os.environ["JOURNAL_OUT"]


async def order(request: Request) -> Response:
    number = int(request.path_params["number"])
    concurrency.defer(functools.partial(journal_targets.slow, OUT, number), key=f"order-{number}")
    return PlainTextResponse("accepted")


async def status(request: Request) -> Response:
    code = int(request.path_params["code"])
    concurrency.defer(functools.partial(journal_targets.record, OUT, "failed", code))
    return PlainTextResponse("status", status_code=code)


app = Starlette(
    routes=[Route("/orders/{number:int}", order, methods=["POST"]), Route("/status/{code:int}", status)],
    middleware=[Middleware(ConcurrencyMiddleware, concurrency=concurrency)],
)
