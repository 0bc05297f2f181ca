"""The backend's own small HTML pages, served outside the Reflex frontend: sign-in errors,
payment errors, and the simulated checkout, billing and portal pages. One look, the site's
icon, and a link back. Also the HTTP status of each payment error, for these pages and the
webhook's JSON answers alike."""

from __future__ import annotations

import html
from urllib.parse import quote

from starlette.responses import HTMLResponse, RedirectResponse, Response

from aicredits.domain.errors import AICreditsError
from aicredits.services.payment_errors import (
    CheckoutFailed,
    PaymentError,
    PaymentsUnavailable,
    UnknownCheckoutSession,
    UnknownPack,
)
from aicredits.services.stripe_webhook import InvalidSignature, MalformedEvent
from aicredits.settings import Settings

# The status each payment error is answered with; its message is the error's own. An error
# not named takes the status of its nearest named base class.
ERROR_STATUS: dict[type[AICreditsError], int] = {
    InvalidSignature: 400,
    MalformedEvent: 400,
    PaymentError: 400,
    UnknownPack: 400,
    UnknownCheckoutSession: 404,
    CheckoutFailed: 502,
    PaymentsUnavailable: 503,
}


def error_status(exc: AICreditsError) -> int:
    return next(ERROR_STATUS[kind] for kind in type(exc).__mro__ if kind in ERROR_STATUS)


_STYLE = """body{font-family:system-ui,sans-serif;max-width:34rem;margin:4rem auto;padding:0 1rem;
color:#1c2024}a{color:#0d74ce}.box{border:1px solid #e0e1e6;border-radius:8px;padding:1.5rem}
.sim{background:#fff4d5;border:2px dashed #ab6400;color:#4f3422;padding:.75rem 1rem;
border-radius:6px;font-weight:700;letter-spacing:.02em}
button{font-size:1rem;padding:.6rem 1.4rem;border-radius:6px;border:1px solid #8b8d98;
cursor:pointer;margin-right:.75rem}.pay{background:#0d74ce;color:#fff;border-color:#0d74ce}
form{display:inline}"""


def small_page(
    settings: Settings,
    *,
    title: str,
    body: str,
    status: int = 200,
    back_path: str = "/credits",
    back_label: str = "Back to credits",
) -> HTMLResponse:
    """A self-contained page around `body` (HTML the caller escaped)."""
    back = html.escape(f"{settings.public_url}{back_path}")
    icon = html.escape(f"{settings.public_url}/favicon.ico")
    document = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>{html.escape(title)} · aicredits</title><link rel="icon" href="{icon}">
<style>{_STYLE}</style></head><body><div class="box">{body}
<p><a href="{back}">{html.escape(back_label)}</a></p></div></body></html>"""
    return HTMLResponse(document, status_code=status)


def message_page(
    settings: Settings,
    *,
    title: str,
    message: str,
    status: int,
    back_path: str = "/credits",
    back_label: str = "Back to credits",
) -> HTMLResponse:
    """A title and one message, read out as an alert."""
    body = (
        f"<h1>{html.escape(title)}</h1>"
        f'<p id="error-message" role="alert">{html.escape(message)}</p>'
    )
    return small_page(
        settings, title=title, body=body, status=status, back_path=back_path,
        back_label=back_label,
    )  # fmt: skip


def payment_error_page(settings: Settings, exc: PaymentError) -> HTMLResponse:
    return message_page(
        settings, title="Checkout unavailable", message=exc.message, status=error_status(exc)
    )


def to_sign_in(settings: Settings, next_path: str = "/credits") -> Response:
    """To the sign-in page, and back to `next_path` after it."""
    return RedirectResponse(login_url(settings, next_path), status_code=303)


def login_url(settings: Settings, next_path: str) -> str:
    return f"{settings.public_url}/login?next={quote(next_path, safe='/')}"
