"""Passwords where other local users can see them: an ini file that group or others may
read, a password given on the command line (--set), which every local user reads in
/proc/<pid>/cmdline and ps for the life of the process."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

from airflow_provider_pgq.cli.common import PROG, log
from airflow_provider_pgq.cli.config import MoverConfig
from airflow_provider_pgq.cli.config.model import SECRET_KEYS
from airflow_provider_pgq.core.connect import SECRET_PARAMETERS, connection_parameters
from airflow_provider_pgq.core.errors import PgqError


def holds_password(dsn: str) -> bool:
    """Whether the connection string sets a password (one that does not parse: assumed so)."""
    try:
        parts = connection_parameters(dsn)
    except PgqError:
        return True
    return any(parts.get(key) for key in SECRET_PARAMETERS)


def warn_readable_ini(config: MoverConfig, overrides: Mapping[str, str]) -> None:
    """libpq ignores a password file that group or others may read; an ini holding a
    password is such a file. Said (not refused: the classic tool read any ini) at start
    and after each reload."""
    keys = [key for key in sorted(SECRET_KEYS) if key not in overrides and holds_password(getattr(config, key))]
    if not keys:
        return
    try:
        mode = config.path.stat().st_mode & 0o777
    except OSError:
        return
    if mode & 0o077:
        who = " and ".join(w for w, bits in (("its group", 0o070), ("every local user", 0o007)) if mode & bits)
        log.warning(
            "%s may be read by %s (mode %03o) and holds a password (%s): chmod 600 %s, as libpq asks of"
            " a .pgpass file (which it ignores otherwise)", config.path, who, mode, ", ".join(keys), config.path,
        )


def _arguments_with_passwords(argv: Iterable[str], overrides: Mapping[str, str]) -> list[str]:
    secret = {key for key, value in overrides.items() if key in SECRET_KEYS and holds_password(value)}
    if not secret:
        return []
    found = []
    for arg in argv:
        pair = arg[len("--set="):] if arg.startswith("--set=") else arg
        key, sep, _ = pair.partition("=")
        if sep and key.strip().lower() in secret:
            found.append(arg)
    return found


def _scrub(arguments: list[str]) -> bool:
    """Overwrites, in this process's own memory, the value part of each argument in the
    command line that /proc/self/cmdline shows (arg_start..arg_end of /proc/self/stat),
    same length, with '*'. True when none of them is visible there any more."""
    try:
        fields = Path("/proc/self/stat").read_text().rpartition(")")[2].split()
        start, end = int(fields[45]), int(fields[46])  # fields 48 and 49 (arg_start, arg_end)
        with open("/proc/self/mem", "r+b", buffering=0) as mem:
            mem.seek(start)
            data = mem.read(end - start)
            parts = data.split(b"\0")
            wanted = {a.encode(sys.getfilesystemencoding(), "surrogateescape") for a in arguments}
            for i, part in enumerate(parts):
                if part in wanted:
                    head, _, value = part.partition(b"=")
                    if part.startswith(b"--set="):
                        key, _, value = value.partition(b"=")
                        head = head + b"=" + key
                    parts[i] = head + b"=" + b"*" * len(value)
            new = b"\0".join(parts)
            if new != data:
                mem.seek(start)
                mem.write(new)
        shown = Path("/proc/self/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError, IndexError):
        return False
    return not wanted.intersection(shown)


def scrub_command_line(argv: Iterable[str], overrides: Mapping[str, str]) -> None:
    """A password given with --set: overwritten in the process's command line at once,
    and said on stderr (the process was visible with it until now)."""
    arguments = _arguments_with_passwords(argv, overrides)
    if not arguments:
        return
    scrubbed = _scrub(arguments)
    keys = sorted({a.removeprefix("--set=").partition("=")[0].strip().lower() for a in arguments})
    what = ("overwritten in this process's command line now" if scrubbed
            else "and it could not be overwritten here: it stays visible while the process runs")
    message = (
        f"a password given with --set ({', '.join(keys)}) was readable by every local user in"
        f" /proc/<pid>/cmdline and ps since the process started; {what}. Put it in the ini file"
        " (mode 600), a .pgpass file or PGPASSWORD instead"
    )
    print(f"{PROG}: warning: {message}", file=sys.stderr)
    log.warning("%s", message)
