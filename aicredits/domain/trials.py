"""Free trials per client address: which bucket a sign-up counts in, and what a user who
was refused the trial is told."""

from __future__ import annotations

import ipaddress
from datetime import UTC, date, datetime

# Sign-ups whose address is unknown (no client in the ASGI scope, or a forwarded value that
# is not an IP address) share one bucket. Counting them together keeps the limit: skipping
# them would make "address unknown" a way around it. In a normal deployment (a TCP socket,
# behind a trusted proxy that appends the address it saw) no client can cause this, so the
# bucket filling up points at the set-up; it shows in the admin overview like any other.
UNKNOWN_ADDRESS = "unknown"
# One household or server gets a whole IPv6 /64 and can use any address in it.
IPV6_PREFIX = 64


def address_bucket(address: str | None) -> str:
    """What a sign-up from `address` counts against: an IPv4 address as is (also when it
    arrives IPv4-mapped), an IPv6 address's /64 network, or the unknown bucket."""
    ip = _parsed(address)
    if ip is None:
        return UNKNOWN_ADDRESS
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, IPV6_PREFIX), strict=False))
    return str(ip)


def is_loopback(address: str | None) -> bool:
    """Whether `address` is this machine's own (127.0.0.0/8, ::1, or IPv4-mapped loopback)."""
    ip = _parsed(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip is not None and ip.is_loopback


def _parsed(address: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not address:
        return None
    try:
        return ipaddress.ip_address(address.strip())
    except ValueError:
        return None


def trial_day(moment: datetime) -> date:
    """The UTC day a sign-up counts in."""
    return moment.astimezone(UTC).date()


def withheld_trial_notice(*, others: int, withheld_at: datetime, now: datetime) -> str:
    """What a user created past the limit sees: why there is no trial, and what to do."""
    accounts = "1 account" if others == 1 else f"{others:,} accounts"
    day = trial_day(withheld_at)
    if day == trial_day(now):
        when = f"{accounts} already got one from your network today"
    else:
        when = f"{accounts} had already got one from your network on {day.isoformat()} (UTC)"
    return f"No free trial for this account: {when}. Buy credits to start."
