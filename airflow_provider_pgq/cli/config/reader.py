"""Typed reading of one section's values; every failure a ConfigError naming the key."""

from __future__ import annotations

import configparser
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from airflow_provider_pgq.cli.config.model import DEFAULT_LOOP_DELAY, SECRET_KEYS, ConfigError
from airflow_provider_pgq.core.errors import InvalidParameter
from airflow_provider_pgq.core.guard import Timeouts
from airflow_provider_pgq.core.mover import MAX_BATCH_INTERVAL, normalize_table_filter

T = TypeVar("T")


class Reader:
    """Typed access to one section, every failure a ConfigError naming file/section/key."""

    def __init__(self, parser: configparser.ConfigParser, path: Path, section: str) -> None:
        self.parser = parser
        self.path = path
        self.section = section

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.path}: section [{self.section}], key {key!r}: {problem}")

    def has(self, key: str) -> bool:
        return self.parser.has_option(self.section, key)

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        if not self.has(key):
            return default
        value = self.text(key)
        if value not in choices:
            raise self.error(key, f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    def text(self, key: str) -> str:
        try:
            value = self.parser.get(self.section, key).strip()
        except configparser.InterpolationMissingOptionError as exc:
            raise self.error(key, f"refers to %({exc.reference})s, which is not set") from None
        except configparser.InterpolationError:
            raise self.error(
                key, "bad %-reference (write %(name)s to use another key, %% for a literal %)"
            ) from None
        if "\x00" in value:
            # PostgreSQL text cannot hold NUL, nor can a file name: no value may have one.
            shown = "<hidden>" if key in SECRET_KEYS else repr(value)
            raise self.error(key, f"{shown} contains a NUL character (\\x00), which no value may hold")
        return value

    def required(self, key: str) -> str:
        if not self.has(key):
            raise self.error(key, "is missing (required)")
        value = self.text(key)
        if not value:
            raise self.error(key, "is empty (required)")
        return value

    def optional(self, key: str, convert: Callable[[str], T], what: str) -> T | None:
        if not self.has(key):
            return None
        raw = self.text(key)
        if raw == "":
            return None
        try:
            return convert(raw)
        except ValueError:
            shown = "<hidden>" if key in SECRET_KEYS else repr(raw)
            raise self.error(key, f"{shown} is not {what}") from None

    def seconds(
        self, key: str, default: float | None, allow_zero: bool = False, maximum: float | None = None
    ) -> float | None:
        value = self.optional(key, float, "a number of seconds")
        if value is None:
            return default
        if value != value or value in (float("inf"), float("-inf")):
            raise self.error(key, f"{value!r} is not a finite number of seconds")
        if value < 0 or (value == 0 and not allow_zero):
            raise self.error(key, f"must be {'>= 0' if allow_zero else '> 0'} seconds, got {value:g}")
        if maximum is not None and value > maximum:
            raise self.error(key, f"must be at most {maximum:g} seconds, got {value:g}")
        return value

    def rate(self, key: str) -> float | None:
        """A finite number of events a second above zero; empty or missing: None."""
        value = self.optional(key, float, "a number of events a second")
        if value is not None and (not math.isfinite(value) or value <= 0):
            raise self.error(key, f"must be a finite number of events a second above 0, got {value!r}")
        return value

    def count(self, key: str, maximum: int | None = None, zero_is_none: bool = False) -> int | None:
        value = self.optional(key, int, "a whole number")
        if value == 0 and zero_is_none:  # skytools: 0 disables
            return None
        if value is not None and value < 1:
            raise self.error(key, f"must be >= 1, got {value}")
        if value is not None and maximum is not None and value > maximum:
            raise self.error(key, f"must be at most {maximum}, got {value}")
        return value

    def loop_delay(self) -> float:
        """Any finite number: > 0 sleep, 0 drain then exit, < 0 one batch then exit."""
        value = self.optional("loop_delay", float, "a number of seconds")
        if value is None:
            return DEFAULT_LOOP_DELAY
        if not math.isfinite(value):
            raise self.error("loop_delay", f"{value!r} is not a finite number of seconds")
        return value

    def interval(self, key: str) -> float | None:
        """A PostgreSQL interval as skytools passed it to PgQ ('5 minutes', '00:05:00',
        '300'); seconds above zero, at most MAX_BATCH_INTERVAL; empty: None."""
        if not self.has(key) or not self.text(key):
            return None
        raw = self.text(key)
        try:
            value = parse_interval(raw)
        except ValueError as exc:
            raise self.error(key, f"{raw!r} is not an interval ({exc})") from None
        if value == 0:
            return None  # an empty lag or interval: no bound, as PgQ treats zero
        if value > MAX_BATCH_INTERVAL.total_seconds():
            raise self.error(key, f"must be at most {MAX_BATCH_INTERVAL.days} days, got {raw!r}")
        return value

    def table_filter(self) -> tuple[str, ...]:
        """Comma-separated table names; a name without a schema is in public (skytools'
        fq_name), compared with ev_extra1 as written, case and all."""
        if not self.has("table_filter"):
            return ()
        try:
            return normalize_table_filter([n for n in self.text("table_filter").split(",") if n.strip()])
        except InvalidParameter as exc:
            raise self.error("table_filter", str(exc)) from None

    def boolean(self, key: str) -> bool:
        if not self.has(key):
            return False
        try:
            return self.parser.getboolean(self.section, key)
        except ValueError:
            raise self.error(
                key, f"{self.text(key)!r} is not a boolean (use true/false, yes/no, on/off, 1/0)"
            ) from None
        except configparser.InterpolationError:
            raise self.error(key, "bad %-reference") from None

    def path_value(self, key: str, base_dir: Path) -> Path | None:
        """A file name: ~ expanded, relative to base_dir (the current directory, as classic)."""
        value = self.text(key) if self.has(key) else ""
        if value in ("", "-"):
            return None
        return Path(base_dir, os.path.expanduser(value))



_INTERVAL_UNITS = {
    "microsecond": 1e-6, "microseconds": 1e-6, "us": 1e-6, "usec": 1e-6, "usecs": 1e-6,
    "millisecond": 1e-3, "milliseconds": 1e-3, "ms": 1e-3, "msec": 1e-3, "msecs": 1e-3,
    "second": 1.0, "seconds": 1.0, "s": 1.0, "sec": 1.0, "secs": 1.0,
    "minute": 60.0, "minutes": 60.0, "m": 60.0, "min": 60.0, "mins": 60.0,
    "hour": 3600.0, "hours": 3600.0, "h": 3600.0, "hr": 3600.0, "hrs": 3600.0,
    "day": 86400.0, "days": 86400.0, "d": 86400.0,
    "week": 604800.0, "weeks": 604800.0, "w": 604800.0,
}
_INTERVAL_PART = re.compile(r"([+-]?\d+(?:\.\d*)?|[+-]?\.\d+)\s*([a-z]*)")
_INTERVAL_CLOCK = re.compile(r"([+-])?(\d+):(\d{1,2})(?::(\d{1,2}(?:\.\d*)?))?")


def parse_interval(text: str) -> float:
    """Seconds of a PostgreSQL interval in the forms skytools configs use: '300' (seconds),
    '5 minutes', '1 hour 30 mins', '1d', '@ 2 hours', '00:05:00', '1 day 02:00'.
    Months and years are refused (their length depends on the date)."""
    rest = text.strip().lower().removeprefix("@").strip()
    if not rest:
        raise ValueError("empty")
    total = 0.0
    clock = re.search(r"[+-]?\d+:\d{1,2}(?::\d{1,2}(?:\.\d*)?)?$", rest)
    if clock:
        m = _INTERVAL_CLOCK.fullmatch(clock.group(0))
        assert m is not None
        sign = -1.0 if m.group(1) == "-" else 1.0
        total += sign * (int(m.group(2)) * 3600 + int(m.group(3)) * 60 + float(m.group(4) or 0))
        rest = rest[: clock.start()].strip()
    pos = 0
    while pos < len(rest):
        m = _INTERVAL_PART.match(rest, pos)
        if m is None:
            raise ValueError(f"cannot read {rest[pos:]!r}; write e.g. '5 minutes' or '00:05:00'")
        number, unit = float(m.group(1)), m.group(2)
        if unit in ("mon", "mons", "month", "months", "y", "year", "years"):
            raise ValueError("months and years have no fixed length: give days")
        if unit == "" and not clock and m.end() >= len(rest.rstrip()) and pos == 0:
            unit = "s"  # a bare number: seconds, as PostgreSQL reads '300'::interval
        if unit not in _INTERVAL_UNITS:
            raise ValueError(f"unknown unit {unit or '(none)'!r}")
        total += number * _INTERVAL_UNITS[unit]
        pos = m.end()
        while pos < len(rest) and rest[pos] in " ,\t":
            pos += 1
    if not math.isfinite(total) or total < 0:
        raise ValueError("must be a finite interval of zero or more")
    return total


def alias(r: Reader, ours: str, our_value: T | None, classic: str, classic_value: T | None) -> T | None:
    """Our key and skytools' name for the same setting: either one, not two values."""
    if our_value is not None and classic_value is not None and our_value != classic_value:
        raise r.error(classic, f"sets what {ours!r} sets, to another value: keep one of the two")
    return our_value if our_value is not None else classic_value


def timeout_keys(r: Reader) -> dict[str, float]:
    """connect_timeout and network_timeout (> 0), statement_timeout and lock_timeout
    (0: no bound), with guard.Timeouts' defaults."""
    out: dict[str, float] = {}
    for key in ("connect_timeout", "network_timeout", "statement_timeout", "lock_timeout"):
        value = r.seconds(key, getattr(Timeouts, key), allow_zero=key in ("statement_timeout", "lock_timeout"))
        assert value is not None
        out[key] = value
    return out

