"""`liandan studio`: start the local web page (Gradio, the optional extra `liandan[studio]`)."""

from __future__ import annotations

import argparse
import hmac
import os
from pathlib import Path

from liandan.errors import LiandanError

INSTALL = "pip install 'liandan[studio]'"


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--host", default="127.0.0.1", help="Address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="Port (default 7860)")
    parser.add_argument("--api-key", default=None, help="Ask for this key (as the password) before showing the page")
    parser.add_argument("--workspace", default="liandan-studio",
                        help="Folder for uploaded data, runs and exports (default: ./liandan-studio)")
    return parser


def import_gradio():
    # No usage statistics and no update check: the page works offline and phones nowhere.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        import gradio
    except ImportError:
        raise LiandanError(f"liandan studio needs Gradio: {INSTALL}") from None
    return gradio


def main(args: argparse.Namespace) -> int:
    import_gradio()
    from liandan.serve import LOCAL_HOSTS, check_api_key, check_port_free
    from liandan.studio.app import CSS, build

    check_api_key(args.api_key)  # `--api-key "$KEY"` with KEY unset must not turn the password off
    check_port_free(args.host, args.port)  # Gradio would stop with "Cannot find empty port", a traceback
    workspace = Path(args.workspace)
    workspace.mkdir(parents=True, exist_ok=True)
    page = build(workspace)
    if args.host not in LOCAL_HOSTS and not args.api_key:
        print(f"liandan studio: listening on {args.host} without --api-key: anyone who can reach this port can use it")
    # Bytes: compare_digest refuses str with non-ASCII characters (a key or a typed password in Chinese)
    auth = ((lambda _user, password: hmac.compare_digest(password.encode(), args.api_key.encode()))
            if args.api_key else None)
    print(f"liandan studio: http://{args.host}:{args.port}  (workspace {workspace.resolve()}; Ctrl-C stops the page, "
          "not the training runs)", flush=True)
    page.queue().launch(server_name=args.host, server_port=args.port, auth=auth, ssr_mode=False, show_error=True,
                        auth_message="Enter the studio's API key as the password (any user name).",
                        allowed_paths=[str(workspace.resolve())], footer_links=[], css=CSS, quiet=True)
    return 0
