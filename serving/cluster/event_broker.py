"""The ZMQ broker of the cluster's event plane: `python -m serving.cluster.event_broker XSUB_URL XPUB_URL`.

Dynamo 1.6's ZMQ event plane binds each publisher's socket on 0.0.0.0 (every interface) whatever
`DYN_EVENT_PLANE_HOST` says (measured: ../shared/notes/measured-2026-12.md and `ss -ltnp` here).
In broker mode (`DYN_ZMQ_BROKER_ENABLED=1`, `DYN_ZMQ_BROKER_URL="xsub=URL , xpub=URL"`) the
publishers and subscribers *connect* to a broker instead, so the only sockets that listen are
this broker's, which bind where they are told (loopback for `make serve-cluster`). It is the
standard XSUB/XPUB forwarder (`zmq.proxy`).
"""
from __future__ import annotations

import sys

import zmq


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        sys.exit("usage: python -m serving.cluster.event_broker tcp://127.0.0.1:P1 tcp://127.0.0.1:P2 (XSUB, XPUB)")
    ctx = zmq.Context()
    xsub, xpub = ctx.socket(zmq.XSUB), ctx.socket(zmq.XPUB)
    xsub.bind(args[0])
    xpub.bind(args[1])
    try:
        zmq.proxy(xsub, xpub)
    except (KeyboardInterrupt, zmq.ContextTerminated):
        pass


if __name__ == "__main__":
    main()
