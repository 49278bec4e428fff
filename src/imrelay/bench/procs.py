"""The processes of a benchmark: the two simulators and the bot under test.

Each is a child process of ``imrelay bench`` with its output in a log file of the run's work
directory. The simulators are started on port 0 and report the port they bound on their first
line of output. The gateway is given a free port in its configuration; if another process takes
it first, the gateway exits with "address already in use" and :class:`PortTaken` tells the
caller to start over with new ports. The gateway is ready when its own pid answers ``/healthz``
(a stale process on the same port cannot fool the check) and, in Stream mode, when the DingTalk
simulator sees a connection; the baseline bot when the simulator sees its connection.

CPU seconds and peak RSS come from ``/proc/<pid>/stat`` and ``/proc/<pid>/status``
(``VmHWM``); they are read before the process is stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

__all__ = ["BenchProcessError", "PortTaken", "Proc", "ProcFigures", "python", "wait_until"]

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_URL = re.compile(r"(http://[0-9.]+:\d+)")


class BenchProcessError(RuntimeError):
    """A process of the benchmark failed to start or died; the message names it."""


class PortTaken(BenchProcessError):
    """The gateway could not bind its port (another process took it first)."""


class ProcFigures:
    """CPU seconds and memory of one process, read from ``/proc``."""

    def __init__(self) -> None:
        self.cpu_s = 0.0
        self.rss_bytes = 0
        self.peak_rss_bytes = 0

    def read(self, pid: int) -> None:
        """Refresh from ``/proc/<pid>``; keeps the last values if the process is gone."""
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return
        fields = stat.rsplit(")", 1)[1].split()
        self.cpu_s = (int(fields[11]) + int(fields[12])) / _CLK_TCK
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                self.rss_bytes = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                self.peak_rss_bytes = int(line.split()[1]) * 1024


class Proc:
    """One child process with its log file.

    Args:
        name: what it is, for messages (``gateway``, ``dingtalk simulator`` …).
        argv: the command.
        log: the file its output (stdout and stderr, or stderr only with ``announce``) goes to.
        env: its environment.
    """

    def __init__(
        self, name: str, argv: Sequence[str], log: Path, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log = log
        self.env = env if env is not None else dict(os.environ)
        self.figures = ProcFigures()
        self._proc: asyncio.subprocess.Process | None = None
        self._started = 0.0

    @property
    def pid(self) -> int:
        """The process id (after :meth:`start`)."""
        if self._proc is None:
            raise BenchProcessError(f"{self.name} was not started")
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        """The exit status, or ``None`` while it runs."""
        return None if self._proc is None else self._proc.returncode

    async def start(self, *, announce: bool = False, within_s: float = 30.0) -> str:
        """Start the process.

        Args:
            announce: the process prints its URL on its first line of output (the
                simulators); wait for it and return it.
            within_s: how long to wait for that line.

        Returns:
            The announced URL, or ``""`` without ``announce``.

        Raises:
            BenchProcessError: the process exited or announced nothing in time.
        """
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            self._proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE if announce else log,
                stderr=log,
                env=self.env,
                start_new_session=True,  # a Ctrl-C meant for the benchmark reaches it only once
            )
        self._started = time.monotonic()
        if not announce:
            return ""
        assert self._proc.stdout is not None  # nosec B101  # PIPE was requested above
        try:
            line = await asyncio.wait_for(self._proc.stdout.readline(), within_s)
        except TimeoutError:
            raise BenchProcessError(f"{self.name} did not start in {within_s:g} s") from None
        match = _URL.search(line.decode(errors="replace"))
        if match is None:
            await self.stop()
            raise BenchProcessError(f"{self.name} did not start:\n{self.log_tail()}")
        return match.group(1)

    def sample(self) -> ProcFigures:
        """Refresh and return :attr:`figures`."""
        if self._proc is not None and self._proc.returncode is None:
            self.figures.read(self._proc.pid)
        return self.figures

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the log file."""
        try:
            return self.log.read_bytes()[-chars:].decode(errors="replace")
        except OSError:
            return ""

    async def stop(self, grace_s: float = 30.0) -> int | None:
        """Read the figures one last time, then SIGTERM (SIGKILL after ``grace_s``)."""
        proc = self._proc
        if proc is None:
            return None
        if proc.returncode is None:
            self.sample()
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), grace_s)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if proc.stdout is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(proc.stdout.read(), 1.0)
        return proc.returncode


async def wait_until(
    http: aiohttp.ClientSession,
    url: str,
    procs: Sequence[Proc],
    *,
    within_s: float,
    check: Any = None,
) -> None:
    """Poll ``url`` until it answers 200 (and ``check(json)`` is true, when given).

    Raises:
        PortTaken: a gateway in ``procs`` exited because its port was taken.
        BenchProcessError: a process in ``procs`` exited, or the time ran out.
    """
    deadline = time.monotonic() + within_s
    while True:
        for proc in procs:
            if proc.returncode is not None:
                tail = proc.log_tail()
                if "address already in use" in tail.lower():
                    raise PortTaken(f"{proc.name}: port taken")
                raise BenchProcessError(
                    f"{proc.name} exited with status {proc.returncode}:\n{tail}"
                )
        try:
            async with http.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                if resp.status == 200:
                    body = await resp.json(content_type=None) if check is not None else None
                    if check is None or check(body):
                        return
        except (aiohttp.ClientError, TimeoutError, ValueError):
            pass
        if time.monotonic() > deadline:
            names = ", ".join(p.name for p in procs)
            tails = "\n".join(f"--- {p.name}:\n{p.log_tail(1500)}" for p in procs)
            raise BenchProcessError(f"not ready after {within_s:g} s ({names}):\n{tails}")
        await asyncio.sleep(0.05)


def python() -> list[str]:
    """The interpreter running the benchmark, unbuffered."""
    return [sys.executable, "-u"]
