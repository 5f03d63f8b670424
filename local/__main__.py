"""``python -m local serve | demo``: the whole stack on one machine (DESIGN §7).

``serve`` prints ``slidebridge local stack ready at <base URL> (AWS endpoint <moto URL>)`` once the
gateway accepts requests and runs until SIGINT/SIGTERM, then stops cleanly (exit 0): the gateway
stops, running jobs are terminated, moto stops.

``demo`` runs every front door end to end on a generated slide (``local/demo.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import select
import signal
import stat
import sys
import threading
from pathlib import Path
from types import FrameType

logger = logging.getLogger("local")


class _PipeGuard:
    """Keep a file descriptor that is a pipe from ever blocking this process (or its children).

    Whoever starts ``serve`` may read its stdout only until the ready line and then stop reading.
    A full pipe would then block every later log write, and the stack would hang. So a pipe fd is
    re-pointed at an internal pipe that a thread drains into the real one, writing only what fits
    without blocking (``select`` + writes of at most ``PIPE_BUF`` bytes) and dropping the rest.
    Children (the batch jobs) inherit the guarded fd. Terminals and files are left alone.
    """

    _WAIT_S = 0.5  # how long output may wait for a slow reader before it is dropped

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._original = os.dup(fd)
        read_end, write_end = os.pipe()
        os.dup2(write_end, fd)
        os.close(write_end)
        self._read_end = read_end
        self._dropped = 0
        self._broken = False
        self._thread = threading.Thread(target=self._pump, name=f"pipe-guard-{fd}", daemon=True)
        self._thread.start()

    @staticmethod
    def wanted(fd: int) -> bool:
        try:
            return stat.S_ISFIFO(os.fstat(fd).st_mode)
        except OSError:
            return False

    def _write_nonblocking(self, data: bytes, wait_s: float) -> int:
        """Write what the reader takes within ``wait_s``; returns the bytes written."""
        written = 0
        while written < len(data) and not self._broken:
            _, ready, _ = select.select([], [self._original], [], wait_s)
            if not ready:
                break
            # A pipe reported writable has room for PIPE_BUF bytes, and such writes never block.
            chunk = data[written : written + select.PIPE_BUF]
            try:
                written += os.write(self._original, chunk)
            except (BrokenPipeError, OSError):
                self._broken = True
        return written

    def _pump(self) -> None:
        while True:
            try:
                data = os.read(self._read_end, 65536)
            except OSError:
                return
            if not data:
                return
            if self._dropped:
                note = f"[{self._dropped} bytes of output dropped: nobody was reading]\n".encode()
                if self._write_nonblocking(note, 0) == len(note):
                    self._dropped = 0
            if self._dropped:
                self._dropped += len(data)
                continue
            self._dropped += len(data) - self._write_nonblocking(data, self._WAIT_S)

    def close(self) -> None:
        """Point the fd back at the real pipe and forward what is still buffered."""
        os.dup2(self._original, self.fd)
        # The last reference to the internal write end is gone (children have exited), so the pump
        # reads to EOF and stops.
        self._thread.join(timeout=2)
        os.close(self._original)


def _guard_output() -> list[_PipeGuard]:
    guards = []
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
        fd = stream.fileno()
        if _PipeGuard.wanted(fd):
            guards.append(_PipeGuard(fd))
    return guards


def serve(host: str, port: int, data_dir: Path | None) -> int:
    from local.stack import LocalStack  # noqa: PLC0415 - after the output guard is in place

    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        logger.info("received %s; stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    stack = LocalStack(host=host, port=port, data_dir=data_dir)
    try:
        stack.start()
    except Exception as exc:
        logger.exception("the local stack failed to start")
        print(f"slidebridge local stack failed to start: {exc}", file=sys.stderr, flush=True)
        return 1
    try:
        if not stop.is_set():  # a signal during start-up: stop without claiming to be ready
            print(stack.ready_line(), flush=True)
        # A timed wait so that the signal handler runs promptly on every platform.
        while not stop.wait(0.2):
            pass
    finally:
        stack.stop()
    print("slidebridge local stack stopped", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m local", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    serve_parser = commands.add_parser("serve", help="run the local stack until SIGINT/SIGTERM")
    serve_parser.add_argument("--host", default="127.0.0.1")
    serve_parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    serve_parser.add_argument(
        "--data-dir", type=Path, default=None, help="scratch space for jobs (default: a temporary dir)"
    )

    demo_parser = commands.add_parser("demo", help="run every front door end to end on a generated slide")
    demo_parser.add_argument("--output", type=Path, default=Path("demo-output"))
    demo_parser.add_argument("--size", type=int, default=20_000, help="slide width and height, level-0 px")
    demo_parser.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for each run")
    args = parser.parse_args(argv)

    from slidebridge.settings import Settings  # noqa: PLC0415 - only once arguments parse

    # The demo's own output is its progress and summary; the stack's log goes to a file.
    logging.basicConfig(
        level=Settings().log_level.upper() if args.command == "serve" else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.command == "serve":
        guards = _guard_output()
        try:
            return serve(args.host, args.port, args.data_dir)
        finally:
            for guard in guards:
                with contextlib.suppress(OSError):
                    sys.stdout.flush()
                    sys.stderr.flush()
                    guard.close()

    from local.demo import run_demo  # noqa: PLC0415 - the demo's imports are heavy

    return run_demo(output_dir=args.output, size=args.size, timeout_s=args.timeout)


if __name__ == "__main__":
    sys.exit(main())
