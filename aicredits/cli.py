"""The operator's command line: parse input, call one service, say what happened.

Exit codes: 0 success, 1 a ledger invariant is broken (verify-ledger) or a payment
discrepancy remains (reconcile), 2 bad input or an unknown user.
"""

from __future__ import annotations

import argparse
import sys
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

from aicredits.adapters.db import Database
from aicredits.adapters.stripe_api import StripeFailure
from aicredits.adapters.tables import utcnow
from aicredits.domain.errors import AICreditsError
from aicredits.services import jobs, ledger, reconciliation, schema, trials, users
from aicredits.services.verify import verify_ledger
from aicredits.settings import get_settings

EXIT_OK = 0
EXIT_BROKEN = 1
EXIT_BAD_INPUT = 2


def _whole_number(text: str) -> int:
    try:
        return int(text.replace("_", ""), 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def _window_start(text: str) -> datetime:
    """`7d`, `36h` (back from now) or an ISO date or date-time (UTC when it says no zone)."""
    raw = text.strip().lower()
    units = {"d": "days", "h": "hours"}
    if raw[-1:] in units and raw[:-1].isdigit():
        amount = int(raw[:-1])
        if not 0 < amount <= 3660 * (24 if raw[-1] == "h" else 1):
            raise argparse.ArgumentTypeError(f"{text!r} is not a window this command can walk")
        return utcnow() - timedelta(**{units[raw[-1]]: amount})
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected 7d, 36h or a date like 2026-11-01, got {text!r}"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    if moment > utcnow():
        raise argparse.ArgumentTypeError(f"{text!r} is in the future")
    return moment


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m aicredits", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("migrate", help="apply database migrations and seed model prices")
    sub.add_parser(
        "verify-ledger", help="check every ledger invariant; exit 1 naming the first broken one"
    )

    reconcile = sub.add_parser(
        "reconcile",
        help="set Stripe's paid sessions and refunds against the purchases; exit 1 on a "
        "discrepancy",
    )
    reconcile.add_argument(
        "--since",
        default="7d",
        type=_window_start,
        help="how far back: 7d, 36h, or a date (2026-11-01); default 7d",
    )
    reconcile.add_argument(
        "--fix",
        action="store_true",
        help="credit the payments made at Stripe but not credited here (once each)",
    )

    grant = sub.add_parser("grant", help="add credits to a user's balance")
    who = grant.add_mutually_exclusive_group(required=True)
    who.add_argument("--email", help="the user's email address")
    who.add_argument("--user-id", type=_whole_number, help="the user's internal id")
    grant.add_argument("--credits", type=_whole_number, required=True, help="credits to add (> 0)")
    grant.add_argument("--reason", required=True, help="why; kept in the ledger")
    grant.add_argument(
        "--expires-in-days", type=_whole_number, help="the unspent rest expires after this"
    )
    grant.add_argument(
        "--key",
        help="idempotency key: repeating the command with the same key grants only once "
        "(default: a new random key)",
    )

    sub.add_parser(
        "run-jobs",
        help="release stale holds, expire due grants, send threshold emails, report spikes, tidy",
    )
    # Listed for --help; their own arguments are parsed by their own main() (see main()).
    sub.add_parser("dev", help="run the app with its local stand-ins (what `make run` does)")
    sub.add_parser("dev-idp", help="run the local OpenID provider behind Dev sign-in")
    sub.add_parser("fake-upstream", help="run the local fake OpenAI-compatible model")
    sub.add_parser(
        "check-config",
        help="list what would stop a production start (dev defaults); exit 2 if any",
    )
    sub.add_parser(
        "prod",
        help="check the config, migrate, run `reflex run --env prod` "
        "[--workers N] [--backend-only] [--port P] [--backend-port P]",
    )
    return parser


def _dev_command(name: str) -> Callable[[list[str]], int]:
    if name == "dev":
        from aicredits.devtools import launcher

        return launcher.main
    if name == "dev-idp":
        from aicredits.devtools import dev_idp

        return dev_idp.main
    from aicredits.devtools import fake_upstream

    return fake_upstream.main


DEV_COMMANDS = ("dev", "dev-idp", "fake-upstream")


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    # The development servers take their own options (and `dev` passes the rest to Reflex).
    if arguments and arguments[0] in DEV_COMMANDS:
        return _dev_command(arguments[0])(arguments[1:])
    if arguments and arguments[0] == "prod":
        from aicredits import prod_launcher

        return prod_launcher.main(arguments[1:])
    args = _parser().parse_args(arguments)
    if args.command == "check-config":
        return _check_config()
    settings = get_settings()
    db = Database(settings.database_url)
    try:
        if args.command == "migrate":
            return _migrate(db)
        if args.command == "verify-ledger":
            return _verify(db)
        if args.command == "grant":
            return _grant(db, args)
        if args.command == "run-jobs":
            return _run_jobs(db)
        if args.command == "reconcile":
            return _reconcile(db, args)
    except AICreditsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        db.dispose()
    raise AssertionError(f"unhandled command {args.command}")  # pragma: no cover


def _check_config() -> int:
    """Judge the environment as production would, whatever AICREDITS_ENV says now."""
    from aicredits import prod_launcher
    from aicredits.services.production import production_problems

    settings = prod_launcher.load_production_settings()
    if isinstance(settings, str):
        print(f"error: {settings}", file=sys.stderr)
        return EXIT_BAD_INPUT
    problems = production_problems(settings)
    if problems:
        print(f"not ready for production: {len(problems)} problem(s)", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print("ready for production: no development default is in use")
    return EXIT_OK


def _migrate(db: Database) -> int:
    for line in schema.migrate(db, get_settings()):
        print(line)
    return EXIT_OK


def _verify(db: Database) -> int:
    problems = verify_ledger(db)
    if problems:
        print(f"ledger BROKEN: {problems[0]}", file=sys.stderr)
        if len(problems) > 1:
            print(f"... and {len(problems) - 1} more:", file=sys.stderr)
            for problem in problems[1:]:
                print(f"  {problem}", file=sys.stderr)
        return EXIT_BROKEN
    print("ledger OK: every invariant holds for every account")
    return EXIT_OK


def _grant(db: Database, args: argparse.Namespace) -> int:
    if args.user_id is not None:
        user_id = args.user_id
        label = f"user {user_id}"
    else:
        user = users.find_user_by_email(db, email=args.email)
        user_id = user.id
        label = f"{user.email} (user {user.id})"
    expires_at = None
    if args.expires_in_days is not None:
        if args.expires_in_days <= 0:
            print("error: --expires-in-days must be at least 1", file=sys.stderr)
            return EXIT_BAD_INPUT
        expires_at = utcnow() + timedelta(days=args.expires_in_days)
    key = args.key or f"cli-grant:{uuid.uuid4()}"
    result = ledger.grant(
        db,
        user_id=user_id,
        credits=args.credits,
        key=key,
        reason=args.reason,
        expires_at=expires_at,
        actor="cli",
    )
    if result.replayed:
        print(f"already granted with key {key}: nothing changed. Balance: {result.balance_after}")
        return EXIT_OK
    until = f", expiring {expires_at:%Y-%m-%d %H:%M} UTC" if expires_at else ""
    print(f"granted {args.credits} credits to {label}{until}. Balance: {result.balance_after}")
    print(f"idempotency key: {key}")
    return EXIT_OK


def _run_jobs(db: Database) -> int:
    report = jobs.run_all(db, get_settings())
    print(
        f"released {report.stale_holds} stale holds; expired {report.credits_expired} credits; "
        f"sent {report.emails_sent} threshold emails; "
        f"reported {report.spikes_reported} spending spikes "
        f"({report.spike_emails_sent} emails to admins); "
        f"forgot {report.sign_ins_forgotten} old sign-in attempts and "
        f"{report.trial_addresses_forgotten} trial counts of addresses "
        f"older than {trials.ADDRESS_DAYS_KEPT} days"
    )
    return EXIT_OK


def _reconcile(db: Database, args: argparse.Namespace) -> int:
    try:
        report = reconciliation.reconcile(
            db, get_settings(), since=args.since, fix=args.fix, trigger="cli"
        )
    except StripeFailure as exc:
        print(f"error: Stripe could not be read: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if report.stripe_checked:
        print(
            f"checked {report.sessions_checked} Checkout Sessions and {report.refunds_checked} "
            f"refunds since {report.since:%Y-%m-%d %H:%M} UTC"
        )
    else:
        print("no STRIPE_SECRET_KEY: Stripe was not walked; only unmatched payments checked")
    for found in report.discrepancies:
        mark = "FIXED " if found.fixed else ""
        print(f"{mark}{found.kind}: {found.session_id}: {found.detail}")
    if report.outstanding:
        print(
            f"payments NOT reconciled: {len(report.outstanding)} discrepancies"
            + (f" ({report.fixed} fixed)" if report.fixed else ""),
            file=sys.stderr,
        )
        return EXIT_BROKEN
    print("payments OK" + (f": fixed {report.fixed}" if report.fixed else ": no discrepancy"))
    return EXIT_OK
