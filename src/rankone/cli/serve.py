"""`rankone serve`: the OpenAI API over a model and a registry's arms, with metrics and a dashboard."""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path
from typing import Any

from rankone.core.errors import RankoneError

TOKEN_ENV = "RANKONE_ADMIN_TOKEN"


def register(subparsers: Any) -> None:
    from rankone.cli.common import model_args, positive_int

    p = subparsers.add_parser(
        "serve", help="serve a model and its registry's arms over the OpenAI API (canary, shadow, pins, metrics)",
        description="Serve a model over the OpenAI API: the registry's released patches merged (stable), staged "
                    "patches as low-rank deltas for a share of users (canary) or re-run beside stable (shadow), "
                    "/metrics, /api/status and /dashboard. Registry changes are picked up without a restart.")
    p.set_defaults(func=cmd_serve)
    model_args(p, required=False)
    next(a for a in p._actions if a.dest == "model").help = "model folder, .gguf file or hub id (default: the built-in testbed model)"
    p.add_argument("--registry", default=None,
                   help="registry database whose released and staged patches to serve (default: $RANKONE_REGISTRY "
                        "if set, else none: the model as it is)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--served-model-name", default=None,
                   help="the model id clients send (default: the model folder's name; rankone-testbed for the built-in model)")
    p.add_argument("--admin-token-file", default=None,
                   help=f"file holding the bearer token that pins (X-Rankone-Patchset) need (default: ${TOKEN_ENV}; "
                        "without either, pins are refused)")
    p.add_argument("--feedback-tokens-file", default=None,
                   help='JSON file {"name": "token", ...} of trusted reporters: POST /v1/feedback with "Authorization: '
                        'Bearer <token>" may then report without a response id (the admin token is one too)')
    p.add_argument("--feedback-per-minute", type=positive_int("--feedback-per-minute"), default=10,
                   help="reports each reporter may send per minute (default 10; more get 429)")
    p.add_argument("--max-batch", type=positive_int("--max-batch"), default=16, help="requests decoded together (default 16)")
    p.add_argument("--max-waiting", type=positive_int("--max-waiting"), default=64,
                   help="requests queued beyond the batch before 429 (default 64)")
    p.add_argument("--max-tokens-cap", type=positive_int("--max-tokens-cap"), default=512,
                   help="the largest max_tokens a request may ask for (default 512)")
    p.add_argument("--seed", type=int, default=0, help="seed of random routing, shadow samples and unseeded sampling")
    p.add_argument("--threads", type=positive_int("--threads"), default=None,
                   help="torch threads for the model (default: torch's own choice, one per core)")
    p.add_argument("--access-log", action="store_true", help="log every request (uvicorn's access log)")


def admin_token(args: argparse.Namespace) -> str | None:
    """--admin-token-file's token, else $RANKONE_ADMIN_TOKEN's, else None."""
    if args.admin_token_file is not None:
        try:
            token = Path(args.admin_token_file).read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise RankoneError(f"cannot read --admin-token-file {args.admin_token_file}: {e}") from None
        if not token:
            raise RankoneError(f"--admin-token-file {args.admin_token_file} is empty; put the token in it")
        return token
    return os.environ.get(TOKEN_ENV, "").strip() or None


def _feedback_tokens(path: str | None) -> dict[str, str]:
    """{name: token} of trusted reporters, checked: names and tokens non-empty strings, tokens distinct."""
    if path is None:
        return {}
    from rankone.core.jsonfiles import json_object

    hint = 'give a JSON object {"name": "token", ...}'
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RankoneError(f"cannot read --feedback-tokens-file {path}: {e}") from None
    d = json_object(text, f"--feedback-tokens-file {path}", hint)
    bad = [k for k, v in d.items() if not k.strip() or not isinstance(v, str) or len(v.strip()) < 8]
    if bad or not d:
        raise RankoneError(f"--feedback-tokens-file {path}: every reporter needs a name and a token of 8+ characters "
                           f"({'bad: ' + ', '.join(map(repr, bad)) if bad else 'none given'}); {hint}")
    if len({v.strip() for v in d.values()}) != len(d):
        raise RankoneError(f"--feedback-tokens-file {path}: two reporters share a token; give each its own")
    return {k.strip(): v.strip() for k, v in d.items()}


def _free_to_listen(host: str, port: int) -> int:
    """Bind once to say 'in use' in one line (and to pick a port for --port 0)."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
            return s.getsockname()[1]
    except OSError as e:
        raise RankoneError(f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --port or --host") from None


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from rankone.cli.common import load
    from rankone.serve import Server, ServeSettings, create_app
    from rankone.testbed import builtin_model_dir

    if not 0 <= args.port <= 65535:
        raise RankoneError(f"--port must be from 0 to 65535, not {args.port}")
    token = admin_token(args)
    reporters = _feedback_tokens(args.feedback_tokens_file)
    registry = args.registry or os.environ.get("RANKONE_REGISTRY") or None
    if registry is not None and not Path(registry).is_file():
        raise RankoneError(f"no registry at {registry}; `rankone registry add` creates one")
    port = _free_to_listen(args.host, args.port)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    builtin = args.model is None
    settings = ServeSettings(host=args.host, port=port, max_batch=args.max_batch, max_waiting=args.max_waiting,
                             max_tokens_cap=args.max_tokens_cap, seed=args.seed,
                             feedback_per_minute=args.feedback_per_minute,
                             model_name=args.served_model_name or ("rankone-testbed" if builtin else None))
    handle = load(args, str(builtin_model_dir()) if builtin else None)
    server = Server(handle, settings, registry, token, reporters).start()
    arms = server.engine.arms
    print(f"serving {server.name} on http://{args.host}:{port}/v1 (stable {arms.stable.digest}, "
          f"{len(arms.released)} released patch(es), {len(arms.staged)} staged); dashboard http://{args.host}:{port}/dashboard",
          flush=True)
    try:
        uvicorn.run(create_app(server), host=args.host, port=port, log_level="warning", access_log=args.access_log)
    finally:
        server.stop()
    print("stopped", file=sys.stderr)
    return 0
