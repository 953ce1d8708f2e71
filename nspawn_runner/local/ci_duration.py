"""GitLab's human durations (`timeout: 1h 30m`, `3 hours and 20 minutes`, `1:30:00`), parsed
the way its copy of ChronicDuration (gitlab-chronic-duration 0.12) does, quirks included:
unknown words are dropped, a number without a unit takes the unit below the previous one (or
seconds), months are 30 days and years 365.25 days, and zero is no duration."""

from __future__ import annotations

import re

_UNITS = ("seconds", "minutes", "hours", "days", "weeks", "months", "years")
_SECONDS = {
    "seconds": 1, "minutes": 60, "hours": 3600, "days": 86400,
    # 30 days a month; a week is days_per_month // 4 = 7 days.
    "weeks": 7 * 86400, "months": 30 * 86400, "years": 31_557_600,
}
_MAPPINGS = {
    "seconds": "seconds", "second": "seconds", "secs": "seconds", "sec": "seconds",
    "s": "seconds",
    "minutes": "minutes", "minute": "minutes", "mins": "minutes", "min": "minutes",
    "m": "minutes",
    "hours": "hours", "hour": "hours", "hrs": "hours", "hr": "hours", "h": "hours",
    "days": "days", "day": "days", "dy": "days", "d": "days",
    "weeks": "weeks", "week": "weeks", "wks": "weeks", "wk": "weeks", "w": "weeks",
    "months": "months", "mo": "months", "mos": "months", "month": "months",
    "years": "years", "year": "years", "yrs": "years", "yr": "years", "y": "years",
}
_FLOAT = re.compile(r"[0-9]*\.?[0-9]+")
_CHRONO = re.compile(r"^[0-9]+:[0-9]+(:[0-9]+){0,4}(\.[0-9]*)?$")
_CHRONO_UNITS = tuple(u for u in _UNITS if u != "weeks")


def _number(text: str) -> float:
    value = float(text)
    return value if value % 1 > 0 else float(int(value))


def _chrono(text: str) -> str | None:
    """`1:02:03` → `1 hours 02 minutes 03 seconds`; None for more parts than units."""
    squeezed = text.replace(" ", "")
    if not _CHRONO.match(squeezed):
        return text
    parts = squeezed.split(":")[::-1]
    if len(parts) > len(_CHRONO_UNITS):
        return None
    return " ".join(reversed([f"{v} {_CHRONO_UNITS[k]}" for k, v in enumerate(parts)]))


def parse_seconds(text: str) -> float | None:
    """Seconds, or None when GitLab would reject the duration (nothing recognisable, or 0)."""
    chrono = _chrono(text.lower())
    if chrono is None:
        return None
    spaced = re.sub(" +", " ", _FLOAT.sub(lambda m: f" {m.group(0)} ", chrono)).strip(" ")
    words: list[str] = []
    for word in spaced.split():
        if _FLOAT.search(word):
            words.append(word)
            continue
        unit = _MAPPINGS.get(word.strip().removeprefix(",").removesuffix(","))
        if unit:
            words.append(unit)
        # Anything else (also "and", "with", "plus") is dropped, as GitLab does.
    if words and words[0] in _MAPPINGS:
        words.insert(0, "1")  # "day" means "1 day"
    total = 0.0
    last_unit: str | None = None
    for k, word in enumerate(words):
        if not _FLOAT.search(word):
            continue
        following = words[k + 1] if k + 1 < len(words) else None
        if following in _SECONDS:
            unit = following
        elif last_unit is not None:
            index = _UNITS.index(last_unit)
            unit = _UNITS[index - 1] if index > 0 else last_unit
        else:
            unit = "seconds"
        if following in _SECONDS or last_unit is not None:
            last_unit = unit
        match = _FLOAT.search(word)
        assert match is not None
        total += _number(match.group(0)) * _SECONDS[unit]
    return total or None
