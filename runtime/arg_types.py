"""argparse types of the `leapfrog` command's flags: numbers in a range, lists."""

from __future__ import annotations

import argparse


def number_type(cast, ok, what: str):
    """An argparse type: `cast` the text and check it with `ok`, else say `what` was expected."""

    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


positive_int = number_type(int, lambda v: v >= 1, "a positive integer")
non_negative_int = number_type(int, lambda v: v >= 0, "an integer >= 0")
positive_float = number_type(float, lambda v: v > 0, "a positive number")


def layer_list(text: str) -> tuple[int, ...]:
    """'24,27' -> (24, 27)."""
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers, got {text!r}") from None


def int_list(text: str) -> list[int]:
    """'1,8,64' -> [1, 8, 64], each a positive integer."""
    values = [positive_int(x.strip()) for x in text.split(",") if x.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values
