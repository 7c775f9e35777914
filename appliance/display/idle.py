"""Idle policy: dim the panel, then switch it off, while the crank is not turned.

An OLED ages with the time its pixels are lit, and a box left on a shelf would show
the same story for days. After ``dim_after`` seconds without a detent the contrast
drops; after ``off_after`` seconds the panel sleeps (display off, RAM kept). The next
detent restores both.
"""

import math

from appliance.errors import ConfigError

__all__ = ["IdlePolicy", "ON", "DIM", "OFF"]

ON = "on"
DIM = "dim"
OFF = "off"


def _check_delay(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
        raise ConfigError(f"{name} {value!r} is invalid: use seconds >= 0, or 0 to disable")
    return float(value)


class IdlePolicy:
    """Maps seconds since the last detent to a panel level: on, dim or off.

    A delay of 0 disables that step. When ``off_after`` is not after ``dim_after``
    the panel goes straight from on to off.
    """

    def __init__(self, dim_after: float = 60.0, off_after: float = 600.0):
        self.dim_after = _check_delay("dim_after", dim_after)
        self.off_after = _check_delay("off_after", off_after)

    def _steps(self) -> list[tuple[float, str]]:
        steps = []
        if self.dim_after > 0:
            steps.append((self.dim_after, DIM))
        if self.off_after > 0:
            steps.append((self.off_after, OFF))
        steps.sort()
        return steps

    def level(self, idle_seconds: float) -> str:
        """Return the level for a crank idle for ``idle_seconds``."""
        current = ON
        for after, level in self._steps():
            if idle_seconds >= after:
                current = OFF if OFF in (current, level) else level
        return current

    def next_change(self, idle_seconds: float) -> float | None:
        """Return the seconds until the level changes, or None if it never will."""
        current = self.level(idle_seconds)
        for after, _ in self._steps():
            if after > idle_seconds and self.level(after) != current:
                return after - idle_seconds
        return None
