"""`python -m aicredits ...`: what an operator types, sees, and gets as an exit code."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from aicredits import cli
from aicredits.adapters.db import Database
from aicredits.adapters.tables import credit_accounts
from aicredits.services import ledger, users
from aicredits.settings import get_settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def env_db(db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Database]:
    monkeypatch.setenv("DATABASE_URL", db_url)
    get_settings.cache_clear()
    database = Database(db_url)
    yield database
    database.dispose()
    get_settings.cache_clear()


def run(*argv: str) -> int:
    try:
        return cli.main(list(argv))
    except SystemExit as exc:  # argparse exits on its own errors
        return int(exc.code or 0)


def test_grant_by_email_adds_credits_and_prints_the_balance(
    env_db: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    user = users.create_user(env_db, email="Ada@Example.test")
    code = run("grant", "--email", "ada@example.test", "--credits", "500", "--reason", "beta")
    out = capsys.readouterr().out
    assert code == 0
    assert "granted 500 credits to ada@example.test" in out
    assert "Balance: 500" in out
    assert ledger.get_balance(env_db, user_id=user.id).balance == 500


def test_grant_with_a_key_twice_grants_once(
    env_db: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    user = users.create_user(env_db, email="k@example.test")
    args = ("grant", "--email", "k@example.test", "--credits", "50", "--reason", "r", "--key", "x1")
    assert run(*args) == 0
    assert run(*args) == 0
    assert "already granted" in capsys.readouterr().out
    assert ledger.get_balance(env_db, user_id=user.id).balance == 50


def test_expiring_grant_from_the_command_line(
    env_db: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    users.create_user(env_db, email="e@example.test")
    code = run(
        "grant", "--email", "e@example.test", "--credits", "5", "--reason", "trial",
        "--expires-in-days", "30",
    )  # fmt: skip
    assert code == 0
    assert "expiring" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--credits", "0", "--reason", "r"), "greater than zero"),
        (("--credits", "-5", "--reason", "r"), "greater than zero"),
        (("--credits", "abc", "--reason", "r"), "expected a whole number"),
        (("--credits", "1.5", "--reason", "r"), "expected a whole number"),
        (("--credits", "5", "--reason", "  "), "reason is required"),
        (("--credits", "5"), "--reason"),
        (("--credits", "5", "--reason", "r", "--expires-in-days", "0"), "at least 1"),
    ],
)
def test_bad_grants_exit_2_with_a_clear_message_and_change_nothing(
    env_db: Database, capsys: pytest.CaptureFixture[str], args: tuple[str, ...], message: str
) -> None:
    user = users.create_user(env_db, email="b@example.test")
    assert run("grant", "--email", "b@example.test", *args) == 2
    assert message in capsys.readouterr().err
    assert ledger.get_balance(env_db, user_id=user.id).balance == 0


def test_grant_to_an_unknown_email_exits_2(
    env_db: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run("grant", "--email", "ghost@example.test", "--credits", "5", "--reason", "r") == 2
    assert "no user with email ghost@example.test" in capsys.readouterr().err


def test_verify_ledger_passes_on_a_healthy_ledger(
    env_db: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    user = users.create_user(env_db, email="v@example.test")
    ledger.grant(env_db, user_id=user.id, credits=10, key="g", reason="r")
    assert run("verify-ledger") == 0
    assert "ledger OK" in capsys.readouterr().out


def test_verify_ledger_exits_1_naming_the_first_broken_invariant(
    env_db: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    user = users.create_user(env_db, email="v@example.test")
    ledger.grant(env_db, user_id=user.id, credits=10, key="g", reason="r")
    with env_db.transaction() as conn:  # tamper behind the ledger's back
        conn.execute(sa.update(credit_accounts).values(balance=15))
    assert run("verify-ledger") == 1
    err = capsys.readouterr().err
    assert err.startswith("ledger BROKEN: ")
    assert f"account of user {user.id}: balance 15 != sum of ledger amounts 10" in err


def test_the_module_runs_as_a_command(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cmd.db'}"
    env = {**os.environ, "DATABASE_URL": url}
    for argv, expected in [(["migrate"], "database at head"), (["verify-ledger"], "ledger OK")]:
        done = subprocess.run(
            [sys.executable, "-m", "aicredits", *argv],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert expected in done.stdout
    assert "priced demo-model" in subprocess.run(
        [sys.executable, "-m", "aicredits", "migrate"],
        cwd=ROOT, env={**env, "DATABASE_URL": f"sqlite:///{tmp_path / 'b.db'}"},
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip


def test_run_jobs_reports_what_each_job_did(
    env_db: Database, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.integration.test_spike_reports import quiet_then_heavy

    monkeypatch.setenv("SPIKE_FACTOR", "5")
    monkeypatch.setenv("SPIKE_MIN_CREDITS", "100")
    get_settings.cache_clear()
    quiet_then_heavy(env_db)
    assert run("run-jobs") == 0
    out = capsys.readouterr().out
    assert "reported 1 spending spikes" in out, out
    assert run("run-jobs") == 0  # once per user per hour
    assert "reported 0 spending spikes" in capsys.readouterr().out
