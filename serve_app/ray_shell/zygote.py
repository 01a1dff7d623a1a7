"""The zygote: a process that has imported Ray, torch and transformers once and forks a
Ray worker for every launcher of its user that asks (`serve_zygote`; a batch job's driver
starts one before Ray, `serve_early_zygote`). Why, how a launcher finds it, what it trusts
and how it falls back: `warmstart`, which starts it and asks it.

    python -m serve_app.ray_shell.zygote --zygote ADDRESS PARENT_PID MODULES [--owner=PID] [--job-bound] [--check-every=S]
    python -m serve_app.ray_shell.zygote --zygote - 0 MODULES --owner=PID --channel=FD [--check-every=S]

(`--zygote` marks its command line: `job_has_processes` and the tests tell zygotes by it.)
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import os
import runpy
import select
import signal
import socket
import sys
import time

from serve_app.ray_shell import warmstart
from serve_app.ray_shell.warmstart import (
    _GO,
    _HEADER,
    REQUEST_TIMEOUT_S,
    RETIRE_CHECK_S,
    _alive,
    _open_log,
    _peer,
    zygote_address,
)

_MAX_REQUEST = 1 << 24


_ARROW_JEMALLOC = ("JE_ARROW_MALLOC_CONF", "background_thread:false")


def serve_zygote(address: str, parent: int, preload: str, owner: int | None = None, *,
                 job_bound: bool = False, check_every_s: float = RETIRE_CHECK_S) -> None:
    """Import the heavy modules once, then fork a worker for every launcher of this user that asks."""
    # Detach (double fork): Ray kills a worker's child processes when the worker exits,
    # and the zygote must outlive the process that started it.
    if os.fork() > 0:
        os._exit(0)
    # Bind first: a launcher that arrives during the imports waits in the backlog
    # instead of starting its worker cold beside a zygote competing for the CPU.
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind("\0" + address)
    except OSError:  # another zygote won the race
        return
    listener.listen(64)
    started = time.perf_counter()
    _preload(preload.split(","))
    _ready(started, "")
    _serve(listener, address, parent, preload, owner, job_bound, check_every_s)


def serve_early_zygote(channel_fd: int, preload: str, owner: int, check_every_s: float) -> None:
    """A driver's zygote started before Ray (`early_zygote`): import all but Ray, wait for the job, serve it."""
    if os.fork() > 0:
        os._exit(0)
    channel = socket.socket(fileno=channel_fd)
    started = time.perf_counter()
    modules = preload.split(",")
    _preload([m for m in modules if m.split(".")[0] != "ray"])
    if "ray._raylet" in sys.modules:  # its workers would carry no job id: Ray refuses them
        print(f"zygote: one of {preload} imported Ray's core library before the job was known; "
              "the driver starts a zygote once it is", flush=True)
        return
    waited = time.perf_counter()
    try:
        body, fds, _flags, _addr = socket.recv_fds(channel, 1 << 12, 1)
    except OSError:
        return
    finally:
        channel.close()
    if not body or len(fds) != 1:
        return  # the driver has no job for it, or has ended
    job = json.loads(body)
    listener = socket.socket(fileno=fds[0])
    # What Ray would give the job's workers; read once, as Ray's core library loads below.
    os.environ.update(job.get("env", {}))
    os.environ.update(RAY_JOB_ID=job["job"], RAY_RAYLET_PID=str(job["parent"]))
    sys.stdout.flush()
    sys.stderr.flush()
    with _open_log(job["parent"]) as log:
        for fd in (1, 2):
            os.dup2(log.fileno(), fd)
    idle = time.perf_counter() - waited
    _preload([m for m in modules if m.split(".")[0] == "ray"])
    _ready(started, f", {waited - started:.2f} s of it before its job was known, then {idle:.2f} s waiting for it")
    _serve(listener, job["address"], job["parent"], preload, owner, False, check_every_s)


def _preload(modules: list[str]) -> None:
    # Read once, when pyarrow's jemalloc starts (in this process: a forked worker inherits
    # it as it is, and gets its own environment back).
    name, option = _ARROW_JEMALLOC
    if option not in os.environ.get(name, ""):
        os.environ[name] = ",".join(filter(None, [os.environ.get(name), option]))
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - a partial preload still saves time
            print(f"zygote: cannot preload {module}: {exc!r}", flush=True)


