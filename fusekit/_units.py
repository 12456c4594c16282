"""Sizes in words for reports and messages."""

from __future__ import annotations


def size_text(n: float) -> str:
    """`n` bytes in decimal units: "512 B", "1.5 MB", "17.2 GB"."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)
