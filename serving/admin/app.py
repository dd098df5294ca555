"""The admin app: JSON API, server-sent events, Prometheus /metrics and the dashboard page.

Read-only endpoints are open (the server listens on loopback by default); the operator actions
(drain, resume, cancel, policy switch) need the bearer token. Every error answers
{"detail": "<what went wrong and what to do>"}.

The app reads the orchestrator only through its public API: each read-only answer is built from
one `Orchestrator.snapshot()`, the time series from `iterations()` and the finish listener, the
policy list from the policy registry; it never reaches into the run loop, the engine or the ledger.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from pathlib import Path

from fastapi import Depends, FastAPI, HTTPException, Path as PathParam, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from swagger_ui_bundle import swagger_ui_path

import serving.admin.schemas as schemas
import serving.admin.views as views
from orchestrator.core import PolicySwitchRefused
from orchestrator.service import Orchestrator
from orchestrator.snapshot import RECENT_FINISHED
from serving.admin.gpus import GpuProbe
from serving.admin.guards import MAX_BODY_BYTES, BodyLimit, bearer_guard
from serving.admin.prometheus import CONTENT_TYPE, PrometheusMetrics
from serving.admin.telemetry import KEEP_MINUTES, Telemetry

log = logging.getLogger("alignedserve.admin")
STATIC = Path(__file__).resolve().parent / "static"
REDACTED = "<redacted>"


TABLE_ROWS = 50
"""Requests the dashboard's table lists (the newest), sent with every update."""

