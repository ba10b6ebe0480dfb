"""The pidfile, daemon mode, and -r/-s/-k: signalling the instance a pidfile names."""

from __future__ import annotations

import os
import signal
import stat
import sys
from pathlib import Path

from airflow_provider_pgq.cli.common import EXIT_OK, EXIT_RUNTIME, PROG, AlreadyRunning, UsageError, fail, log
from airflow_provider_pgq.cli.config import MoverConfig
from airflow_provider_pgq.cli.logs import Logs


def pid_alive(pid: int) -> bool:
    """Whether pid is a running process (a zombie counts as gone)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


class PidFile:
    """One instance per pidfile: refuse a live owner, replace a stale file, clean up.

    The instance keeps its pidfile open for its whole life: that open file is what
    tells a mover of this config from any other process whose pid the file may hold
    (the file's directory may be writable by others, as /tmp is): see holder_problem."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.owned = False
        self.fd: int | None = None

    def read(self) -> int | None:
        """The pid in the file; 0 for content that is no pid, or a file that is no
        regular file (a symlink is not followed); None when there is none."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        except OSError:
            return 0  # a symlink (ELOOP) or unreadable: no pid of a mover
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return 0
            text = os.read(fd, 4096).decode("ascii", "replace").strip()
        finally:
            os.close(fd)
        try:
            return int(text.split()[0])
        except (ValueError, IndexError):
            return 0  # unreadable content: treated as stale

    def holder_problem(self, pid: int) -> str | None:
        """None when pid holds this pidfile open (a mover of this config does, for its
        whole life); else why it is not known to be one. A pid another user wrote into
        the file, or a pidfile made a symlink to another one, is never signalled."""
        try:
            st = os.lstat(self.path)
        except OSError as exc:
            return f"the pidfile cannot be read ({exc.strerror})"
        if not stat.S_ISREG(st.st_mode):
            return "the pidfile is a symbolic link or no regular file"
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except PermissionError:
            return f"this user may not see which files pid {pid} holds open"
        except OSError:
            return f"pid {pid} is gone"
        for fd in fds:
            try:
                held = os.stat(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if (held.st_dev, held.st_ino) == (st.st_dev, st.st_ino):
                return None
        return f"pid {pid} ({_command_of(pid)}) does not hold the pidfile open"

    def running_pid(self) -> int | None:
        pid = self.read()
        return pid if pid and pid_alive(pid) else None

    def refuse_if_running(self) -> None:
        pid = self.running_pid()
        if pid is not None and pid != os.getpid():
            raise AlreadyRunning(
                f"already running as pid {pid} (pidfile {self.path}): stop it with -s first,"
                " or remove the pidfile if that process is not a mover"
            )

    def acquire(self) -> None:
        """Writes our pid with O_EXCL, so two starts at once cannot both win."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                self.refuse_if_running()
                stale = self.read()
                log.warning("replacing stale pidfile %s (pid %s is not running)", self.path, stale)
                try:
                    self.path.unlink()
                except FileNotFoundError:
                    pass
                continue
            os.write(fd, f"{os.getpid()}\n".encode())
            self.fd = fd  # kept open: see holder_problem
            self.owned = True
            return
        raise AlreadyRunning(f"cannot take pidfile {self.path}: another process keeps writing it")

    def release(self) -> None:
        if self.owned and self.read() == os.getpid():
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.owned = False


def _command_of(pid: int) -> str:
    """The process's command name, for the message (no arguments: they may hold secrets)."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() or "?"
    except OSError:
        return "?"


def signal_running(config: MoverConfig, sig: signal.Signals) -> int:
    """-r/-s/-k: signal the instance the pidfile names. Not running: -s and -k have
    nothing to do (exit 0, as classic), -r fails (exit 1)."""
    if config.pidfile is None:
        raise UsageError(
            f"{config.path}: section [{config.section}], key 'pidfile': not set, so no running"
            " instance can be found to signal"
        )
    pidfile = PidFile(config.pidfile)
    if config.pidfile.is_symlink():
        return fail(
            f"pidfile {config.pidfile} is a symbolic link: not followed, and nothing signalled (a mover"
            " writes its pidfile itself, never as a link). Remove it; keep pidfiles in a directory only"
            " the mover's user may write",
            EXIT_RUNTIME,
        )
    pid = pidfile.read()
    if pid is None or not pid_alive(pid):
        why = "no pidfile" if pid is None else f"stale pidfile names pid {pid}"
        code = EXIT_RUNTIME if sig == signal.SIGHUP else EXIT_OK
        print(f"{PROG}: {config.job_name} is not running ({why}: {config.pidfile})", file=sys.stderr)
        return code
    problem = pidfile.holder_problem(pid)
    if problem is not None:
        return fail(
            f"pidfile {config.pidfile} names pid {pid}, which is not a mover of this config"
            f" ({problem}): not signalled. If no mover of {config.job_name} runs, remove the"
            " pidfile; keep pidfiles in a directory only the mover's user may write",
            EXIT_RUNTIME,
        )
    os.kill(pid, sig)
    return EXIT_OK


def daemonize(config: MoverConfig, logs: Logs, pidfile: PidFile) -> int | None:
    """Double fork. Returns None in the daemon; in the starting process, the exit code
    once the daemon has taken the pidfile (0) or failed to (1, with its message): the
    pidfile is then the daemon's, and the caller must not remove it."""
    if logs.logfile is None:
        log.warning("no logfile in %s: the daemon's log is discarded", config.path)
    sys.stdout.flush()
    sys.stderr.flush()
    read_fd, write_fd = os.pipe()
    first = os.fork()
    if first > 0:
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as pipe:
            answer = pipe.read().decode("utf-8", "replace")
        os.waitpid(first, 0)
        if answer == "ok":
            return EXIT_OK
        return fail(answer or "the daemon died while starting", EXIT_RUNTIME)
    # first child: new session, then the daemon is its child
    os.close(read_fd)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    try:
        pidfile.acquire()
    except (AlreadyRunning, OSError) as exc:
        os.write(write_fd, str(exc).encode())
        os._exit(EXIT_RUNTIME)
    os.write(write_fd, b"ok")
    os.close(write_fd)
    log.info("%s: running as daemon, pid %s, pidfile %s", config.job_name, os.getpid(), pidfile.path)
    return None
