"""The launcher: what Ray runs instead of `python default_worker.py ...` to start a worker
warm (runtime_env `py_executable`, from `warmstart.py_executable`). It asks its node's
zygote (`zygote.py`) to fork the worker, handing over this process's stdio, then stands
in for it: it relays signals to the child and exits with its code. Anything unexpected
before the child has its go starts the worker here the ordinary way; why warm starts
pay, and what they trust, is in `warmstart`'s docstring.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import time

from serve_app.ray_shell.warmstart import (
    _GO,
    _HEADER,
    PRELOAD,
    REPLY_TIMEOUT_S,
    REQUEST_TIMEOUT_S,
    _alive,
    _peer,
    start_zygote,
    zygote_address,
)


def launch(preload: str, argv: list[str], new_zygote: bool = True,
           timeout_s: float = REPLY_TIMEOUT_S) -> None:
    """Have the zygote fork this worker; on anything unexpected run it here instead."""
    parent = os.getppid()  # the raylet
    address = zygote_address(preload, parent)
    deadline = time.monotonic() + timeout_s
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(timeout_s)
    try:
        conn.connect(address)
    except OSError as exc:
        conn.close()
        if new_zygote and isinstance(exc, ConnectionRefusedError):  # nobody has the name yet
            start_zygote(address, parent, preload)
        _run_here(argv)
    reply = bytearray()
    try:
        child = _ask_for_fork(conn, reply, argv, deadline)
    except Exception as exc:  # noqa: BLE001 - until the child has its go, a cold start is safe
        reason = f"no answer within {timeout_s:g} s" if isinstance(exc, TimeoutError) else str(exc)
        print(f"warm start: {reason}; starting this worker the ordinary way", file=sys.stderr, flush=True)
        conn.close()  # the child the zygote may have forked sees this and never runs
        _run_here(argv)
    _follow(conn, reply, child)


def _ask_for_fork(conn: socket.socket, reply: bytearray, argv: list[str], deadline: float) -> int:
    """Send this worker's request to the zygote; the pid of the child it forked, now told to run."""
    _pid, uid, _gid = _peer(conn)
    if uid != os.getuid():
        raise PermissionError(f"the zygote's socket is held by uid {uid}, not this worker's uid {os.getuid()}")
    request = json.dumps({"argv": argv, "env": dict(os.environ), "cwd": os.getcwd()}).encode()
    conn.settimeout(_remaining(deadline))
    socket.send_fds(conn, [_HEADER.pack(len(request))], [0, 1, 2])  # the stdio travels with the header
    conn.settimeout(_remaining(deadline))
    conn.sendall(request)
    line = _read_line(conn, reply, deadline)
    if not line:
        raise ConnectionError("the zygote closed the connection before forking")
    child = json.loads(line)["pid"]
    # Past this byte the child runs: no going back to a cold start.
    conn.settimeout(_remaining(deadline))
    conn.sendall(_GO)
    return child


def _follow(conn: socket.socket, reply: bytearray, child: int) -> None:
    """Relay signals to the forked worker until it ends, then leave with its exit code."""
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda s, _f: _kill(child, s))
    ended = None  # when the worker was first seen gone without the zygote's report
    while True:
        try:
            line = _read_line(conn, reply, time.monotonic() + 1.0)
            break
        except TimeoutError:
            if _alive(child):
                continue
            ended = ended or time.monotonic()
            if time.monotonic() - ended > REQUEST_TIMEOUT_S:  # a stuck zygote never reports
                sys.exit(1)
        except OSError:
            line = b""
            break
    if line:
        code = json.loads(line)["exit"]
        sys.exit(code if code >= 0 else 128 - code)  # killed by signal N: 128 + N, as a shell says
    while _alive(child):  # zygote gone: follow the child until it ends
        time.sleep(0.5)
    sys.exit(1)


def _read_line(conn: socket.socket, buffer: bytearray, deadline: float) -> bytes:
    """The next line from the zygote, b"" if it hung up; TimeoutError at `deadline`."""
    while b"\n" not in buffer:
        conn.settimeout(_remaining(deadline))
        chunk = conn.recv(4096)
        if not chunk:
            return b""
        buffer += chunk
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return line


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("timed out")
    return left


def _run_here(argv: list[str]) -> None:
    """Become the worker the ordinary way (`python WORKER_SCRIPT ARGS...`)."""
    os.execv(sys.executable, [sys.executable, *argv])


def _kill(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def main(argv: list[str]) -> None:
    preload, new_zygote, timeout_s = ",".join(PRELOAD), True, REPLY_TIMEOUT_S
    while argv and argv[0].startswith("--"):  # the launcher's own options, then the worker's command
        option, argv = argv[0], argv[1:]
        if option.startswith("--preload="):
            preload = option.split("=", 1)[1]
        elif option == "--no-new-zygote":
            new_zygote = False
        elif option.startswith("--reply-timeout="):
            timeout_s = float(option.split("=", 1)[1])
        else:
            argv = [option, *argv]
            break
    if sys.platform != "linux" or not argv:
        _run_here(argv)
    launch(preload, argv, new_zygote, timeout_s)


if __name__ == "__main__":
    main(sys.argv[1:])
