"""A VRAM limit as the settings give it: bytes (``70Gi``) or a share of the device (``90%``).

Parsed where the settings are checked, so it imports nothing heavy."""

from __future__ import annotations

import re
from dataclasses import dataclass

_UNITS = {
    "": 1,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
    "t": 10**12,
    "ki": 2**10,
    "mi": 2**20,
    "gi": 2**30,
    "ti": 2**40,
}
_LIMIT_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(%|[kKmMgGtT]i?)?\s*$")


@dataclass(frozen=True)
class VramLimit:
    """A limit in bytes or as a fraction of the device's memory."""

    bytes: int | None = None
    fraction: float | None = None

    @classmethod
    def parse(cls, text: str) -> VramLimit:
        match = _LIMIT_RE.match(text)
        if not match:
            raise ValueError(
                f"VRAM limit must be bytes such as '70Gi' or a percentage such as '90%', got {text!r}"
            )
        number, unit = float(match.group(1)), match.group(2) or ""
        if unit == "%":
            if not 0 < number <= 100:
                raise ValueError(f"a VRAM percentage must be above 0 and at most 100, got {text!r}")
            return cls(fraction=number / 100)
        if number <= 0:
            raise ValueError(f"a VRAM limit must be positive, got {text!r}")
        return cls(bytes=int(number * _UNITS[unit.lower()]))

    def resolve(self, total_bytes: int) -> int:
        return self.bytes if self.bytes is not None else int((self.fraction or 0) * total_bytes)

    def __str__(self) -> str:
        return f"{self.fraction * 100:g}%" if self.fraction is not None else f"{self.bytes} bytes"