def create_app(orch: Orchestrator, *, token: str | None, events_interval_s: float = 1.0,
               gpu_probe: GpuProbe | None = None) -> FastAPI:
    """The admin app for `orch`. token: the bearer token operator actions require (None or
    empty: they answer 403). `app.state.stopping` (a threading.Event) ends the event streams;
    AdminServer sets it before it stops."""
    metrics = PrometheusMetrics(orch)
    telemetry = Telemetry(orch, on_finished=metrics.observe)
    gpus = gpu_probe or GpuProbe()
    stopping = threading.Event()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        async def tick():  # fold telemetry each second even when nobody is looking
            while True:
                try:
                    await run_in_threadpool(telemetry.update)
                except Exception:  # a bug here must not end the ticker; the endpoints still update
                    log.exception("folding the admin telemetry failed")
                await asyncio.sleep(telemetry.interval_s)

        ticker = asyncio.create_task(tick())
        try:
            yield
        finally:
            stopping.set()
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
            telemetry.close()
            gpus.close()

    # Swagger UI 4 (swagger-ui-bundle, the /docs page below) reads OpenAPI 3.0 documents; the
    # schema FastAPI writes is 3.0-compatible apart from the version string.
    app = FastAPI(title="AlignedServe admin", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Pool and batch state, KV tiers, time series, GPUs and operator actions of one "
                              "AlignedServe orchestrator. Operator actions need `Authorization: Bearer <token>`.")
    app.openapi_version = "3.0.3"
    app.state.orchestrator = orch
    app.state.telemetry = telemetry
    app.state.stopping = stopping
    app.state.open_streams = 0
    """Event streams being served now."""
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)
    operator = [Depends(bearer_guard(token))]
    problems = {401: {"model": schemas.Problem}, 403: {"model": schemas.Problem}}

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # One readable sentence naming each offending field, instead of FastAPI's list.
        reasons = []
        for e in exc.errors():
            where = ".".join(str(p) for p in e.get("loc", ()))
            msg = e.get("msg", "invalid")
            if e.get("type") == "json_invalid":
                where = "body"
                msg = (f"not valid JSON ({e.get('ctx', {}).get('error', 'JSON decode error')} at character "
                       f"{e['loc'][-1]}); send a JSON object such as {{\"policy\": \"aligned\"}}")
            reasons.append(f"{where}: {msg}" if where else msg)
        return JSONResponse({"detail": "; ".join(reasons) or "invalid request"}, status_code=422)

    # ---- the page -------------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> FileResponse:
        return FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml")

    # FastAPI's own /docs loads Swagger UI from a CDN: blank without internet. The same page, from
    # the swagger-ui-bundle package's files.
    app.mount("/docs-assets", StaticFiles(directory=swagger_ui_path), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{app.title} - API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css", swagger_favicon_url="/favicon.ico")

    # ---- read-only ------------------------------------------------------------------------------

    @app.get("/api/state", response_model=schemas.State, summary="Pool, batches, KV histogram and tiers")
    def state() -> dict:
        return views.state(orch.snapshot())

    @app.get("/api/requests", response_model=schemas.RequestList, summary="Latest requests, live and finished")
    def requests(limit: int = Query(100, ge=1, le=1000, description="Most rows, newest first.")) -> dict:
        return {"requests": views.recent(orch.snapshot(), limit)}

    @app.get("/api/requests/{request_id}", response_model=schemas.RequestDetail,
             responses={404: {"model": schemas.Problem}}, summary="One request and its history")
    def request_detail(request_id: str = PathParam(max_length=200)) -> dict:
        snap = orch.snapshot()
        r = snap.find(request_id)
        if r is None:
            raise HTTPException(404, _unknown(request_id))
        return views.detail(r, snap.time, orch.history(request_id) or ())

    @app.get("/api/timeseries", response_model=schemas.TimeSeries, summary="Per-second series of the last minutes")
    def timeseries(minutes: float = Query(5.0, gt=0, le=KEEP_MINUTES)) -> dict:
        return {"interval_s": telemetry.interval_s, "points": telemetry.points(minutes)}

    @app.get("/api/policies", response_model=schemas.Policies,
             summary="Every registered policy, and whether this engine can run it")
    def policies() -> dict:
        return views.policies(orch)

    @app.get("/api/gpus", response_model=schemas.Gpus, summary="GPU telemetry through NVML")
    def gpu_info() -> dict:
        return gpus.read()

    @app.get("/api/config", summary="The effective configuration (admin token redacted)")
    def config() -> dict:
        values = orch.config.as_dict()
        values["admin_token"] = REDACTED if values.get("admin_token") else ""
        return values

    @app.get("/api/events", summary="Server-sent events: `update` each second with the state, the latest "
                                    "requests (one snapshot: counts and table agree) and the newest point",
             response_class=StreamingResponse, responses={200: {"content": {"text/event-stream": {}}}})
    async def events(request: Request) -> StreamingResponse:
        def payload() -> str:
            snap = orch.snapshot()  # one snapshot for the counts and the request table
            data = {"state": views.state(snap), "requests": views.recent(snap, TABLE_ROWS), "point": telemetry.latest()}
            return f"event: update\ndata: {json.dumps(data)}\n\n"

        async def stream():
            app.state.open_streams += 1  # the event loop's thread only: no lock
            try:
                yield "retry: 2000\n\n"
                while not stopping.is_set():
                    yield await run_in_threadpool(payload)
                    # Wait for the next tick in small steps: stop promptly on shutdown or disconnect.
                    for _ in range(max(1, round(events_interval_s / 0.1))):
                        if stopping.is_set() or await request.is_disconnected():
                            return
                        await asyncio.sleep(min(0.1, events_interval_s))
            finally:
                app.state.open_streams -= 1

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/metrics", response_class=Response, summary="Prometheus text exposition")
    def prometheus() -> Response:
        telemetry.update()  # histograms take in the requests finished since the last tick
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    # ---- operator actions -----------------------------------------------------------------------

    @app.post("/api/drain", response_model=schemas.DrainResult, dependencies=operator, responses=problems,
              summary="Stop admitting new requests; those in flight finish")
    def drain() -> dict:
        orch.drain()
        n = len(orch.snapshot().live)
        return {"ok": True, "draining": True,
                "detail": f"draining: new requests are refused; {n} in flight run to the end"}

    @app.post("/api/resume", response_model=schemas.DrainResult, dependencies=operator, responses=problems,
              summary="Admit new requests again")
    def resume() -> dict:
        orch.resume()
        return {"ok": True, "draining": False, "detail": "admitting new requests"}

    @app.post("/api/requests/{request_id}/cancel", response_model=schemas.CancelResult, dependencies=operator,
              responses={**problems, 404: {"model": schemas.Problem}, 409: {"model": schemas.Problem}},
              summary="Cancel a request wherever it is")
    def cancel(request_id: str = PathParam(max_length=200)) -> dict:
        r = orch.snapshot().find(request_id)
        if r is None:
            raise HTTPException(404, _unknown(request_id))
        if r.finished:
            raise HTTPException(409, f"request {request_id!r} already finished ({r.finish_reason})")
        orch.cancel(request_id)
        return {"ok": True, "id": request_id,
                "detail": f"cancel queued: {request_id} ends with finish reason cancelled at the next iteration"}

    @app.post("/api/policy", response_model=schemas.PolicyResult, dependencies=operator,
              responses={**problems, 409: {"model": schemas.Problem}},
              summary="Switch the scheduling policy between two iterations")
    def switch_policy(change: schemas.PolicyChange) -> dict:
        previous = orch.policy.name
        try:
            now = orch.switch_policy(change.policy)
        except PolicySwitchRefused as e:
            raise HTTPException(409, str(e)) from None
        except ValueError as e:  # a name the schema let through but the orchestrator does not know
            raise HTTPException(422, str(e)) from None
        except TimeoutError as e:
            raise HTTPException(503, str(e)) from None
        return {"ok": True, "policy": now, "previous": previous,
                "detail": f"scheduling with {now} from the next iteration" if now != previous
                else f"already scheduling with {now}"}

    @app.get("/api/faults", response_model=schemas.Faults, summary="Fault injection: the faults armed and fired")
    def faults() -> dict:
        return _faults(orch)

    @app.post("/api/faults", response_model=schemas.Faults, dependencies=operator,
              responses={**problems, 422: {"model": schemas.Problem}},
              summary="Fault injection: make the engine's next calls of a kind fail (soak and fault tests)")
    def arm_fault(arm: schemas.FaultArm) -> dict:
        injector = orch.faults
        if injector is None:
            raise HTTPException(403, "fault injection is off: start the server with ALIGNED_FAULT_INJECTION=1 "
                                     "(make serve: --fault-injection)")
        try:
            injector.arm(arm.kind, arm.count)
        except ValueError as e:
            raise HTTPException(422, str(e)) from None
        log.warning("fault injection: armed %d x %s", arm.count, arm.kind)
        return _faults(orch)

    return app


def _faults(orch: Orchestrator) -> dict:
    injector = orch.faults
    if injector is None:
        return {"enabled": False, "kinds": [], "armed": {}, "fired": {}}
    return {"enabled": True, **injector.snapshot()}


def _unknown(request_id: str) -> str:
    return (f"no request {request_id!r}: not in flight and not among the last finished ones "
            f"(the admin API keeps {RECENT_FINISHED})")
