"""Tokenising SFT trajectories: prompt ids (masked) and response ids (trained).

The response starts with its mode token, tokenised as the single special id, and ends
with the end-of-turn token so the model learns to stop. A trajectory whose mode is given
(``mode_given``) carries its mode token on the prompt side, like a forced prefix in RL: it
teaches what that mode answers without teaching the model to choose it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from personadual.modes import mode_of_token_ids, mode_token_ids
from personadual.prompts import render_prompt
from personadual.records import Prompt


@dataclass(frozen=True)
class TokenizedExample:
    prompt_token_ids: list[int]
    response_token_ids: list[int]


def tokenize_trajectory(tokenizer: Any, prompt: Prompt, response: str,
                        history: Sequence[dict[str, str]] = (), mode_given: bool = False) -> TokenizedExample:
    prompt_ids = tokenizer.encode(render_prompt(tokenizer, prompt, history), add_special_tokens=False)
    response_ids = tokenizer.encode(response, add_special_tokens=False) + [tokenizer.eos_token_id]
    if mode_of_token_ids(response_ids, mode_token_ids(tokenizer)) is None:
        raise ValueError(f"SFT response for prompt {prompt.id!r} does not start with a mode token: "
                         f"{response[:40]!r}")
    if mode_given:
        return TokenizedExample(prompt_ids + response_ids[:1], response_ids[1:])
    return TokenizedExample(prompt_ids, response_ids)
