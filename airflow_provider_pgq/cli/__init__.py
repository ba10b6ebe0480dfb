"""``pgq-queue-mover [switches] config.ini``: the skytools queue_mover command line.

Same ini file, same switches, same tracking (the mark in the target's
``pgq_ext.completed_tick``), over the one move implementation in
``core.mover.QueueMover``: this package only reads the config (``config``), opens
and recycles connections (``connections``), loops, sleeps and handles signals
(``runner``, ``reload``), keeps the pidfile and daemon mode (``daemon``), runs the
one-shot admin commands (``commands``), and logs (``logs``, ``report``).

Exit codes: 0 done, 1 runtime error (database unreachable, PgqError, already
running), 2 usage or config error. Every error is one line on stderr; passwords
never appear in output or log.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import psycopg2

from airflow_provider_pgq.cli.args import admin_switches, build_parser, check_switches, parse_overrides
from airflow_provider_pgq.cli.commands import admin
from airflow_provider_pgq.cli.common import (
    EXIT_OK,
    EXIT_RUNTIME,
    EXIT_USAGE,
    Terminated,
    UsageError,
    fail,
    log,
    note_config,
)
from airflow_provider_pgq.cli.config import ConfigError, load_config, sample_ini
from airflow_provider_pgq.cli.daemon import pid_alive, signal_running
from airflow_provider_pgq.cli.logs import Logs
from airflow_provider_pgq.cli.runner import Runner
from airflow_provider_pgq.cli.secrets import scrub_command_line, warn_readable_ini
from airflow_provider_pgq.core.errors import PgqError

__all__ = ["main", "pid_alive"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    logs = Logs(level)
    base_dir = Path.cwd()
    try:
        check_switches(args)
        overrides = parse_overrides(args.set)
        if argv is None:  # the real command line (main(argv) in-process has none of its own)
            scrub_command_line(sys.argv[1:], overrides)
        if args.ini:
            print(sample_ini(args.section or "queue_mover", overrides), end="")
            return EXIT_OK
        if args.config is None:
            parser.error("the following arguments are required: config")
        config = load_config(args.config, args.section, base_dir=base_dir, overrides=overrides)
        if args.send is not None:
            return signal_running(config, args.send)
        if args.daemon and config.pidfile is None:
            raise UsageError(
                f"{config.path}: section [{config.section}], key 'pidfile': -d needs a pidfile"
            )
        logs.configure(config.logfile)
        note_config(config)
        warn_readable_ini(config, overrides)
        if admin_switches(args):
            code = admin(config, args)
            if code != EXIT_OK or not args.once:
                return code
        return Runner(config, logs, once=args.once, daemon=args.daemon, base_dir=base_dir,
                      overrides=overrides).run()
    except (ConfigError, UsageError) as exc:
        return fail(str(exc), EXIT_USAGE, logs)
    except Terminated:  # SIGTERM while cleaning up after a stop
        return EXIT_OK
    except KeyboardInterrupt:  # ^C before the loop installed its own handler
        return fail("interrupted", 130, logs)
    except PgqError as exc:
        return fail(str(exc), EXIT_RUNTIME, logs)
    except psycopg2.Error as exc:
        return fail(f"database error: {exc}", EXIT_RUNTIME, logs)
    except OSError as exc:
        return fail(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": "), EXIT_RUNTIME, logs)
    except Exception as exc:  # a bug: still one line, details at -v
        log.debug("unexpected error", exc_info=True)
        return fail(f"unexpected {type(exc).__name__}: {exc}", EXIT_RUNTIME, logs)
    finally:
        logs.close()
