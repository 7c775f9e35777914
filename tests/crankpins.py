"""Shared helpers of the crank tests: the default pins and draining a CrankQueue."""

from __future__ import annotations

PINS = {"pin_a": "GPIO17", "pin_b": "GPIO18", "pin_button": "GPIO27"}


def drain(queue):
    """Return every item waiting in ``queue`` without blocking."""
    items = []
    while (item := queue.get(timeout=0)) is not None:
        items.append(item)
    return items
