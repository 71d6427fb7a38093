"""Answer text: TriviaQA-style normalisation and extraction of the final answer.

A trained response reads ``[General_mode] reasoning... Answer: teal``. The answer is the
text after the LAST ``Answer:`` (reasoning may quote the marker earlier); a response
without the marker is answered by its whole text, minus the mode token.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from personadual.modes import Mode, mode_of_text, strip_mode
from personadual.prompts import ANSWER_PREFIX

_ARTICLES = re.compile(r"\b(a|an|the)\b")
# Case-insensitive so "answer:" and "ANSWER:" count; the last match wins.
_ANSWER_MARKER = re.compile(re.escape(ANSWER_PREFIX), re.IGNORECASE)


def decode_response(data: bytes | str) -> str:
    """Response text from raw bytes; bytes that are not UTF-8 become U+FFFD, never an error."""
    if isinstance(data, bytes):
        return data.decode("utf-8", errors="replace")
    return data


def _is_punctuation(char: str) -> bool:
    # Unicode punctuation (P*) and symbols (S*) cover ASCII punctuation plus curly quotes,
    # dashes and the like that TriviaQA's extra list handles by hand.
    return unicodedata.category(char)[0] in "PS"


_MINUS_SIGNS = str.maketrans({"\u2212": "-", "\u2013": "-", "\ufe63": "-", "\uff0d": "-"})


def _keeps_number_apart(text: str, index: int) -> str | None:
    """What punctuation at ``index`` becomes when it is part of a number, else None: a
    decimal point between digits stays ("2.5" is not "25"), a thousands comma between digits
    goes ("1,000" is "1000", "1,2" stays two numbers), a minus sign starting a number stays ("-5" is not "5")."""
    char = text[index]
    before = text[index - 1] if index else ""
    after = text[index + 1] if index + 1 < len(text) else ""
    if char == "." and before.isdigit() and after.isdigit():
        return "."
    if char == "," and before.isdigit() and re.match(r"\d{3}(?!\d)", text[index + 1:index + 5]):
        return ""
    if char == "-" and after.isdigit() and not before.isalnum():
        return "-"
    return None


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles (a/an/the), single spaces (TriviaQA / SQuAD),
    except that numbers keep their sign and decimal point (TriviaQA's own script would read
    "-5" as "5" and "2.5" as "25")."""
    text = unicodedata.normalize("NFKC", text.translate(_MINUS_SIGNS)).lower().replace("_", " ")
    kept = []
    for index, char in enumerate(text):
        if _is_punctuation(char):
            number_part = _keeps_number_apart(text, index)
            kept.append(" " if number_part is None else number_part)
        else:
            kept.append(char)
    text = _ARTICLES.sub(" ", "".join(kept))
    return " ".join(text.split())


@dataclass(frozen=True)
class Extraction:
    """What a response answered, and how it was found."""

    answer: str  # stripped answer text ("" when the response holds none)
    has_marker: bool  # the answer followed an ``Answer:`` marker
    mode: Mode | None  # mode token the response starts with


def extract_answer(response: str) -> Extraction:
    """The text after the last ``Answer:``, else the whole response without its mode token."""
    mode = mode_of_text(response)
    body = strip_mode(response)
    last = None
    for last in _ANSWER_MARKER.finditer(body):
        pass
    if last is None:
        return Extraction(body.strip(), False, mode)
    return Extraction(body[last.end():].strip(), True, mode)


DETAIL_CHARS = 400


def clip(text: str, limit: int = DETAIL_CHARS) -> str:
    """Text short enough for a detail dict: detail travels between processes and into logs."""
    if len(text) <= limit:
        return text
    return f"...{text[-limit:]}"
