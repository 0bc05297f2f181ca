"""The client's real address behind a trusted proxy, for everything the backend serves.

Behind a TLS-terminating proxy every connection comes from the proxy, so the per-address
limits would be one bucket for everyone and the logs would name the proxy. uvicorn's
`ProxyHeadersMiddleware` (a maintained implementation, not ours) replaces the ASGI scope's
`client` with the address from `X-Forwarded-For`, and its `scheme` from
`X-Forwarded-Proto`, only when the connection's peer is one of `TRUSTED_PROXIES`. It reads
the header from the right, skipping trusted hops, so a client cannot choose its address by
sending its own header: the proxy appends the address it saw.

It must be the outermost middleware: the request context (logs, metrics), the origin
checks, our routes and Reflex (its websocket's `router.session.client_ip` is the scope's
`client`) all read the scope after it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import cast

from starlette.types import ASGIApp
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware


def with_ipv4_mapped(trusted: Sequence[str]) -> list[str]:
    """The trusted addresses and networks, each IPv4 one also as IPv4-mapped IPv6: a server
    listening on a dual-stack socket sees an IPv4 proxy as ::ffff:10.0.0.5."""
    out = list(trusted)
    for entry in trusted:
        network = ipaddress.ip_network(entry, strict=False)
        if isinstance(network, ipaddress.IPv4Network):
            mapped = ipaddress.IPv6Network(
                (f"::ffff:{network.network_address}", 96 + network.prefixlen)
            )
            out.append(str(mapped) if "/" in entry else str(mapped.network_address))
    return out


def behind_proxies(app: ASGIApp, trusted: Sequence[str]) -> ASGIApp:
    """`app` reading the client from X-Forwarded-For when the peer is a trusted proxy. With
    none trusted, `app` itself: nobody's header is believed."""
    if not trusted:
        return app
    # uvicorn types its ASGI callables itself; they are the same protocol as Starlette's.
    middleware = ProxyHeadersMiddleware(app, trusted_hosts=with_ipv4_mapped(trusted))  # type: ignore[arg-type]
    return cast(ASGIApp, middleware)
