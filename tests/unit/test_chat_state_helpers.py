"""The chat page's pure helpers: the cost line, notes, and errors as a person reads them."""

import pytest

from aicredits.domain.errors import (
    AICreditsError,
    InsufficientCredits,
    InvalidRequest,
    LimiterUnavailable,
    RateLimited,
)
from aicredits.services.chat import choose_conversation, choose_model
from aicredits.services.conversations import clean_title, title_from
from aicredits.services.gateway import UpstreamFailed
from aicredits.state.chat import (
    as_conversation_id,
    cost_line,
    describe_error,
    model_row,
    outcome_note,
    price_line,
)


def test_cost_line_says_tokens_and_credits() -> None:
    assert cost_line(12, 40, 3, False) == "12 tokens in · 40 out · 3 credits"
    assert cost_line(12, 1, 1, False) == "12 tokens in · 1 out · 1 credit"
    assert cost_line(12, 7, 2, True) == "12 tokens in · 7 out (counted locally) · 2 credits"


def test_notes_explain_cut_replies_and_nothing_else() -> None:
    assert "Stopped" in outcome_note("stopped")
    assert "broke off" in outcome_note("cut")
    assert outcome_note("completed") == ""


@pytest.mark.parametrize(
    ("error", "kind", "fragment"),
    [
        (InsufficientCredits(available=2, needed=9), "credits", "needs up to 9 and you have 2"),
        (RateLimited(scope="user", retry_after=4.2), "rate", "try again in 5 s"),
        (LimiterUnavailable("down"), "rate", "busy"),
        (UpstreamFailed("boom"), "upstream", "Nothing was charged"),
        (InvalidRequest("the prompt is 9000 tokens"), "invalid", "9000 tokens"),
    ],
)
def test_errors_are_told_in_words(error: AICreditsError, kind: str, fragment: str) -> None:
    got_kind, message = describe_error(error)
    assert got_kind == kind
    assert fragment in message


def test_titles_come_from_the_first_words_of_the_first_message() -> None:
    assert title_from("Hello there") == "Hello there"
    assert title_from("one two three four five six seven eight nine") == (
        "one two three four five six seven eight…"
    )
    assert title_from("  line\nbreaks\n\n and   spaces ") == "line breaks and spaces"
    assert title_from("   ") == "New chat"


def test_titles_must_be_present_and_short() -> None:
    assert clean_title("  My   chat ") == "My chat"
    with pytest.raises(InvalidRequest):
        clean_title("   ")
    with pytest.raises(InvalidRequest):
        clean_title("x" * 121)


MODELS = [
    model_row("demo", "Demo model", 500, 1500),
    model_row("big", "", 2000, 8000),
]


def test_model_rows_carry_prices_per_1k_tokens() -> None:
    assert MODELS[0]["prices"] == "0.5 in / 1.5 out per 1K tokens"
    assert MODELS[1]["label"] == "big"  # no label configured: the id
    assert price_line("big", MODELS) == "Credits per 1K tokens: 2 input, 8 output"
    assert price_line("gone", MODELS) == ""


def test_the_chosen_model_is_kept_while_offered() -> None:
    offered = [m["id"] for m in MODELS]
    assert choose_model("big", offered) == "big"
    assert choose_model("gone", offered) == "demo"
    assert choose_model("", offered) == "demo"
    assert choose_model("demo", []) == ""


def test_load_opens_the_asked_conversation_only_if_listed() -> None:
    listed = ["7", "3"]  # the most recent first
    assert choose_conversation("3", listed) == "3"
    assert choose_conversation("99", listed) == "7"  # not the user's: the most recent
    assert choose_conversation("", listed) == "7"
    assert choose_conversation("3", []) == ""


def test_a_new_conversation_has_no_id() -> None:
    assert as_conversation_id("") is None
    assert as_conversation_id("42") == 42
