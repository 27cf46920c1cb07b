"""`edgemoe serve MODEL.emoe`: load the model and serve OpenAI's API on it until Ctrl-C / SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import sys

from ..errors import EdgeMoEError

EPILOG = """\
examples:
  edgemoe serve model.emoe
  edgemoe serve model.emoe --port 8080 --n-seq 4 --budget 2GB --api-key secret

  curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"model": "model", "messages": [{"role": "user", "content": "Hello"}]}'

Endpoints: POST /v1/chat/completions, POST /v1/completions (both with "stream": true), GET /v1/models, GET /health.
Up to --n-seq requests are decoded together, step by step; more wait in a queue (--queue), beyond it: 503.
"""


def add_serve_parser(sub, runtime_opts) -> None:
    s = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API",
                       description="An OpenAI-compatible server (chat completions, completions, models) on one model; "
                                   "concurrent requests share it through --n-seq sequence slots decoded together.",
                       epilog=EPILOG)
    s.add_argument("model", help=".emoe file")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8080, help="TCP port (default 8080; 0 = any free port)")
    s.add_argument("--n-seq", type=int, default=4, metavar="N",
                   help="requests decoded together (sequence slots; each holds a KV cache of --max-ctx; default 4)")
    s.add_argument("--max-ctx", type=int, default=None, metavar="N",
                   help="context per request: prompt + reply (default: the model's, at most 4096; with --budget, "
                        "the largest whose --n-seq KV caches leave the expert cache at least as much, said on "
                        "stderr)")
    s.add_argument("--api-key", default=os.environ.get("EDGEMOE_API_KEY"), metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1/ (default: $EDGEMOE_API_KEY; none = open)")
    s.add_argument("--model-name", default=None, metavar="NAME",
                   help="the model id clients send and /v1/models lists (default: the file name without .emoe)")
    s.add_argument("--queue", type=int, default=64, metavar="N",
                   help="requests that may wait for a slot (default 64); beyond: HTTP 503")
    runtime_opts(s)
    s.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    try:
        import uvicorn

        from .app import Server
    except ImportError as e:
        raise EdgeMoEError(f"edgemoe serve needs the server extra ({e.name} is missing): "
                           f"pip install 'edgemoe[server]'") from None
    from ..cli_options import load_args
    from ..model import load

    if args.n_seq < 1 or args.queue < 0 or not 0 <= args.port <= 65535:
        raise EdgeMoEError("--n-seq must be >= 1, --queue >= 0 and --port 0..65535")
    kw = load_args(args, n_seq=args.n_seq)  # checks the budget and the file; with a budget, the context that fits
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:  # bound before the model loads: a busy port is reported at once
        sock.bind((args.host, args.port))
    except OSError as e:
        sock.close()
        raise EdgeMoEError(f"cannot listen on {args.host}:{args.port}: {e.strerror} (choose another --port)") from None
    try:
        model = load(args.model, n_seq=args.n_seq, **kw)
    except BaseException:
        sock.close()
        raise
    if model.engine_name == "numpy" and args.n_seq > 1:
        print("edgemoe serve: the NumPy engine decodes one request at a time (--n-seq needs the C engine)",
              file=sys.stderr)
    if args.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"edgemoe serve: warning: listening on {args.host} without --api-key: anyone who can reach this port "
              f"can use the model", file=sys.stderr)
    server = Server(model, args.model_name, args.api_key, args.queue)
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(server.app(), log_level="warning", timeout_graceful_shutdown=5, lifespan="off")
    print(f"edgemoe serve: {server.model_id} ({model.engine_name}, {server.scheduler.n_slots} slots, context "
          f"{model.max_ctx}) on http://{host}:{port}/v1", flush=True)
    # uvicorn finishes (or after 5 s cancels) the requests in flight on SIGTERM, then raises the signal again
    # under the handler found at start: a no-op, so that the model is closed here and the exit status is 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        server.close()
        model.close()
        sock.close()
    print("edgemoe serve: stopped", file=sys.stderr)
    return 0
