"""A reply as it is delivered: each choice's text, refusal, tool calls and log probabilities,
merged from the pieces an upstream streams (or sends whole, as one piece per choice).

What was delivered is what a cut or crashed call is charged for, so `billable_texts` lists
every generated text of every choice: the content, a refusal, each tool call's name and
arguments. Pure: the caller counts their tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class ReplyChoice:
    """One choice as delivered, in the shape of an OpenAI chat completion's message."""

    index: int
    content: str
    refusal: str | None
    # Complete tool calls: {"id", "type", "function": {"name", "arguments"}}.
    tool_calls: tuple[dict[str, Any], ...]
    # {"content": [...], "refusal": [...]} when log probabilities were sent, else None.
    logprobs: dict[str, Any] | None
    finish_reason: str | None


@dataclass(slots=True)
class _Call:
    id: str = ""
    type: str = "function"
    name: str = ""
    arguments: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _Choice:
    content: list[str] = field(default_factory=list)
    refusal: list[str] = field(default_factory=list)
    calls: dict[int, _Call] = field(default_factory=dict)
    logprobs: dict[str, list[Any]] | None = None


class ReplyBuilder:
    """Accumulates the pieces of a reply of `choices` choices."""

    def __init__(self, choices: int = 1) -> None:
        self._choices: dict[int, _Choice] = {i: _Choice() for i in range(choices)}
        # Characters of generated text delivered so far: a cheap "has anything changed".
        self.chars = 0

    def add(
        self,
        *,
        index: int,
        text: str = "",
        tool_calls: Sequence[Mapping[str, Any]] = (),
        refusal: str = "",
        logprobs: Mapping[str, Any] | None = None,
    ) -> None:
        choice = self._choices.get(index)
        if choice is None:
            choice = self._choices[index] = _Choice()
        if text:
            choice.content.append(text)
            self.chars += len(text)
        if refusal:
            choice.refusal.append(refusal)
            self.chars += len(refusal)
        for piece in tool_calls:
            self.chars += _add_call_piece(choice, piece)
        if logprobs:
            merged = choice.logprobs if choice.logprobs is not None else {}
            for kind in ("content", "refusal"):
                entries = logprobs.get(kind)
                if isinstance(entries, list):
                    merged.setdefault(kind, []).extend(entries)
            choice.logprobs = merged

    @property
    def text(self) -> str:
        """The first choice's text: the reply, for a caller that asked for one."""
        first = self._choices.get(0)
        return "".join(first.content) if first is not None else ""

    @property
    def delivered(self) -> bool:
        return self.chars > 0

    def billable_texts(self) -> list[str]:
        """Every generated text, one item per choice's content, refusal and tool call."""
        texts = []
        for choice in self._choices.values():
            texts.append("".join(choice.content))
            texts.append("".join(choice.refusal))
            for call in choice.calls.values():
                texts.append(call.name)
                texts.append("".join(call.arguments))
        return [text for text in texts if text]

    def choices(self, finish_reasons: Mapping[int, str] | None = None) -> tuple[ReplyChoice, ...]:
        reasons = finish_reasons or {}
        return tuple(
            ReplyChoice(
                index=index,
                content="".join(choice.content),
                refusal="".join(choice.refusal) or None,
                tool_calls=tuple(
                    {
                        "id": call.id,
                        "type": call.type,
                        "function": {"name": call.name, "arguments": "".join(call.arguments)},
                    }
                    for _, call in sorted(choice.calls.items())
                ),
                logprobs=(
                    {"content": None, "refusal": None, **choice.logprobs}
                    if choice.logprobs is not None
                    else None
                ),
                finish_reason=reasons.get(index),
            )
            for index, choice in sorted(self._choices.items())
        )


def _add_call_piece(choice: _Choice, piece: Mapping[str, Any]) -> int:
    """Merge one streamed tool-call piece; returns the characters of name and arguments it
    added. The first piece of a call carries its id and name, the rest its arguments."""
    index = piece.get("index")
    if not isinstance(index, int) or isinstance(index, bool):
        index = len(choice.calls)
    call = choice.calls.get(index)
    if call is None:
        call = choice.calls[index] = _Call()
    if isinstance(piece.get("id"), str):
        call.id = piece["id"]
    if isinstance(piece.get("type"), str):
        call.type = piece["type"]
    function = piece.get("function")
    added = 0
    if isinstance(function, Mapping):
        name = function.get("name")
        if isinstance(name, str) and name:
            call.name += name
            added += len(name)
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            call.arguments.append(arguments)
            added += len(arguments)
    return added
