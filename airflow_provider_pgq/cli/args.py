"""The command line: argparse, --set pairs, and the switches that cannot go together."""

from __future__ import annotations

import argparse
import signal
from collections.abc import Sequence

from airflow_provider_pgq import __version__
from airflow_provider_pgq.cli.common import PROG, UsageError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Move PgQ events from a source queue to a target queue, exactly once, tracking"
            " progress in the target's pgq_ext (the skytools queue_mover protocol and config)."
        ),
        epilog="Exit codes: 0 ok, 1 runtime error, 2 usage or config error.",
    )
    p.add_argument("config", nargs="?", help="queue_mover ini file")
    p.add_argument("-V", "--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("-q", "--quiet", action="store_true", help="log only warnings and errors")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log every batch")
    p.add_argument("-d", "--daemon", action="store_true", help="go to the background (needs pidfile)")
    p.add_argument("--section", metavar="NAME", help="config section to use (default: the first)")
    p.add_argument("--ini", action="store_true", help="print a commented sample config, then exit")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                   help="override a config key (repeatable), e.g. --set loop_delay=5")
    ctl = p.add_argument_group("control a running instance (found through the pidfile)")
    ex = ctl.add_mutually_exclusive_group()
    ex.add_argument("-r", "--reload", dest="send", action="store_const", const=signal.SIGHUP,
                    help="reread the config (SIGHUP)")
    ex.add_argument("-s", "--stop", dest="send", action="store_const", const=signal.SIGINT,
                    help="stop after the current batch (SIGINT)")
    ex.add_argument("-k", "--kill", dest="send", action="store_const", const=signal.SIGTERM,
                    help="stop at once (SIGTERM); an unfinished batch is retried on the next start")
    more = p.add_argument_group("beyond the classic tool")
    more.add_argument("--once", action="store_true", help="move what is available, then exit (for cron)")
    pos = more.add_mutually_exclusive_group()
    pos.add_argument("--rewind", action="store_true",
                     help="re-register the source consumer at the target's mark, then exit")
    pos.add_argument("--reset", action="store_true",
                     help="forget the target's mark (continue from the source consumer), then exit")
    more.add_argument("--install-pgq-ext", action="store_true",
                      help="install or upgrade pgq_ext in the target (keeps marks), then exit")
    reg = more.add_mutually_exclusive_group()
    reg.add_argument("--register", action="store_true",
                     help="register the consumer on the source queue, then exit")
    reg.add_argument("--unregister", action="store_true",
                     help="unregister the consumer from the source queue and clear the target's mark, then exit")
    more.add_argument("--status", action="store_true",
                      help="print queue, consumer, lag, pending events and target mark, then exit")
    dead = more.add_mutually_exclusive_group()
    dead.add_argument("--dead-letters", action="store_true",
                      help="list the events the target refused that wait in pgq_ext.dead_letter"
                           " (invalid_events = dead_letter), then exit")
    dead.add_argument("--replay-dead-letters", action="store_true",
                      help="put the dead letters into the target queue (each once), then exit")
    more.add_argument("--from-encoding", metavar="ENCODING",
                      help="with --replay-dead-letters: read their bytes as this encoding (e.g. LATIN1)"
                           " instead of the source database's")
    return p


def admin_switches(args: argparse.Namespace) -> bool:
    return bool(args.rewind or args.reset or args.install_pgq_ext or args.register or args.unregister
                or args.status or args.dead_letters or args.replay_dead_letters)


def parse_overrides(pairs: Sequence[str]) -> dict[str, str]:
    """--set key=value, as skytools took it: split at the first '=', both sides stripped."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set {pair!r}: expected KEY=VALUE")
        if "\x00" in pair:
            raise UsageError("--set: a NUL character (\\x00) cannot be in a key or value")
        out[key.strip().lower()] = value.strip()
    return out


def check_switches(args: argparse.Namespace) -> None:
    admin = admin_switches(args)
    if args.from_encoding is not None and not args.replay_dead_letters:
        raise UsageError("--from-encoding goes with --replay-dead-letters")
    if args.unregister and args.rewind:
        raise UsageError("--unregister and --rewind contradict each other: use one")
    if args.send is not None and (args.daemon or args.once or admin):
        raise UsageError("-r/-s/-k only signal a running instance: use them alone")
    if args.daemon and (args.once or admin):
        raise UsageError("-d runs the mover in the background: it does not combine with --once"
                         " or the one-shot switches")

