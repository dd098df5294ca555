"""The admin surface of an orchestrator (DESIGN.md §5): a FastAPI app with a JSON API, server-sent
events, Prometheus /metrics, the live dashboard page (static/), and the operator actions (drain,
resume, cancel, policy switch) behind a bearer token.

    server = AdminServer(orch, host="127.0.0.1", port=8010, token=os.environ["ALIGNED_ADMIN_TOKEN"]).start()
    ...            # the dashboard at server.url, the API's schema at server.url + "docs"
    server.stop()

The serving layer's rule holds here: nothing imports torch or a concrete engine.
"""
from serving.admin.app import create_app
from serving.admin.server import AdminServer

__all__ = ["create_app", "AdminServer"]
