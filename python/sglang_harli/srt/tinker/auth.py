"""The Tinker SDK's API key, checked by SGLang's own --api-key / --admin-api-key middleware.

The SDK sends its key as ``X-API-Key`` (never ``Authorization``) and insists, on the client, that it
starts with ``tml-``; SGLang's middleware reads only ``Authorization: Bearer``. So on ``/api/v1/*`` a
request that has an ``X-API-Key`` and no ``Authorization`` is given ``Authorization: Bearer <key>``,
with the ``tml-`` prefix taken off unless the whole value is itself a server key: a server started with
``--api-key sk-1`` takes ``TINKER_API_KEY=tml-sk-1``. SGLang then decides as it decides for every route.

Every Tinker route is ``ADMIN_OPTIONAL``, as ``/harli/jobs`` and SGLang's ``/load_lora_adapter`` are: a
Tinker client trains adapters on the server, so with both keys set it needs the admin key (for its
sampling too: one SDK client sends one key).

The translation runs outside SGLang's middleware, which SGLang adds when the server starts with a key;
``install`` hooks that call (``sglang.srt.utils.auth.add_api_key_middleware``, looked up when called)
to add ours after it, which makes ours the outer one.
"""

from __future__ import annotations

from sglang.srt.utils import auth

PREFIX = b"tml-"


class TinkerKeyHeader:
    """ASGI middleware: ``X-API-Key`` as a bearer token on ``/api/v1/*``."""

    def __init__(self, app, *, keys: tuple[str | None, ...]):
        self.app = app
        self.keys = {key.encode() for key in keys if key}

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/api/v1/"):
            headers = scope["headers"]
            if not any(name == b"authorization" for name, _ in headers):
                key = next((value for name, value in headers if name == b"x-api-key"), None)
                if key is not None:
                    token = key if key in self.keys else key.removeprefix(PREFIX)
                    scope = dict(scope, headers=[*headers, (b"authorization", b"Bearer " + token)])
        await self.app(scope, receive, send)


def mark_routes(router) -> None:
    """Every route of ``router`` is ``ADMIN_OPTIONAL`` (see the module's docstring)."""
    for route in router.routes:
        auth.auth_level(auth.AuthLevel.ADMIN_OPTIONAL)(route.endpoint)


def install() -> None:
    """Add ``TinkerKeyHeader`` whenever SGLang adds its API-key middleware (idempotent)."""
    original = auth.add_api_key_middleware
    if getattr(original, "harli", False):
        return

    def add_api_key_middleware(app, *, api_key, admin_api_key):
        original(app, api_key=api_key, admin_api_key=admin_api_key)
        app.add_middleware(TinkerKeyHeader, keys=(api_key, admin_api_key))

    add_api_key_middleware.harli = True
    auth.add_api_key_middleware = add_api_key_middleware
