"""What every decoding mode reports: Steps, the tokens one target forward pass committed,
with the margin of each choice (how close it came to another token, workers.sampling; the
benchmark uses it to tell near-tie flips from real errors)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Step:
    tokens: list[int]  # committed by this step, in order
    margins: list[float] | None  # margin of each choice (workers.sampling; None: not known)
    forward_passes: int = 1  # target-model forward passes the step took


def clip_step(
    tokens: list[int], margins: list[float], produced: int, max_new_tokens: int, stop_ids: set[int]
) -> tuple[list[int], list[float], bool]:
    """Cut a multi-token step's tokens (and margins) at max_new_tokens and just after the
    first stop token; the flag says whether decoding ends with this step."""
    tokens, margins = tokens[: max_new_tokens - produced], margins[: max_new_tokens - produced]
    stop = next((i for i, t in enumerate(tokens) if t in stop_ids), None)
    if stop is not None:
        tokens, margins = tokens[: stop + 1], margins[: stop + 1]
    return tokens, margins, stop is not None or produced + len(tokens) >= max_new_tokens
