"""Each edge maps typed errors through one table: the most specific class listed wins, and
every status, body, header and message stays exactly what clients and pages rely on."""

from __future__ import annotations

import pytest

from aicredits.adapters.upstream import UpstreamError
from aicredits.api.auth_routes import SIGN_IN_STATUS
from aicredits.api.openai_routes import AuthenticationFailed, RequestTooLarge, error_body
from aicredits.domain.errors import (
    AICreditsError,
    InsufficientCredits,
    InvalidRequest,
    LimiterUnavailable,
    RateLimited,
    UnknownModel,
    answer_for,
)
from aicredits.services import auth
from aicredits.services.gateway import (
    IdempotencyKeyReused,
    ReplyCut,
    ReplyInterrupted,
    ServerRestarting,
    TurnResult,
    UpstreamFailed,
    UpstreamRefused,
    provider_failure,
)
from aicredits.settings import Settings
from aicredits.state.chat import describe_error

SETTINGS = Settings(_env_file=None, public_url="https://credits.example")
CUT = TurnResult(
    request_id="req_1",
    model="m",
    text="so far",
    input_tokens=5,
    output_tokens=2,
    estimated=False,
    cost=1,
    charged=1,
    unbilled=0,
    balance_after=9,
    outcome="cut",
    finish_reason=None,
)


def test_the_most_specific_class_named_wins_and_an_unnamed_one_is_a_key_error() -> None:
    table: dict[type[Exception], str] = {Exception: "any", ValueError: "value"}
    assert answer_for(table, UnicodeError("x")) == "value"  # a ValueError, two levels down
    assert answer_for(table, KeyError("x")) == "any"
    only_values: dict[type[Exception], str] = {ValueError: "value"}
    with pytest.raises(KeyError):
        answer_for(only_values, KeyError("x"))


@pytest.mark.parametrize(
    ("error", "status", "kind", "retry_after"),
    [
        (RateLimited(scope="ip", retry_after=2.5), 429, "rate_limit_error", "3"),
        (LimiterUnavailable("down"), 503, "service_unavailable", "5"),
        (AuthenticationFailed("no key"), 401, "authentication_error", None),
        (RequestTooLarge("big"), 413, "invalid_request_error", None),
        (IdempotencyKeyReused("again"), 409, "invalid_request_error", None),
        (ServerRestarting("bye"), 503, "service_unavailable", "5"),
        (UpstreamFailed("boom"), 502, "upstream_error", None),
        (UpstreamRefused("our key was refused"), 502, "upstream_error", None),
        (ReplyCut("cut", CUT), 502, "upstream_error", None),
        (ReplyInterrupted("cut by a restart", CUT), 502, "upstream_error", None),
        (UnknownModel("no such model"), 400, "invalid_request_error", None),
        (InvalidRequest("bad"), 400, "invalid_request_error", None),
        (AICreditsError("odd"), 400, "invalid_request_error", None),
    ],
)
def test_the_api_answers_each_error_with_its_status_type_and_code(
    error: AICreditsError, status: int, kind: str, retry_after: str | None
) -> None:
    got_status, body, headers = error_body(error, SETTINGS)
    assert got_status == status
    assert body == {"error": {"message": str(error), "type": kind, "code": error.code}}
    assert headers == ({"Retry-After": retry_after} if retry_after else {})


def test_the_api_tells_a_short_client_what_it_needs_and_where_to_buy() -> None:
    status, body, headers = error_body(InsufficientCredits(available=3, needed=9), SETTINGS)
    assert (status, headers) == (402, {})
    assert body == {
        "error": {
            "message": "Insufficient credits: this request needs up to 9 credits and 3 are "
            "available. Buy more at https://credits.example/credits",
            "type": "insufficient_credits",
            "code": "insufficient_credits",
            "needed": 9,
            "available": 3,
            "buy_url": "https://credits.example/credits",
        }
    }
    assert error_body(RateLimited(scope="user", retry_after=1), SETTINGS)[1]["error"]["code"] == (
        "rate_limited"
    )


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (auth.UnknownProvider("no such provider"), 404),
        (auth.EmailNotVerified("verify first"), 403),
        (auth.AccountSuspended("suspended"), 403),
        (auth.InvalidLoginState("expired"), 400),
        (auth.ProviderDenied("denied"), 400),
        (auth.SignInError("failed"), 400),
    ],
)
def test_a_refused_sign_in_gets_its_status(error: auth.SignInError, status: int) -> None:
    assert answer_for(SIGN_IN_STATUS, error) == status


@pytest.mark.parametrize(
    ("error", "kind", "message"),
    [
        (
            InsufficientCredits(available=2, needed=9),
            "credits",
            "Not enough credits: this message needs up to 9 and you have 2 available.",
        ),
        (
            RateLimited(scope="user", retry_after=4.2),
            "rate",
            "You are sending too fast: try again in 5 s.",
        ),
        (LimiterUnavailable("down"), "rate", "The service is busy: try again in a few seconds."),
        (
            UpstreamFailed("boom"),
            "upstream",
            "The model did not answer. Nothing was charged; try again.",
        ),
        (
            UpstreamRefused("The model provider refused this request (HTTP 400)."),
            "upstream",
            "The model provider refused this request (HTTP 400).",
        ),
        (
            ServerRestarting("bye"),
            "upstream",
            "The server is restarting. Nothing was charged; send again in a few seconds.",
        ),
        (InvalidRequest("the prompt is {too} long"), "invalid", "the prompt is {too} long"),
        (ReplyCut("cut off", CUT), "invalid", "cut off"),
    ],
)
def test_the_chat_page_tells_each_error_in_words(
    error: AICreditsError, kind: str, message: str
) -> None:
    assert describe_error(error) == (kind, message)


@pytest.mark.parametrize(
    ("failure", "refused", "says"),
    [
        (UpstreamError("x", kind="status", status=401), True, "refused this site's key"),
        (UpstreamError("x", kind="status", status=403), True, "refused this site's key"),
        (UpstreamError("x", kind="status", status=404), True, "does not offer this model"),
        (UpstreamError("x", kind="status", status=400), True, "refused this request (HTTP 400)"),
        (UpstreamError("answered 429", kind="status", status=429), False, "failed (answered 429)"),
        (UpstreamError("answered 503", kind="status", status=503), False, "failed (answered 503)"),
        (UpstreamError("timed out", kind="timeout"), False, "failed (timed out)"),
    ],
)
def test_only_a_refusal_a_retry_would_meet_again_is_not_told_to_try_again(
    failure: UpstreamError, refused: bool, says: str
) -> None:
    error = provider_failure(failure, model="m", request_id="req_1")
    assert isinstance(error, UpstreamRefused) is refused
    assert says in str(error) and "Nothing was charged" in str(error)
    kind, message = describe_error(error)
    assert kind == "upstream" and ("try again" in message) is not refused
