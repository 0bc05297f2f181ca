"""A small fake of Stripe's HTTP API for the payment tests, and Stripe-shaped events.

`FakeStripe().app` is a Starlette app served with tests.servers.serve_asgi; the real SDK is
pointed at it with STRIPE_API_BASE. It records every request (decoded form parameters and
headers), answers an Idempotency-Key it has seen with its first answer, as Stripe does, and
lets a test "pay" a session so that retrieving it shows what Stripe would.

The event builders and `sign` are independent of the app's code, so a test signed here
checks the app's verification rather than agreeing with it by construction.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from aicredits.adapters.db import Database
from aicredits.api.routes import api_transformers
from aicredits.services import auth, checkout, cookies, ledger
from aicredits.services.purchases import PurchaseView, get_purchase
from aicredits.settings import Settings, get_settings


@dataclass
class Recorded:
    method: str
    path: str
    params: dict[str, Any]
    headers: dict[str, str]


def decode_stripe_params(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """`line_items[0][price_data][currency]=usd` and friends, back into nested values."""
    root: dict[str, Any] = {}
    for key, value in pairs:
        parts = re.findall(r"[^\[\]]+", key)
        node: Any = root
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            nxt: Any = value if last else ([] if parts[i + 1].isdigit() else {})
            if isinstance(node, list):
                index = int(part)
                while len(node) <= index:
                    node.append(None)
                if node[index] is None or last:
                    node[index] = nxt
                node = node[index]
            else:
                if part not in node or last:
                    node[part] = nxt
                node = node[part]
    return root


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    code = "resource_missing" if status == 404 else None
    return JSONResponse(
        {"error": {"type": kind, "message": message, "code": code}}, status_code=status
    )


def _no_such_customer(params: dict[str, Any]) -> JSONResponse | None:
    """Stripe's answer to a customer id it never made. The simulated checkout's ids
    (`cus_sim_...`) are such ids: a development database used before a Stripe key was set
    still holds them."""
    customer = str(params.get("customer") or "")
    if customer.startswith("cus_sim_"):
        error = {
            "type": "invalid_request_error",
            "code": "resource_missing",
            "param": "customer",
            "message": f"No such customer: '{customer}'",
        }
        return JSONResponse({"error": error}, status_code=400)
    return None


@dataclass
class FakeStripe:
    prices: dict[str, tuple[int, str]] = field(default_factory=dict)  # price id -> amount, cur
    requests: list[Recorded] = field(default_factory=list)
    sessions: dict[str, dict[str, Any]] = field(default_factory=dict)
    refunds: list[dict[str, Any]] = field(default_factory=list)
    # Set to make the next session creations fail as Stripe's 400s do.
    refuse_sessions: bool = False
    # The most a list page holds, whatever `limit` asks (Stripe's own cap is 100).
    page_cap: int = 100
    # Auto top-up: saved cards, setup intents, and off-session PaymentIntents. Each new
    # PaymentIntent takes the first of `charge_outcomes` (then "succeeded"): "succeeded",
    # "processing", or a decline code ("card_declined", "expired_card",
    # "authentication_required"), answered as Stripe answers it (402 card_error).
    payment_intents: dict[str, dict[str, Any]] = field(default_factory=dict)
    setup_intents: dict[str, dict[str, Any]] = field(default_factory=dict)
    detached: list[str] = field(default_factory=list)
    charge_outcomes: list[str] = field(default_factory=list)
    # Seconds each PaymentIntent creation takes (to widen races in tests).
    charge_delay: float = 0.0
    _answers: dict[str, tuple[int, Any]] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/health", lambda _r: JSONResponse({"ok": True})),
                Route("/v1/customers", self._customers, methods=["POST"]),
                Route("/v1/checkout/sessions", self._create_session, methods=["POST"]),
                Route("/v1/checkout/sessions", self._list_sessions, methods=["GET"]),
                Route("/v1/checkout/sessions/{sid}", self._retrieve_session, methods=["GET"]),
                Route("/v1/refunds", self._list_refunds, methods=["GET"]),
                Route("/v1/prices/{pid}", self._retrieve_price, methods=["GET"]),
                Route("/v1/billing_portal/sessions", self._portal_session, methods=["POST"]),
                Route("/v1/invoiceitems", self._invoice_item, methods=["POST"]),
                Route("/v1/payment_intents", self._create_payment_intent, methods=["POST"]),
                Route("/v1/payment_intents/{pid}", self._retrieve_payment_intent, methods=["GET"]),
                Route("/v1/setup_intents/{sid}", self._retrieve_setup_intent, methods=["GET"]),
                Route(
                    "/v1/payment_methods/{pm}/detach", self._detach_payment_method, methods=["POST"]
                ),
            ]
        )

    def calls(self, method: str, path: str) -> list[Recorded]:
        return [r for r in self.requests if r.method == method and r.path == path]

    async def _record(self, request: Request) -> Recorded:
        if request.method == "GET":
            pairs = list(request.query_params.multi_items())
        else:
            pairs = [(k, str(v)) for k, v in (await request.form()).multi_items()]
        recorded = Recorded(
            request.method,
            request.url.path,
            decode_stripe_params(pairs),
            {k.lower(): v for k, v in request.headers.items()},
        )
        with self._lock:
            self.requests.append(recorded)
        return recorded

    def _idempotent(self, recorded: Recorded, make: Any) -> Response:
        key = recorded.headers.get("idempotency-key")
        if not key:
            return _error(400, "the fake wants an Idempotency-Key on every POST")
        with self._lock:
            if key not in self._answers:
                self._answers[key] = make(recorded.params)
            status, body = self._answers[key]
        return JSONResponse(body, status_code=status)

    async def _customers(self, request: Request) -> Response:
        recorded = await self._record(request)

        def make(params: dict[str, Any]) -> tuple[int, Any]:
            return 200, {
                "id": f"cus_fake_{next(self._ids)}",
                "object": "customer",
                "email": params.get("email"),
                "metadata": params.get("metadata", {}),
            }

        return self._idempotent(recorded, make)

    async def _create_session(self, request: Request) -> Response:
        recorded = await self._record(request)
        if refused := _no_such_customer(recorded.params):
            return refused

        def make(params: dict[str, Any]) -> tuple[int, Any]:
            if self.refuse_sessions:
                return 400, {"error": {"type": "invalid_request_error", "message": "No."}}
            if params.get("mode") == "setup":
                return 200, self._setup_session(params)
            item = params["line_items"][0]
            if "price" in item:
                amount, currency = self.prices[item["price"]]
            else:
                amount = int(item["price_data"]["unit_amount"])
                currency = item["price_data"]["currency"]
            sid = f"cs_test_fake{next(self._ids)}_{uuid.uuid4().hex[:12]}"
            session = {
                "id": sid,
                "object": "checkout.session",
                "amount_subtotal": amount,
                "amount_total": amount,
                "currency": currency,
                "client_reference_id": params.get("client_reference_id"),
                "customer": params.get("customer"),
                "metadata": params.get("metadata", {}),
                "mode": params.get("mode"),
                "payment_intent": None,
                "payment_status": "unpaid",
                "status": "open",
                "success_url": params.get("success_url"),
                "cancel_url": params.get("cancel_url"),
                "url": f"https://checkout.stripe.test/c/pay/{sid}",
                "livemode": False,
                "created": int(time.time()),
            }
            self.sessions[sid] = session
            return 200, session

        return self._idempotent(recorded, make)

    async def _retrieve_session(self, request: Request) -> Response:
        recorded = await self._record(request)
        session = self.sessions.get(request.path_params["sid"])
        if session is None:
            return _error(404, "No such checkout.session")
        body = json.loads(json.dumps(session))
        expand = recorded.params.get("expand") or []
        if "payment_intent.latest_charge" in expand and body.get("payment_intent"):
            pi = body["payment_intent"]
            body["payment_intent"] = {
                "id": pi,
                "object": "payment_intent",
                "latest_charge": {
                    "id": session["_charge"],
                    "object": "charge",
                    "receipt_url": f"https://pay.stripe.test/receipts/{session['_charge']}",
                },
            }
        body.pop("_charge", None)
        return JSONResponse(body)

    def _page(self, request: Request, path: str, items: list[dict[str, Any]]) -> Response:
        """A list page as Stripe answers it: newest first, `created[gte]`, `limit` (capped),
        `starting_after`, and `has_more`."""
        params = decode_stripe_params(list(request.query_params.multi_items()))
        since = int((params.get("created") or {}).get("gte") or 0)
        newest_first = [o for o in reversed(items) if int(o.get("created") or 0) >= since]
        after = params.get("starting_after")
        if after:
            ids = [o["id"] for o in newest_first]
            newest_first = newest_first[ids.index(after) + 1 :] if after in ids else []
        limit = min(int(params.get("limit") or 10), self.page_cap)
        page = [{k: v for k, v in o.items() if not k.startswith("_")} for o in newest_first]
        body = {"object": "list", "url": path, "has_more": len(page) > limit, "data": page[:limit]}
        return JSONResponse(json.loads(json.dumps(body)))

    async def _list_sessions(self, request: Request) -> Response:
        await self._record(request)
        return self._page(request, "/v1/checkout/sessions", list(self.sessions.values()))

    async def _list_refunds(self, request: Request) -> Response:
        await self._record(request)
        return self._page(request, "/v1/refunds", list(self.refunds))

    async def _retrieve_price(self, request: Request) -> Response:
        await self._record(request)
        pid = request.path_params["pid"]
        if pid not in self.prices:
            return _error(404, "No such price")
        amount, currency = self.prices[pid]
        return JSONResponse(
            {"id": pid, "object": "price", "unit_amount": amount, "currency": currency}
        )

    async def _invoice_item(self, request: Request) -> Response:
        recorded = await self._record(request)

        def make(params: dict[str, Any]) -> tuple[int, Any]:
            return 200, {"id": f"ii_fake_{next(self._ids)}", "object": "invoiceitem", **params}

        return self._idempotent(recorded, make)

    async def _portal_session(self, request: Request) -> Response:
        recorded = await self._record(request)
        if refused := _no_such_customer(recorded.params):
            return refused
        n = next(self._ids)
        return JSONResponse(
            {
                "id": f"bps_fake_{n}",
                "object": "billing_portal.session",
                "customer": recorded.params.get("customer"),
                "return_url": recorded.params.get("return_url"),
                "url": f"https://billing.stripe.test/p/session/bps_fake_{n}",
            }
        )

    def add_session(self, session: dict[str, Any]) -> dict[str, Any]:
        """A session made on the account some other way (a payment link, the dashboard, a
        leaked key): Stripe has it, the app never asked for it."""
        stored = {"created": int(time.time()), **session}
        if stored.get("payment_intent"):
            stored.setdefault("_charge", "ch_" + str(stored["payment_intent"]))
        self.sessions[stored["id"]] = stored
        return {k: v for k, v in stored.items() if not k.startswith("_")}

    def refund(self, session_id: str, amount: int) -> dict[str, Any]:
        """A refund of a paid session's payment, made at Stripe."""
        session = self.sessions[session_id]
        refund = {
            "id": f"re_fake_{next(self._ids)}",
            "object": "refund",
            "amount": amount,
            "currency": session["currency"],
            "charge": session.get("_charge"),
            "payment_intent": session["payment_intent"],
            "status": "succeeded",
            "created": int(time.time()),
        }
        self.refunds.append(refund)
        return refund

    def _setup_session(self, params: dict[str, Any]) -> dict[str, Any]:
        sid = f"cs_test_setup{next(self._ids)}_{uuid.uuid4().hex[:12]}"
        session = {
            "id": sid,
            "object": "checkout.session",
            "customer": params.get("customer"),
            "currency": params.get("currency"),
            "metadata": params.get("metadata", {}),
            "mode": "setup",
            "payment_status": "no_payment_required",
            "setup_intent": None,
            "status": "open",
            "success_url": params.get("success_url"),
            "cancel_url": params.get("cancel_url"),
            "url": f"https://checkout.stripe.test/c/setup/{sid}",
            "livemode": False,
        }
        self.sessions[sid] = session
        return session

    def complete_setup(
        self, session_id: str, *, brand: str = "visa", last4: str = "4242"
    ) -> dict[str, Any]:
        """The customer saves a card on the setup page: a SetupIntent with a card."""
        session = self.sessions[session_id]
        n = next(self._ids)
        pm = f"pm_fake_{n}"
        si = f"seti_fake_{n}"
        self.setup_intents[si] = {
            "id": si,
            "object": "setup_intent",
            "customer": session["customer"],
            "status": "succeeded",
            "usage": "off_session",
            "payment_method": {
                "id": pm,
                "object": "payment_method",
                "customer": session["customer"],
                "type": "card",
                "card": {"brand": brand, "last4": last4, "exp_month": 12, "exp_year": 2031},
            },
        }
        session.update(status="complete", setup_intent=si)
        return {k: v for k, v in session.items() if not k.startswith("_")}

    async def _retrieve_setup_intent(self, request: Request) -> Response:
        await self._record(request)
        intent = self.setup_intents.get(request.path_params["sid"])
        if intent is None:
            return _error(404, "No such setup_intent")
        return JSONResponse(intent)

    async def _detach_payment_method(self, request: Request) -> Response:
        await self._record(request)
        pm = request.path_params["pm"]
        self.detached.append(pm)
        return JSONResponse({"id": pm, "object": "payment_method", "customer": None})

    async def _create_payment_intent(self, request: Request) -> Response:
        recorded = await self._record(request)
        if refused := _no_such_customer(recorded.params):
            return refused
        if self.charge_delay:
            await asyncio.sleep(self.charge_delay)

        def make(params: dict[str, Any]) -> tuple[int, Any]:
            outcome = self.charge_outcomes.pop(0) if self.charge_outcomes else "succeeded"
            n = next(self._ids)
            pid = f"pi_fake_topup_{n}"
            intent: dict[str, Any] = {
                "id": pid,
                "object": "payment_intent",
                "amount": int(params["amount"]),
                "currency": params["currency"],
                "customer": params.get("customer"),
                "payment_method": params.get("payment_method"),
                "metadata": params.get("metadata", {}),
                "off_session": params.get("off_session"),
                "confirm": params.get("confirm"),
                "status": "succeeded" if outcome == "succeeded" else outcome,
                "latest_charge": None,
                "last_payment_error": None,
            }
            if outcome == "succeeded":
                intent["latest_charge"] = f"ch_fake_topup_{n}"
            elif outcome != "processing":
                error = {
                    "type": "card_error",
                    "code": "authentication_required"
                    if outcome == "authentication_required"
                    else ("expired_card" if outcome == "expired_card" else "card_declined"),
                    "decline_code": outcome if outcome not in ("expired_card",) else None,
                    "message": f"Your card was declined ({outcome}).",
                }
                intent.update(status="requires_payment_method", last_payment_error=error)
                self.payment_intents[pid] = intent
                return 402, {"error": {**error, "payment_intent": intent}}
            self.payment_intents[pid] = intent
            return 200, intent

        return self._idempotent(recorded, make)

    async def _retrieve_payment_intent(self, request: Request) -> Response:
        recorded = await self._record(request)
        intent = self.payment_intents.get(request.path_params["pid"])
        if intent is None:
            return _error(404, "No such payment_intent")
        body = json.loads(json.dumps(intent))
        if "latest_charge" in (recorded.params.get("expand") or []) and body["latest_charge"]:
            ch = body["latest_charge"]
            body["latest_charge"] = {
                "id": ch,
                "object": "charge",
                "receipt_url": f"https://pay.stripe.test/receipts/{ch}",
            }
        return JSONResponse(body)

    def settle_payment_intent(self, pid: str) -> dict[str, Any]:
        """A processing PaymentIntent succeeds."""
        intent = self.payment_intents[pid]
        intent.update(status="succeeded", latest_charge=f"ch_{pid}")
        return dict(intent)

    def created_payment_intents(self) -> int:
        """How many distinct PaymentIntents were made (a replayed key makes none)."""
        return len(self.payment_intents)

    def pay(self, session_id: str, *, paid: bool = True) -> dict[str, Any]:
        """The customer completes the session (paid, or unpaid while a bank debit clears)."""
        session = self.sessions[session_id]
        n = next(self._ids)
        session.update(
            status="complete",
            payment_status="paid" if paid else "unpaid",
            payment_intent=f"pi_fake_{n}",
            _charge=f"ch_fake_{n}",
        )
        return {k: v for k, v in session.items() if not k.startswith("_")}

    def charge_of(self, session_id: str) -> str:
        return str(self.sessions[session_id]["_charge"])


