"""`mixtral serve`: an OpenAI-compatible HTTP server with continuous batching (needs the `serve` extra)."""

from __future__ import annotations

import logging

from .app import ServeSettings, create_app

__all__ = ["ServeSettings", "create_app", "run_server"]


def run_server(settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000,
               shutdown_timeout: float = 30.0, log_level: str = "info") -> None:
    """Serve until SIGINT/SIGTERM: then stop taking connections, let running requests finish for up to
    shutdown_timeout seconds (abort the rest), and return. If the engine fails for good (see scheduler.py), stop
    the same way and raise RuntimeError: the process exits non-zero, for a supervisor to restart it."""
    import signal

    import uvicorn

    logging.basicConfig(level=log_level.upper(), format="%(levelname)s:     %(message)s")
    app = create_app(settings)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=shutdown_timeout, access_log=False)
    server = uvicorn.Server(config)
    state = app.state.mixtral
    state.on_fatal = lambda error: setattr(server, "should_exit", True)
    # uvicorn re-raises the signal it shut down on, once its own handlers are gone: a handler of ours then takes
    # SIGTERM, so that a graceful stop exits 0 (SIGINT stays KeyboardInterrupt: the CLI's 130)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if state.scheduler is not None and state.scheduler.error is not None:
        raise RuntimeError(f"the engine failed, the server stopped: {state.scheduler.error}")