def _ready(started: float, how: str) -> None:
    # Everything imported so far is collected once and frozen, as Python's gc docs advise for
    # a process that forks without exec: a forked worker's collections then skip it (Serve
    # runs a full one as a replica starts: 0.3 s with torch and Serve imported, 5 ms frozen)
    # and leave its pages shared.
    gc.collect()
    gc.freeze()
    print(f"zygote {os.getpid()} ready in {time.perf_counter() - started:.2f} s{how}", flush=True)


def _serve(listener: socket.socket, address: str, parent: int, preload: str, owner: int | None,
           job_bound: bool, check_every_s: float) -> None:
    """Fork a worker for every launcher of this user that asks, until the zygote's parent or owner ends."""
    pending: list[_Pending] = []  # connections whose request is still arriving
    children: dict[int, socket.socket] = {}
    job = os.environ.get("RAY_JOB_ID", "")  # the job its address names
    next_check = time.monotonic() + check_every_s
    while _alive(parent) and (owner is None or _alive(owner)):
        if listener is None and not children:
            return  # retired, and every worker it forked has ended
        sources = [listener, *pending] if listener is not None else pending
        ready, _, _ = select.select(sources, [], [], 0.5)
        _reap(children)
        if listener is not None and time.monotonic() >= next_check:
            next_check = time.monotonic() + check_every_s
            why = retirement("\0" + address, preload, parent, job, job_bound)
            if why:
                print(f"zygote {os.getpid()} retires: {why}; it exits once its {len(children)} "
                      "worker(s) have ended", flush=True)
                listener.close()
                listener = None
                for request in list(pending):  # their launchers start their workers cold
                    _drop(pending, request)
                continue
        for source in ready:
            if source is listener:
                with contextlib.suppress(OSError):
                    _accept(listener, pending)
                continue
            try:
                request = source.read()
            except (OSError, ValueError) as exc:  # quiet for a probe or a launcher that gave up
                if isinstance(exc, ValueError):
                    print(f"zygote: dropped a request from pid {source.pid}: {exc}", flush=True)
                _drop(pending, source)
                continue
            if request is not None:
                pending.remove(source)
                _fork_worker(source, request, listener, pending, children)
        now = time.monotonic()
        for late in [p for p in pending if p.deadline < now]:
            print(f"zygote: dropped pid {late.pid}: no whole request in {REQUEST_TIMEOUT_S:g} s", flush=True)
            _drop(pending, late)


def retirement(address: str, preload: str, parent: int, job: str, job_bound: bool) -> str:
    """Why no launcher can use the zygote at `address` any more, or "" while one still may.

    A launcher finds a zygote by an address that names the code on disk and the job
    (`zygote_address`), so once the code changes (`serve deploy` of a new release, a
    reinstalled torch) no launcher computes this one. If `job_bound` (a zygote its job's
    ingress started), also once no process of the job is left on this node (a new
    `serve run` on a long-lived cluster starts a new job). A zygote started by a launcher
    on a node without the ingress is not bound to the job: its replicas scale to zero
    there while the job lives. Before, only the raylet's exit ended a zygote, so each
    release or new Serve job left one behind, holding 0.2-0.3 GB.
    """
    try:
        if zygote_address(preload, parent, job) != address:
            return "the code it imported has changed on disk"
    except OSError as exc:  # a file removed while a release is being installed
        return f"its code cannot be read ({exc})"
    if job_bound and job and not job_has_processes(job):
        return f"no process of Ray job {job} is left on this node"
    return ""


def job_has_processes(job: str) -> bool:
    """Whether a process of this user, other than a zygote, runs in Ray job `job`.

    By `RAY_JOB_ID` in its environment, which Ray sets for every worker of the job (the
    Serve ingress, which lives as long as the application, among them). Zygotes carry it
    too, and two of one job (two models' preloads) would keep each other. A process whose
    environment this user cannot read (a setuid program; Ray's workers never are) is not
    one of them. Under a millisecond for a node's hundred-odd processes.
    """
    wanted, uid = f"RAY_JOB_ID={job}".encode(), os.getuid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}").st_uid != uid:
                continue
            with open(f"/proc/{entry}/environ", "rb") as environ:
                if wanted not in environ.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                if b"--zygote" not in cmdline.read().split(b"\0"):
                    return True
        except OSError:  # it has just ended, or is not readable
            continue
    return False