# --- events in Stripe's shape ---------------------------------------------------------------


def event(event_type: str, obj: dict[str, Any], *, event_id: str | None = None) -> str:
    return json.dumps(
        {
            "id": event_id or f"evt_test_{uuid.uuid4().hex}",
            "object": "event",
            "api_version": "2026-10-28.endive",
            "created": int(time.time()),
            "data": {"object": obj},
            "livemode": False,
            "pending_webhooks": 1,
            "request": {"id": None, "idempotency_key": None},
            "type": event_type,
        }
    )


def checkout_session(
    session_id: str,
    *,
    user_id: int,
    pack_id: str = "starter",
    credits: int = 5_000,
    amount: int = 500,
    currency: str = "usd",
    paid: bool = True,
    payment_intent: str | None = None,
    status: str = "complete",
) -> dict[str, Any]:
    metadata = {"user_id": str(user_id), "pack_id": pack_id, "credits": str(credits)}
    return {
        "id": session_id,
        "object": "checkout.session",
        "amount_subtotal": amount,
        "amount_total": amount,
        "client_reference_id": str(user_id),
        "currency": currency,
        "customer": f"cus_test_{user_id}",
        "metadata": metadata,
        "mode": "payment",
        "payment_intent": payment_intent or f"pi_{session_id}",
        "payment_status": "paid" if paid else "unpaid",
        "status": status,
        "livemode": False,
    }


