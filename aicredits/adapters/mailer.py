"""Outgoing email over SMTP (only ever called from background jobs, never on a request)."""

from __future__ import annotations

import smtplib
import ssl
from email.message import EmailMessage

from aicredits.settings import Settings

TIMEOUT_SECONDS = 10


class MailError(Exception):
    """The message could not be handed to the SMTP server."""


def send(settings: Settings, *, to: str, subject: str, body: str) -> None:
    message = EmailMessage()
    message["From"] = settings.smtp_from
    message["To"] = to
    message["Subject"] = subject
    message.set_content(body)
    try:
        with smtplib.SMTP(settings.smtp_host, settings.smtp_port, timeout=TIMEOUT_SECONDS) as smtp:
            if settings.smtp_starttls:
                smtp.starttls(context=ssl.create_default_context())
            if settings.smtp_username:
                smtp.login(settings.smtp_username, settings.smtp_password)
            smtp.send_message(message)
    except (OSError, smtplib.SMTPException) as exc:
        raise MailError(str(exc) or exc.__class__.__name__) from exc
