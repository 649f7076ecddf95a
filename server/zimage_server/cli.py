"""``zimage-server``: ``serve`` (the default) and ``make-tiny-model DIR``."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import Any

USAGE = """usage: zimage-server [serve] [--FLAG VALUE ...]
       zimage-server prefetch [--FLAG VALUE ...]
       zimage-server make-tiny-model DIR

commands:
  serve             run the HTTP server (the default); `zimage-server serve --help` lists the flags,
                    each also read from the environment as ZIMAGE_<FLAG>
  make-tiny-model   write the built-in tiny random-weight pipeline to DIR (save_pretrained layout)
  prefetch          download the configured model and Hub adapters (ZIMAGE_MODEL, ZIMAGE_LORAS,
                    ZIMAGE_HF_CACHE_DIR, ...) into the cache and exit; the operator's model-cache
                    Job runs it
"""


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    if args and args[0] == "make-tiny-model":
        return _make_tiny_model(args[1:])
    if args and args[0] == "prefetch":
        return _prefetch(args[1:])
    if args and args[0] == "serve":
        args = args[1:]
    return _serve(args)


def _prefetch(args: list[str]) -> int:
    from zimage_server.core.adapters import AdapterSource
    from zimage_server.core.config import load_settings
    from zimage_server.core.sources import ModelSource, ModelSourceError
    from zimage_server.pipeline.adapters import local_file
    from zimage_server.pipeline.model_source import resolve

    try:
        settings = load_settings(args)
        source = ModelSource.parse(settings.model, settings.revision)
        token = settings.hf_token.get_secret_value() if settings.hf_token else None
        path = resolve(source, settings.hf_cache_dir, token)
        print(f"{source} is in {path}")
        for adapter in settings.loras:  # the Hub's: a path or a claim is read where it is
            found = AdapterSource.parse(adapter.source)
            if found.scheme == "hf":
                fetched = local_file(found, settings.hf_cache_dir, token)
                print(f"adapter {adapter.name} ({found}) is in {fetched}")
    except (ValueError, ModelSourceError) as exc:
        print(f"zimage-server prefetch: {exc}", file=sys.stderr)
        return 1
    return 0


def _make_tiny_model(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="zimage-server make-tiny-model")
    parser.add_argument("directory", help="where to write the pipeline")
    ns = parser.parse_args(args)
    from zimage_server.pipeline.tiny_model import make_tiny_model

    path = make_tiny_model(ns.directory)
    print(f"wrote the tiny Z-Image pipeline to {path}")
    return 0


def _serve(args: list[str]) -> int:
    from zimage_server.core.config import load_settings
    from zimage_server.core.sources import ModelSourceError

    try:
        settings = load_settings(args)
    except (ValueError, ModelSourceError) as exc:
        print(f"zimage-server: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if settings.prefetch_weights:  # first: it reads while the imports below run
        from zimage_server.pipeline import weight_prefetch

        weight_prefetch.start(settings.model, settings.revision, settings.hf_cache_dir)
    from zimage_server.http.app import create_app

    try:
        app = create_app(settings)
    except RuntimeError as exc:  # for example cuda asked for where there is none
        print(f"zimage-server: {exc}", file=sys.stderr)
        return 2
    from zimage_server.health.drain import DrainingServer
    from zimage_server.http.http_server import uvicorn_config

    config = uvicorn_config(app, settings)
    # After its shutdown uvicorn restores the SIGTERM handler it found and raises the signal
    # again. Finding this one, the process exits 0: a drain is a normal stop, not a crash.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(_exit(app, 0)))
    server = DrainingServer(config, app, settings.drain_seconds)
    server.run()
    return _exit(app, server.exit_code)


def _exit(app: Any, code: int) -> int:
    """End the process with ``code``. Stopped while it loads or warms up, it exits at once: the
    worker thread is inside a load or a warm-up call (a compile can take minutes), which the
    interpreter's exit would wait for, and no request has been accepted that could be lost.
    The same once drained while the compiled pipeline is still being built beside the
    requests (its thread is inside a warm-up call), and after a drain whose time ran out:
    every request got its answer or its 503 already. Otherwise returns ``code``."""
    from zimage_server.core.state import Phase

    starting = app.state.server_state.phase in (Phase.LOADING, Phase.WARMING)
    service = getattr(app.state, "service", None)
    compiling = service is not None and service.engine.compile_state == "compiling"
    if starting or compiling or app.state.abandoned:
        logging.getLogger(__name__).info(
            "stopped during start-up: the warm-up is abandoned"
            if starting
            else "stopped while compiling: the compile is abandoned"
            if compiling
            else "the drain's time is up: a batch still on the GPU is abandoned"
        )
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
