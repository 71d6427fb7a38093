"""The two reasoning modes and how a response declares one.

A response's mode is its FIRST token: one of two special tokens, each a single id in the
tokenizer. A response that does not start with one has no valid mode (``None``); nothing
downstream may guess one for it.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Protocol, Sequence


class Mode(IntEnum):
    GENERAL = 0
    PERSONALIZED = 1

    @property
    def token(self) -> str:
        return MODE_TOKENS[self]

    @property
    def other(self) -> "Mode":
        return Mode(1 - int(self))


GENERAL_TOKEN = "[General_mode]"
PERSONALIZED_TOKEN = "[Personalized_mode]"
MODE_TOKENS: tuple[str, str] = (GENERAL_TOKEN, PERSONALIZED_TOKEN)


class TokenizerLike(Protocol):
    def convert_tokens_to_ids(self, tokens: str) -> int: ...
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


def mode_token_ids(tokenizer: TokenizerLike) -> dict[Mode, int]:
    """Id of each mode token; fails unless each is ONE id that round-trips through encode."""
    ids: dict[Mode, int] = {}
    unk = getattr(tokenizer, "unk_token_id", None)
    for mode in Mode:
        token_id = tokenizer.convert_tokens_to_ids(mode.token)
        encoded = tokenizer.encode(mode.token, add_special_tokens=False)
        if token_id is None or token_id == unk or encoded != [token_id]:
            raise ValueError(
                f"tokenizer: mode token {mode.token!r} is not a single special token "
                f"(id {token_id}, encodes to {encoded}); add it as an additional special token"
            )
        ids[mode] = int(token_id)
    return ids


def mode_of_token_ids(response_ids: Sequence[int], ids: dict[Mode, int]) -> Mode | None:
    """Mode declared by a response's first token id, or None when it declares none."""
    if not response_ids:
        return None
    first = int(response_ids[0])
    for mode, token_id in ids.items():
        if first == token_id:
            return mode
    return None


def mode_of_text(text: str) -> Mode | None:
    """Mode declared at the very start of decoded response text (leading spaces allowed)."""
    stripped = text.lstrip()
    for mode in Mode:
        if stripped.startswith(mode.token):
            return mode
    return None


def strip_mode(text: str) -> str:
    """Response text without its leading mode token (unchanged when it has none)."""
    mode = mode_of_text(text)
    if mode is None:
        return text
    return text.lstrip()[len(mode.token):].lstrip()