class _Pending:
    """A launcher's request as it arrives: its stdio descriptors with the header, then a JSON body."""

    def __init__(self, conn: socket.socket, pid: int) -> None:
        self.conn = conn
        self.pid = pid
        self.deadline = time.monotonic() + REQUEST_TIMEOUT_S
        self.fds: list[int] = []
        self.data = b""

    def fileno(self) -> int:
        return self.conn.fileno()

    def read(self) -> dict | None:
        """Take what has arrived: the request once whole, else None; ValueError if malformed."""
        if self.fds:
            data = self.conn.recv(1 << 16)
        else:  # the descriptors travel with the first bytes
            data, self.fds, _flags, _addr = socket.recv_fds(self.conn, 1 << 16, 3)
        if not data:
            if self.data or self.fds:
                raise ValueError("cut short")
            raise ConnectionResetError("closed before sending anything")
        if len(self.fds) != 3:
            raise ValueError("no stdio came with it")
        self.data += data
        if len(self.data) < _HEADER.size:
            return None
        (size,) = _HEADER.unpack_from(self.data)
        if size > _MAX_REQUEST:
            raise ValueError(f"{size} bytes is too large")
        if len(self.data) < _HEADER.size + size:
            return None
        return json.loads(self.data[_HEADER.size : _HEADER.size + size])

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        self.conn.close()


def _accept(listener: socket.socket, pending: list[_Pending]) -> None:
    """Take a connection if its peer runs as this user: the zygote runs what it is sent."""
    conn, _ = listener.accept()
    pid, uid, _gid = _peer(conn)
    if uid != os.getuid():
        print(f"zygote: refused pid {pid}: it runs as uid {uid}, this zygote as {os.getuid()}", flush=True)
        conn.close()
        return
    conn.setblocking(False)  # read only what select says has arrived
    pending.append(_Pending(conn, pid))


def _drop(pending: list[_Pending], request: _Pending) -> None:
    pending.remove(request)
    request.close()


def _fork_worker(request: _Pending, body: dict, listener: socket.socket,
                 pending: list[_Pending], children: dict[int, socket.socket]) -> None:
    """Fork the worker `request` asked for and tell its launcher the pid."""
    pid = os.fork()
    if pid == 0:
        # Keep nothing of the other launchers: a worker holding their connections would
        # keep them open after this zygote had gone.
        listener.close()
        for other in pending:
            other.close()
        for conn in children.values():
            conn.close()
        _become_worker(request.conn, body, request.fds)
    for fd in request.fds:
        os.close(fd)
    children[pid] = request.conn
    with contextlib.suppress(OSError):  # a launcher that left: its child sees that and exits
        request.conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")


def _become_worker(conn: socket.socket, request: dict, fds: list[int]) -> None:
    """In the forked child: once the launcher says go, take its stdio, environment and arguments, run the worker."""
    code = 1
    try:
        # A launcher that gave up waiting runs its worker itself: it closes instead of saying go.
        conn.settimeout(REQUEST_TIMEOUT_S)
        if conn.recv(len(_GO)) != _GO:
            return
        conn.close()
        os.setsid()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        with contextlib.suppress(Exception):  # a report only: never fail the worker for it
            # The zygote runs this file as __main__; the worker asks the importable module.
            warmstart._forked = True
        argv = request["argv"]
        sys.argv = list(argv)
        _reset_sys_path(argv[0], request["env"].get("PYTHONPATH", ""))
        runpy.run_path(argv[0], run_name="__main__")
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - report, then leave with a failure code
        import traceback

        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


def _reset_sys_path(script: str, pythonpath: str) -> None:
    """sys.path as `python script.py` would build it in the worker's own environment."""
    extra = [p for p in pythonpath.split(os.pathsep) if p]
    rest = [p for p in sys.path[1:] if p not in extra]
    sys.path[:] = [os.path.dirname(os.path.abspath(script)), *extra, *rest]


def _reap(children: dict[int, socket.socket]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = children.pop(pid, None)
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.sendall(json.dumps({"exit": os.waitstatus_to_exitcode(status)}).encode() + b"\n")
            conn.close()


def main(argv: list[str]) -> None:
    options = dict(arg[2:].partition("=")[::2] for arg in argv[4:])
    if "channel" in options:  # a driver's, started before Ray: no address or parent yet
        serve_early_zygote(int(options["channel"]), argv[3], int(options["owner"]),
                           float(options.get("check-every", RETIRE_CHECK_S)))
        return
    serve_zygote(argv[1], int(argv[2]), argv[3],
                 int(options["owner"]) if "owner" in options else None,
                 job_bound="job-bound" in options,
                 check_every_s=float(options.get("check-every", RETIRE_CHECK_S)))


if __name__ == "__main__":
    main(sys.argv[1:])
