"""The tokenized examples post-training works on, one dataclass per dataset kind.

Readers (`llmcycle.train.posttrain.chat_data`) turn records into these; trainers batch them. Token ids are
complete sequences: the prompt rendered through the chat template (or plain text), then the completion.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SFTExample:
    """One conversation or instruction, rendered and tokenized.

    `trained[i]` says whether token `ids[i]` is a target (the loss predicts it from ids[:i]); by default
    the assistant tokens (content and end-of-turn), or every token but the first with `loss_on: all`.
    """

    ids: list[int]
    trained: list[bool]
    source: str  # "file:line", for reports
    prompt_ids: list[int] | None = None  # the conversation up to the last assistant turn, with the generation prompt
    reference: str | None = None  # the last assistant turn's text: the answer exact-match compares against
    truncated: bool = False


@dataclass
class PreferenceExample:
    """A prompt with a preferred and a dispreferred completion (token ids of each part)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    source: str
    truncated: bool = False


@dataclass
class UnpairedExample:
    """KTO feedback: one completion labelled desirable (True) or undesirable (False)."""

    prompt_ids: list[int]
    completion_ids: list[int]
    label: bool
    source: str
    truncated: bool = False


@dataclass
class PromptExample:
    """A prompt for online methods (PPO, GRPO), with the reference answer a verifiable reward checks."""

    prompt_ids: list[int]
    prompt: str | list[dict]  # as read: text or messages
    reference: str | None
    source: str