def charge(
    charge_id: str, *, payment_intent: str, amount: int = 500, amount_refunded: int = 0
) -> dict[str, Any]:
    return {
        "id": charge_id,
        "object": "charge",
        "amount": amount,
        "amount_captured": amount,
        "amount_refunded": amount_refunded,
        "currency": "usd",
        "payment_intent": payment_intent,
        "refunded": amount_refunded >= amount,
        "receipt_url": f"https://pay.stripe.test/receipts/{charge_id}",
        "status": "succeeded",
    }


def dispute(
    dispute_id: str, *, charge_id: str, payment_intent: str, amount: int = 500
) -> dict[str, Any]:
    return {
        "id": dispute_id,
        "object": "dispute",
        "amount": amount,
        "charge": charge_id,
        "currency": "usd",
        "payment_intent": payment_intent,
        "reason": "fraudulent",
        "status": "needs_response",
    }


def sign(body: str | bytes, secret: str, timestamp: int | None = None) -> str:
    """Stripe-Signature as Stripe documents it: HMAC-SHA256 of "{t}.{body}"."""
    t = int(time.time()) if timestamp is None else timestamp
    raw = body.encode() if isinstance(body, str) else body
    mac = hmac.new(secret.encode(), f"{t}.".encode() + raw, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


# --- the app under test ---------------------------------------------------------------------

PUBLIC = "http://localhost:3000"
WEBHOOK_SECRET = "whsec_test_" + "0" * 32


@dataclass
class Shop:
    """The app's routes (behind the security middleware) on one test database."""

    client: TestClient
    settings: Settings
    db: Database
    secret: str = WEBHOOK_SECRET

    def post_event(self, body: str | bytes, signature: str | None) -> Any:
        headers = {"Content-Type": "application/json"}
        if signature is not None:
            headers["Stripe-Signature"] = signature
        return self.client.post("/api/stripe/webhook", content=body, headers=headers)

    def deliver(self, body: str) -> Any:
        return self.post_event(body, sign(body, self.secret))

    def start(self, user_id: int, pack: str = "starter") -> str:
        """A purchase as "Buy" makes it; returns its Checkout Session id."""
        url = checkout.start_checkout(self.db, self.settings, user_id=user_id, pack_id=pack)
        return url.rsplit("/", 1)[-1]

    def balance(self, user_id: int) -> int:
        return ledger.get_balance(self.db, user_id=user_id).balance

    def purchase(self, session_id: str) -> PurchaseView:
        found = get_purchase(self.db, session_id=session_id)
        assert found is not None
        return found

    def session_cookie(self, user_id: int) -> dict[str, str]:
        token = auth.create_session(self.db, user_id=user_id, days=1)
        return {"Cookie": f"{cookies.SESSION}={token}", "Origin": PUBLIC}


def make_shop(db: Database, monkeypatch: Any, **env: str) -> Shop:
    values = {
        "DATABASE_URL": db.url,
        "PUBLIC_URL": PUBLIC,
        "API_URL": "http://testserver",
        "AICREDITS_ENV": "dev",
        "STRIPE_SECRET_KEY": "",
        "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "STRIPE_API_BASE": "",
        **env,
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    settings = get_settings()
    routes, secure = api_transformers(settings)
    assert isinstance(routes, Starlette) and not isinstance(secure, Starlette)
    client = TestClient(secure(routes), follow_redirects=False)
    return Shop(client, settings, db, values["STRIPE_WEBHOOK_SECRET"])
