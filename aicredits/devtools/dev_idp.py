"""The local OpenID Connect provider behind "Dev sign-in" (the oidc-provider-mock package).

Started by `make run` when no real provider is configured, so a newcomer can sign in with
no account anywhere. Its sign-in page lists a few test users; any other name typed there
works too. It requires a nonce, like a strict real issuer. Its pages are our own templates
(dev_idp_templates/): no stylesheet from a CDN, and a field that asks for an email.
"""

from __future__ import annotations

import argparse
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import authlib.deprecate  # noqa: F401 - it installs its own "always" filter: ours goes after
import jinja2
import uvicorn

with warnings.catch_warnings():
    # The stand-in provider still imports authlib.jose, which Authlib deprecates; nothing of
    # ours uses it, and `make run` printed the warning twice at every start.
    warnings.filterwarnings("ignore", message="authlib.jose module is deprecated")
    import oidc_provider_mock

DEV_USERS = [
    ("alice@example.test", "Alice Example"),
    ("bob@example.test", "Bob Example"),
    ("admin@example.test", "Ada Admin"),
]


def dev_user_claims(users: Sequence[tuple[str, str]] = DEV_USERS) -> list[Any]:
    return [
        oidc_provider_mock.User(
            sub=email, claims={"email": email, "email_verified": True, "name": name}
        )
        for email, name in users
    ]


# Our own pages for the mock's sign-in form and errors: styled without its CDN stylesheet
# (which cannot load here), and asking for an email, which is what a user is here.
TEMPLATES = Path(__file__).with_name("dev_idp_templates")


def build_app(users: Sequence[tuple[str, str]] = DEV_USERS) -> Any:
    # The mock speaks plain http on localhost; Authlib refuses that unless told otherwise.
    os.environ.setdefault("AUTHLIB_INSECURE_TRANSPORT", "1")
    app = oidc_provider_mock.app(require_nonce=True, user_claims=dev_user_claims(users))
    app.jinja_loader = jinja2.ChoiceLoader([jinja2.FileSystemLoader(TEMPLATES), app.jinja_loader])
    return app


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aicredits dev-idp", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9400)
    args = parser.parse_args(argv)
    uvicorn.run(build_app(), host=args.host, port=args.port, interface="wsgi", log_level="warning")
    return 0
