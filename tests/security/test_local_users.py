"""Local users against the command line (issue 21, item 6), run for real: the daemon's
pidfile and logfile in a directory others may write, an ini file others may read, a
password on the command line."""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import Server, create_login, produce, register, simple_events, tick
from tests.support.cluster import wait_until
from tests.test_cli import WAIT, base_keys, daemons, one_error_line, read_pid, run_cli, write_ini

__all__ = ["daemons"]  # the fixture, imported for the daemon test


@pytest.fixture
def shared_dir(tmp_path: Path) -> Path:
    """A world-writable sticky directory, as /tmp is."""
    d = tmp_path / "shared"
    d.mkdir()
    d.chmod(0o1777)
    return d


@pytest.fixture
def bystander() -> Iterator[subprocess.Popen[bytes]]:
    """An unrelated process of this user (the test's: root where the tests run as root)."""
    proc = subprocess.Popen(["sleep", "300"])
    yield proc
    proc.kill()
    proc.wait()


@pytest.mark.parametrize("switch", ["-s", "-k", "-r"])
def test_a_pidfile_naming_another_process_is_not_signalled(
    switch: str, source: Server, target: Server, shared_dir: Path, bystander: subprocess.Popen[bytes]
) -> None:
    """Somebody wrote the pid of an unrelated process into the pidfile (a world-writable
    directory): -k killed it. The switches signal only a process that holds this very
    pidfile open, as a mover of this config does."""
    pidfile = shared_dir / "m.pid"
    pidfile.write_text(f"{bystander.pid}\n")
    ini = write_ini(shared_dir.parent / "m.ini", base_keys(source, target, "victim", pidfile=pidfile))
    proc = run_cli(switch, ini)
    assert bystander.poll() is None, f"{switch} signalled pid {bystander.pid}, which is no mover"
    assert proc.returncode == 1, proc.stderr
    line = one_error_line(proc)
    assert str(bystander.pid) in line and "not a mover of this config" in line and str(pidfile) in line, line


def test_the_switches_still_reach_the_daemon_of_this_config(
    source: Server, target: Server, tmp_path: Path, daemons: list[Path]
) -> None:
    register(source, "src_q", "held")
    pidfile = tmp_path / "d.pid"
    daemons.append(pidfile)
    ini = write_ini(tmp_path / "d.ini", base_keys(source, target, "held", pidfile=pidfile,
                                                  logfile=tmp_path / "d.log", loop_delay=0.2))
    assert run_cli("-d", ini).returncode == 0
    pid = read_pid(pidfile)
    assert run_cli("-r", ini).returncode == 0
    assert wait_until(lambda: "config reloaded" in (tmp_path / "d.log").read_text(), WAIT)
    assert run_cli("-k", ini).returncode == 0
    assert wait_until(lambda: not Path(f"/proc/{pid}").exists() or
                      Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z", WAIT)


def test_the_logfile_is_never_a_symlink(source: Server, target: Server, shared_dir: Path, tmp_path: Path) -> None:
    """A symlink planted where the logfile goes: the mover appended its log to whatever
    it pointed at (here: a file of the user's own, as /etc/... would be root's)."""
    victim = tmp_path / "precious.txt"
    victim.write_text("precious\n")
    logfile = shared_dir / "m.log"
    logfile.symlink_to(victim)
    register(source, "src_q", "linked")
    ini = write_ini(tmp_path / "l.ini", base_keys(source, target, "linked", logfile=logfile))
    proc = run_cli("--once", ini)
    assert victim.read_text() == "precious\n"
    assert proc.returncode != 0, proc.stderr
    line = one_error_line(proc)
    assert str(logfile) in line and "symbolic link" in line, line


def test_an_ini_with_a_password_readable_by_others_is_warned_about(
    source: Server, target: Server, tmp_path: Path
) -> None:
    """libpq ignores a .pgpass that group or others may read; an ini holding a password
    with such rights ran without a word."""
    login = create_login(source.cluster, "ini", superuser=True)
    register(source, "src_q", "readable")
    ini = write_ini(tmp_path / "p.ini", base_keys(source, target, "readable", dst_db=login.dsn(target)))
    for mode, warned in ((0o644, True), (0o640, True), (0o600, False)):
        ini.chmod(mode)
        proc = run_cli("--once", ini)
        assert proc.returncode == 0, proc.stderr
        assert login.password not in proc.stderr
        said = "may be read by" in proc.stderr and "chmod 600" in proc.stderr and str(ini) in proc.stderr
        assert said == warned, (oct(mode), proc.stderr)


def test_a_password_given_with_set_is_scrubbed_from_the_command_line(
    source: Server, target: Server, tmp_path: Path, daemons: list[Path]
) -> None:
    """--set dst_db='... password=...' stayed readable by every local user in
    /proc/<pid>/cmdline for the daemon's whole life. The mover says so, and overwrites
    it in its own command line as soon as it starts."""
    login = create_login(source.cluster, "cmdline", superuser=True)
    register(source, "src_q", "argv")
    produce(source, "src_q", simple_events(3))
    tick(source, "src_q")
    pidfile = tmp_path / "a.pid"
    daemons.append(pidfile)
    ini = write_ini(tmp_path / "a.ini", base_keys(source, target, "argv", pidfile=pidfile,
                                                  logfile=tmp_path / "a.log", loop_delay=0.2))
    ini.chmod(0o600)
    proc = run_cli("-d", ini, "--set", f"dst_db={login.dsn(target)}")
    assert proc.returncode == 0, proc.stderr
    pid = read_pid(pidfile)
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    assert login.password.encode() not in cmdline, cmdline
    assert b"--set" in cmdline  # the rest of the command line is left as it was
    assert "/proc" in proc.stderr and "--set" in proc.stderr and login.password not in proc.stderr
    assert run_cli("-k", ini).returncode == 0
    assert wait_until(lambda: not pidfile.exists(), WAIT)


def test_a_pidfile_that_is_a_symlink_is_not_followed(
    source: Server, target: Server, shared_dir: Path, tmp_path: Path, bystander: subprocess.Popen[bytes]
) -> None:
    """A pidfile planted as a symlink to a file that holds another process's pid."""
    other = tmp_path / "other.pid"
    other.write_text(f"{bystander.pid}\n")
    pidfile = shared_dir / "s.pid"
    pidfile.symlink_to(other)
    ini = write_ini(tmp_path / "s.ini", base_keys(source, target, "sym", pidfile=pidfile))
    proc = run_cli("-k", ini)
    assert bystander.poll() is None
    line = one_error_line(proc)
    assert proc.returncode == 1 and "symbolic link" in line and "nothing signalled" in line, line
    assert stat.S_ISLNK(os.lstat(pidfile).st_mode)  # left as it is
