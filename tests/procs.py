"""Cleanup for tests that start processes: stop them the way a user would, then SIGKILL whatever
of theirs is left -- so a failing, hanging or interrupted test never leaves a cluster running.

    proc = subprocess.Popen([...], start_new_session=True, preexec_fn=default_sigint)
    try:
        ...                                              # the test
    finally:
        stopped = stop_process(proc, signal.SIGINT, timeout_s=120)  # Ctrl-C; SIGKILL what is left
    assert stopped.returncode == 130 and not stopped.killed

"Theirs" is found by session, as runtime/cluster/ray_process.py finds a Ray node's processes
(`session_pids`): `edgetune coordinator`, `edgetune node` and each `ray start` run in sessions
of their own, so the sessions of a process and of its descendants hold everything it started.
The test process's own session is never swept: its members are tracked one by one.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import psutil

from edgetune.runtime.cluster.ray_process import session_pids


def default_sigint() -> None:
    """Popen's preexec_fn: SIGINT back to its default disposition in the child.

    A process started in the background by a non-interactive shell (`bash scripts/test.sh &`)
    ignores SIGINT, its children inherit that, and a shell cannot trap a signal that was ignored
    on entry -- so a test's Ctrl-C would not reach the script it runs.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@dataclass
class ProcessTree:
    """Processes noted at one moment, to be killed later: whole sessions, and the single
    processes (`members`) that run in the test process's own session."""

    sessions: set[int]
    members: list[psutil.Process]

    @classmethod
    def of(cls, *pids: int, sessions: Iterable[int] = (), keep: Iterable[int] = ()) -> ProcessTree:
        """`pids` and all their descendants, as they are now, plus the whole of `sessions`.

        Never the test process's own session, nor those in `keep` (e.g. the sessions of a
        cluster a session-scoped fixture runs). Each pid must be an unreaped child or
        descendant of this process, so it cannot have been reused.
        """
        own = os.getsid(0)
        keep = {own, *keep}
        found = set(sessions) - keep
        members: list[psutil.Process] = []
        for pid in pids:
            try:
                root = psutil.Process(pid)
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                continue
            for proc in procs:
                try:
                    sid = os.getsid(proc.pid)
                except OSError:  # exited and reaped meanwhile
                    continue
                if sid == own:
                    if proc.pid not in {m.pid for m in members}:
                        members.append(proc)
                elif sid not in keep:
                    found.add(sid)
        return cls(found, members)

    def alive(self) -> list[int]:
        """pids of the live (non-zombie) processes of the tree."""
        out = [pid for sid in sorted(self.sessions) for pid in session_pids(sid)]
        for proc in self.members:
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    out.append(proc.pid)
            except psutil.Error:
                pass
        return out

    def kill(self, settle_s: float = 0.0) -> list[int]:
        """Give the tree `settle_s` to exit by itself, then SIGKILL every process of it still
        running (until none is left, or 10 s); returns the pids that had to be killed."""
        deadline = time.monotonic() + settle_s
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        killed: list[int] = []
        deadline = time.monotonic() + 10
        while (left := self.alive()) and time.monotonic() < deadline:  # again: one may fork meanwhile
            member_pids = {p.pid: p for p in self.members}
            for pid in left:
                try:
                    if pid in member_pids:
                        member_pids[pid].kill()  # psutil checks it is still the same process
                    else:
                        os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, psutil.NoSuchProcess):
                    continue
                if pid not in killed:
                    killed.append(pid)
            time.sleep(0.1)
        return killed


@dataclass
class Stopped:
    returncode: int | None
    stdout: Any  # what proc.communicate() returned; None where the pipe was not collected
    stderr: Any
    killed: list[int]  # pids still running after the graceful stop, SIGKILLed


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, *, timeout_s: float = 60.0,
                 settle_s: float = 10.0, sessions: Iterable[int] = ()) -> Stopped:
    """Stop `proc` gracefully, then SIGKILL what is left of it and of everything it started.

    The sessions of proc and of its descendants are noted first (with `sessions`: more, noted
    earlier). `sig` goes to proc's process group where proc leads one (start_new_session=True:
    as a terminal's Ctrl-C reaches a whole job), else to proc; proc then has `timeout_s` to exit
    (its output is collected meanwhile) and the rest of its tree `settle_s` more. Whatever still
    runs after that is SIGKILLed -- also when proc did not exit in time, or the wait was
    interrupted. Returns proc's exit code, its output and the pids that had to be killed.
    """
    # An unreaped child's pid (a zombie's too) is still reserved: safe to look up and to sweep by.
    tree = ProcessTree.of(*([proc.pid] if proc.returncode is None else []), sessions=sessions)
    out = err = None
    exited = False
    try:
        if proc.poll() is None:
            try:
                if os.getpgid(proc.pid) == proc.pid:
                    os.killpg(proc.pid, sig)
                else:
                    proc.send_signal(sig)
            except ProcessLookupError:
                pass
        out, err = proc.communicate(timeout=timeout_s)
        exited = True
    except subprocess.TimeoutExpired:
        pass
    finally:
        killed = tree.kill(settle_s if exited else 0.0)
        if not exited:
            try:
                proc.kill()  # where it was in none of the tree's sessions
            except ProcessLookupError:
                pass
    if not exited:
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:  # a pipe held open by a process outside the tree
            proc.wait()
    return Stopped(proc.returncode, out, err, killed)
