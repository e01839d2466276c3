"""Run control: stop requests by signal, the ``--output_dir`` run lock, dying with the launcher, DataLoader
workers that ignore stop signals and die with their rank, and a bounded wait for each batch.

How ``paddle.distributed.launch`` (Paddle 3.3) treats signals, which this module is built around: the
launcher starts every rank in its own session (``os.setsid``); on SIGTERM or SIGINT it sends SIGTERM to each
rank's process group (the rank and its DataLoader workers) up to 3 times 0.2 s apart, waits up to 30 s for
the ranks, SIGKILLs what is left, and exits with the signal's number (15 or 2). It stops copying
``workerlog.0`` to its console when the signal arrives.
"""
from __future__ import annotations

import ctypes
import datetime
import fcntl
import logging
import os
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
EXIT_DATA_STALLED = 4
_PR_SET_PDEATHSIG = 1


class RunLockError(RuntimeError):
    """``--output_dir`` belongs to a job that is still running."""


def die_with_parent(sig: int) -> None:
    """Ask Linux to send ``sig`` to this process when its parent dies (prctl PR_SET_PDEATHSIG); if the parent
    is already gone (we were re-parented), send it now. A no-op where prctl does not exist."""
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent or parent == 1:
        os.kill(os.getpid(), sig)


def data_worker_init(_worker_id: int) -> None:
    """``worker_init_fn`` of the trainer's DataLoader: a worker ignores SIGINT/SIGTERM (the rank decides when
    to stop and shuts its workers down) and is killed when its rank dies, even by SIGKILL."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked by BatchStream while it forked us
    die_with_parent(signal.SIGKILL)


class StopRequest:
    """SIGTERM/SIGINT set a flag that the loop checks once per step (every rank finishes its step, then all
    save one checkpoint together). A rank started by the launcher also gets SIGTERM when the launcher dies."""

    def __init__(self, launched: bool):
        self.signal = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        if launched:
            die_with_parent(signal.SIGTERM)

    def _handle(self, signum, _frame):
        self.signal = signum

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def describe(self) -> str:
        return signal.Signals(self.signal).name if self.signal else "none"


def launched_by_paddle() -> bool:
    """True in a rank started by ``paddle.distributed.launch`` (it sets these variables)."""
    return "PADDLE_TRAINER_ID" in os.environ and "PADDLE_LOG_DIR" in os.environ


def console(message: str) -> None:
    """Print ``message``; in a rank started by the launcher also write it to the launcher's own stdout (the
    user's console), because the launcher stops copying ``workerlog.0`` once it got a signal."""
    print(message, flush=True)
    if not launched_by_paddle():
        return
    try:
        target = f"/proc/{os.getppid()}/fd/1"
        if os.path.samestat(os.stat(target), os.fstat(sys.stdout.fileno())):
            return
        with open(target, "a", encoding="utf-8") as f:
            f.write(message + "\n")
    except (OSError, ValueError):
        pass  # no /proc, launcher gone, or its stdout closed: workerlog.0 has the message


class RunLock:
    """An exclusive ``flock`` on ``output_dir/.run.lock``, held for the life of the process (rank 0).

    The kernel drops the lock when its holder dies, however it dies (kill -9 included), so a lock file left
    behind by a dead job is taken over; a live holder's host, pid and start time are in the error."""

    NAME = ".run.lock"

    def __init__(self, output_dir: str, log=print):
        os.makedirs(output_dir, exist_ok=True)
        self.path = os.path.join(output_dir, self.NAME)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = self._read()
            os.close(self._fd)
            raise RunLockError(
                f"--output_dir {output_dir} is in use by a running job ({holder or 'holder unknown'}); "
                "wait for it, stop it, or give another --output_dir") from None
        previous = self._read()
        if previous:
            log(f"note: taking over the run lock of a job that is no longer running ({previous})")
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"host {socket.gethostname()}, pid {os.getpid()}, started {started}".encode(), 0)

    def _read(self) -> str:
        return os.pread(self._fd, 4096, 0).decode("utf-8", "replace").strip()

    def release(self) -> None:
        """Empty the file and unlock (a clean end leaves no holder to report)."""
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None


@contextmanager
def _stop_signals_blocked():
    """Processes forked inside inherit SIGINT/SIGTERM blocked, so a signal arriving before a DataLoader
    worker ran ``data_worker_init`` cannot kill it; the parent gets any pending signal on exit."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


class BatchStream:
    """``next(stream)``: the DataLoader's next batch, or, if none arrives within ``timeout`` seconds (a worker
    that hangs or cannot hand its batch over), a one-line error and exit code 4 (EXIT_DATA_STALLED) instead
    of a job that hangs forever. ``close()`` shuts the DataLoader's reader thread and workers down."""

    def __init__(self, loader, timeout: float, where: str = ""):
        with _stop_signals_blocked():
            self._batches = iter(loader)
        self.timeout, self.where = timeout, where
        self._deadline = None
        if timeout > 0:
            threading.Thread(target=self._watch, name="batch-timeout", daemon=True).start()

    def __iter__(self):
        return self

    def __next__(self):
        self._deadline = time.monotonic() + self.timeout
        try:
            return next(self._batches)
        finally:
            self._deadline = None

    def _watch(self):
        while self._batches is not None:
            deadline = self._deadline
            if deadline is not None and time.monotonic() > deadline:
                print(f"error: no batch from the DataLoader{self.where} for {self.timeout:g} s (a worker is stuck or "
                      "cannot hand its batch over: full /dev/shm, file size limit, hung storage); raise "
                      "--dataloader_timeout if a batch really takes this long", file=sys.stderr, flush=True)
                os._exit(EXIT_DATA_STALLED)  # the main thread is blocked inside Paddle; workers die with us
            time.sleep(min(1.0, self.timeout / 4))

    def close(self) -> None:
        """Stop the reader thread and the workers now, not in interpreter teardown (where Paddle's reader
        thread, still blocked on its C++ queue, can abort the process)."""
        batches, self._batches = self._batches, None
        if batches is not None:
            batches._try_shutdown_all()  # what the iterator's __del__ does; Paddle has no public close()


def exit_process(code: int) -> None:
    """End the process with ``code`` without the interpreter's teardown. By then the run has closed everything
    it writes (checkpoints, LoRA, trackers, the DataLoader); what teardown has left is Paddle freeing its C++ state
    (kernel registry, process groups) around DataLoader threads, which aborts now and then (SIGABRT after
    "saved LoRA ...", launcher exit code 250; seen in about 2 of 278 tests of one suite run with workers)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
