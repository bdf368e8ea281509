"""The annotation server: the store's JSON API (annotation/server.py) with the Gradio annotator page
(ui/annotator.py) mounted at ``/``, behind Gradio's sign-in checked against the store.

    glmwb annotate --db sqlite:///runs/annotation.db --host 127.0.0.1 --port 7860

Binds to 127.0.0.1 unless told otherwise. ``mount_page`` puts any Gradio page of the workbench (this one,
the arena of ``ui/arena.py``) behind the same sign-in, so a protection added there holds for both.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from fastapi import FastAPI

from glmwb.annotation.server import LoginThrottle, create_api_app
from glmwb.annotation.store import Store
from glmwb.ui.annotator import PageConfig


@dataclass
class ServerSettings:
    ui: bool = True  # mount the Gradio page at /
    page: PageConfig | None = None  # None: defaults
    throttle: LoginThrottle = field(default_factory=LoginThrottle)


def gradio_auth(store: Store, throttle: LoginThrottle):
    """Gradio's sign-in check against the store's accounts, sharing the JSON API's throttle of failed
    sign-ins (every page of the workbench signs in through this one function)."""
    import anyio

    async def check(username: str, password: str) -> bool:
        if throttle.blocked(username):
            return False
        who = await anyio.to_thread.run_sync(store.authenticate, username, password)
        if who is None:
            throttle.failed(username)
        return who is not None

    return check


def mount_page(app: FastAPI, page, store: Store, throttle: LoginThrottle, **options) -> FastAPI:
    """Mount a Gradio page at ``/`` of ``app`` behind the store's sign-in (the annotator page, the arena)."""
    import gradio as gr

    return gr.mount_gradio_app(
        app,
        page,
        path="/",
        auth=gradio_auth(store, throttle),
        auth_message="Sign in with the account your admin made for you.",
        footer_links=[],
        **options,
    )


def create_app(store: Store, settings: ServerSettings | None = None) -> FastAPI:
    """The JSON API, and (``settings.ui``) the annotator page mounted at ``/``."""
    settings = settings or ServerSettings()
    app = create_api_app(store, settings.throttle)
    if not settings.ui:
        return app
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from glmwb.ui.annotator import build_annotator_page, page_options

    page_config = settings.page or PageConfig()
    page = build_annotator_page(store, page_config)
    page.queue(default_concurrency_limit=16)
    return mount_page(app, page, store, settings.throttle, **page_options(page_config))


def serve(
    store: Store,
    host: str = "127.0.0.1",
    port: int = 7860,
    settings: ServerSettings | None = None,
    log_level: str = "warning",
) -> None:
    import uvicorn

    app = create_app(store, settings)
    print(
        f"annotation server on http://{host}:{port}/ (API under /api/v1), store {store.engine.url!r}",
        flush=True,
    )
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
