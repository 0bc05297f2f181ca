"""What stops a production start: every development default that would leak into it.

The embedded defaults make `make run` work with no accounts anywhere, and each of them is
wrong in production (a login anyone can use, free credits from a simulated checkout, a fake
model, one SQLite file behind several workers). `production_problems` names each one with
the variable that fixes it; the app, `check-config` and `prod` refuse to start while any
remain.
"""

from __future__ import annotations

from pydantic import SecretStr

from aicredits.adapters import oauth
from aicredits.settings import Settings

# HMAC keys shorter than this are guessable in practice; `openssl rand -hex 32` gives 64.
MIN_SESSION_SECRET_LENGTH = 32
# How .env.example marks the values an operator must replace.
PLACEHOLDER_PREFIX = "replace-with"


def production_problems(settings: Settings) -> list[str]:
    """One sentence per problem, each naming the variable to set. Empty means ready."""
    problems: list[str] = []
    secret = settings.session_secret.get_secret_value()
    if not secret:
        problems.append(
            "SESSION_SECRET is not set: set it to a long random value "
            "(e.g. `openssl rand -hex 32`); it keys the stored hashes of sessions and API keys."
        )
    elif len(secret) < MIN_SESSION_SECRET_LENGTH:
        problems.append(
            f"SESSION_SECRET is shorter than {MIN_SESSION_SECRET_LENGTH} characters: "
            "use a long random value (e.g. `openssl rand -hex 32`)."
        )
    if not oauth.configured_providers(settings):
        problems.append(
            "No sign-in provider is configured, so only the local Dev sign-in exists: set "
            "GOOGLE_CLIENT_ID/GOOGLE_CLIENT_SECRET, GITHUB_CLIENT_ID/GITHUB_CLIENT_SECRET, "
            "or OIDC_ISSUER/OIDC_CLIENT_ID/OIDC_CLIENT_SECRET."
        )
    if settings.simulated_checkout:
        problems.append(
            "STRIPE_SECRET_KEY is not set, so 'Buy' would open the simulated checkout: "
            "set STRIPE_SECRET_KEY to your Stripe secret key."
        )
    if not settings.stripe_webhook_secret:
        problems.append(
            "STRIPE_WEBHOOK_SECRET is not set: set it to the webhook endpoint's signing secret "
            "(whsec_...) so payments can be verified and fulfilled."
        )
    if settings.uses_fake_upstream:
        problems.append(
            "OPENAI_API_KEY is not set, so chats would go to the local fake upstream: set "
            "OPENAI_API_KEY (and OPENAI_BASE_URL for a provider other than OpenAI)."
        )
    if settings.database_url.startswith("sqlite") and not settings.allow_sqlite_in_prod:
        problems.append(
            "DATABASE_URL is SQLite: set it to PostgreSQL (postgresql://user:pass@host/db), "
            "or set ALLOW_SQLITE_IN_PROD=true for a deliberate single-machine setup."
        )
    if not settings.redis_url:
        problems.append(
            "REDIS_URL is not set: production runs several workers, which share their state "
            "and rate limits through Redis (redis://host:6379/0)."
        )
    urls = {"PUBLIC_URL": settings.public_url}
    if settings.api_url != settings.public_url:  # in production it defaults to PUBLIC_URL
        urls["API_URL"] = settings.api_url
    for name, url in urls.items():
        if not url.startswith("https://"):
            problems.append(
                f"{name} is {url!r}: production must be served over https:// "
                "(secure cookies, OAuth callbacks, Stripe redirects)."
            )
    problems.extend(_placeholders(settings))
    return problems


def _placeholders(settings: Settings) -> list[str]:
    """Values still as .env.example left them."""
    return [
        f"{name} is still the placeholder from .env.example: set the real value."
        for name in placeholder_names(settings)
    ]


def placeholder_names(settings: Settings) -> list[str]:
    """The variables whose values are still .env.example's placeholders ("replace-with...")."""
    found = []
    for name, value in settings:
        text = value.get_secret_value() if isinstance(value, SecretStr) else value
        if isinstance(text, str) and text.startswith(PLACEHOLDER_PREFIX):
            found.append(name.upper())
    return found


def refusal_message(problems: list[str]) -> str:
    lines = [f"aicredits refuses to start in production: {len(problems)} problem(s)"]
    lines += [f"  - {problem}" for problem in problems]
    lines.append("Run `python -m aicredits check-config` to check again.")
    return "\n".join(lines)


def refuse_unless_ready(settings: Settings) -> None:
    """In production, stop the process (SystemExit) naming every problem; else do nothing."""
    if settings.environment != "prod":
        return
    problems = production_problems(settings)
    if problems:
        raise SystemExit(refusal_message(problems))
