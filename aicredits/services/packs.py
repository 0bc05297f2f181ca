"""The credit packs for sale, as the credits page offers them."""

from __future__ import annotations

from dataclasses import dataclass

from aicredits.domain.money import format_money
from aicredits.settings import CreditPack, Settings


@dataclass(frozen=True, slots=True)
class PackOffer:
    id: str
    label: str
    credits: int
    price: str  # "5.00 USD", or "" when a Stripe Price sets it


def label_of(pack: CreditPack) -> str:
    return pack.label or pack.id.replace("-", " ").replace("_", " ").title()


def pack_label(settings: Settings, pack_id: str) -> str:
    pack = settings.pack(pack_id)
    return label_of(pack) if pack else pack_id


def list_packs(settings: Settings) -> list[PackOffer]:
    return [
        PackOffer(
            id=p.id,
            label=label_of(p),
            credits=p.credits,
            price=format_money(p.amount, p.currency) if p.amount > 0 else "",
        )
        for p in settings.packs
    ]
