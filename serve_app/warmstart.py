"""Fast cold starts: fork model workers from a process that has already imported torch.

Ray gives every actor a fresh Python process, and in it importing torch and
transformers' modeling code takes about 3.5 s of a 6 s cold start on a 2-core
CPU. Ray lets a deployment start its workers through another program
(runtime_env `py_executable`). The Embedder's workers start through `launch`
below: it asks a per-node zygote process, which has imported Ray, torch and
transformers but never run a tensor op or touched CUDA, to fork the worker,
the way PyTorch's DataLoader forks its workers. The child becomes the Ray
worker exactly as `python default_worker.py ...` would have.

A zygote serves the workers of one Ray job only: Ray's core library reads the
job id (`RAY_JOB_ID`) from the environment once per process, when it is first
loaded, so a child forked for another job would register under the wrong job
and be refused. The zygote's address therefore names the job, and a zygote is
started with the job's id in its environment.

Anything unexpected (no zygote yet, a stale socket, another OS) makes the
launcher run the worker the ordinary way: slower, never broken.

    python -m serve_app.warmstart [--preload=M,..] [--no-new-zygote] WORKER_SCRIPT ARGS...
    python -m serve_app.warmstart --zygote ADDRESS PARENT_PID MODULES [OWNER_PID]
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import json
import os
import runpy
import select
import signal
import socket
import struct
import subprocess
import sys
import time

_HEADER = struct.Struct("!I")
_forked = False  # set in a worker the zygote forked
# Imported in the zygote once, shared by every forked worker. Not ray.serve:
# importing it starts a jemalloc thread, and forking is only safe without busy threads.
PRELOAD = [
    "ray",
    "ray._private.worker",
    "torch",
    "transformers",
    "transformers.modeling_utils",
    "serve_app.embedder",
]


def preload_for(model_type: str) -> str:
    """The modules a zygote imports for a model of this type."""
    return ",".join([*PRELOAD, f"transformers.models.{model_type}.modeling_{model_type}"])


def warm_start_enabled(setting: str, gpu_fraction: float) -> bool:
    """auto: on for CPU workers on Linux; GPU workers stay off until verified on a GPU."""
    if setting == "auto":
        return sys.platform == "linux" and gpu_fraction == 0
    return setting == "on"


def py_executable(model_type: str, *, new_zygote: bool = True) -> str:
    """The runtime_env `py_executable` that starts workers through the launcher.

    With `new_zygote=False` a launcher that finds no zygote starts its worker cold and
    leaves none behind: for short-lived jobs, whose zygote lives only as long as the job.
    """
    flag = "" if new_zygote else " --no-new-zygote"
    return f"{sys.executable} -m serve_app.warmstart --preload={preload_for(model_type)}{flag}"


def zygote_address(preload: str, parent_pid: int, job_id: str | None = None) -> str:
    """An abstract-namespace socket name, one per Ray node session, job, interpreter and preload.

    `job_id` defaults to this process's `RAY_JOB_ID`, which Ray sets for its workers.
    """
    job = os.environ.get("RAY_JOB_ID", "") if job_id is None else job_id
    # The interpreter by what it is (`python` and `python3` in one venv are the same),
    # and the environment by its prefix (two venvs can share one interpreter).
    interpreter = f"{os.path.realpath(sys.executable)}|{sys.prefix}"
    key = hashlib.sha1(f"{interpreter}|{preload}|{job}".encode()).hexdigest()[:12]
    return f"\0sheet-embeddings-zygote-{os.getuid()}-{parent_pid}-{key}"


def ensure_zygote(preload: str, parent_pid: int, *, job_id: str | None = None,
                  owner_pid: int | None = None) -> bool:
    """Start a zygote for workers of `parent_pid` (the raylet) unless one answers; True if new.

    A Ray worker calls this for its own job. A driver passes its `job_id` (it has no
    `RAY_JOB_ID`) and its own pid as `owner_pid`: that zygote ends with the driver.
    """
    if sys.platform != "linux":
        return False
    address = zygote_address(preload, parent_pid, job_id)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(address)
        return False
    except OSError:
        env = None
        if job_id is not None:  # what Ray would give the job's workers
            env = {"RAY_JOB_ID": job_id, "RAY_RAYLET_PID": str(parent_pid)}
        start_zygote(address, parent_pid, preload, env=env, owner_pid=owner_pid)
        return True
    finally:
        probe.close()


def driver_zygote(model_type: str) -> bool:
    """From a Ray driver: start the zygote for this job's workers on this node; True if new."""
    import ray

    raylet = local_raylet_pid()
    if raylet is None:
        return False
    job_id = ray.get_runtime_context().get_job_id()
    return ensure_zygote(preload_for(model_type), raylet, job_id=job_id, owner_pid=os.getpid())


def local_raylet_pid() -> int | None:
    """The raylet of the node this Ray driver runs on: the parent of its workers."""
    import ray

    return _raylet_pid(ray._private.worker.global_worker.node.raylet_socket_name)


@functools.cache
def _raylet_pid(socket_name: str) -> int | None:
    """The process serving this raylet socket, found once (a job embeds more than once)."""
    wanted = f"--raylet_socket_name={socket_name}"
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                args = cmdline.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if wanted in args:
            return int(entry)
    return None


def forked_from_zygote() -> bool:
    """Whether this process is a worker the zygote forked (its imports were already done)."""
    return _forked


# --- the launcher: what Ray runs instead of `python default_worker.py ...` -----------


def launch(preload: str, argv: list[str], new_zygote: bool = True) -> None:
    """Have the zygote fork this worker; fall back to running it here."""
    parent = os.getppid()  # the raylet
    address = zygote_address(preload, parent)
    try:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(address)
    except OSError:
        if new_zygote:
            start_zygote(address, parent, preload)
        os.execv(sys.executable, [sys.executable, *argv])
    request = json.dumps({"argv": argv, "env": dict(os.environ), "cwd": os.getcwd()}).encode()
    socket.send_fds(conn, [_HEADER.pack(len(request)) + request], [0, 1, 2])
    reply = conn.makefile("r")
    first = reply.readline()
    if not first:  # the zygote went away before forking: run here
        os.execv(sys.executable, [sys.executable, *argv])
    child = json.loads(first)["pid"]
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda s, _f: _kill(child, s))
    last = reply.readline()
    if last:
        code = json.loads(last)["exit"]
        sys.exit(code if code >= 0 else 128 - code)  # killed by signal N: 128 + N, as a shell says
    while _alive(child):  # zygote gone: follow the child until it ends
        time.sleep(0.5)
    sys.exit(1)


def start_zygote(address: str, parent: int, preload: str, *, env: dict[str, str] | None = None,
                 owner_pid: int | None = None) -> None:
    """Start the zygote in the background for the next worker; never wait for it.

    It lives while `parent` (the raylet) does, and `owner_pid` too when given.
    """
    log = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"sheet-embeddings-zygote-{parent}.log")
    command = [sys.executable, "-m", "serve_app.warmstart", "--zygote", address[1:], str(parent), preload]
    if owner_pid is not None:
        command.append(str(owner_pid))
    with open(log, "ab") as out:
        subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
            env={**os.environ, **(env or {}), "PYTORCH_NVML_BASED_CUDA_CHECK": "1"},
        )


# --- the zygote -----------------------------------------------------------------------


def serve_zygote(address: str, parent: int, preload: str, owner: int | None = None) -> None:
    """Import the heavy modules once, then fork a worker for every launcher that asks."""
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
    for module in preload.split(","):
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - a partial preload still saves time
            print(f"zygote: cannot preload {module}: {exc!r}", flush=True)
    print(f"zygote {os.getpid()} ready in {time.perf_counter() - started:.2f} s", flush=True)
    children: dict[int, socket.socket] = {}
    while _alive(parent) and (owner is None or _alive(owner)):
        ready, _, _ = select.select([listener], [], [], 0.5)
        _reap(children)
        if not ready:
            continue
        conn, _ = listener.accept()
        try:
            request, fds = _receive(conn)
        except (OSError, ValueError):
            conn.close()
            continue
        pid = os.fork()
        if pid == 0:
            listener.close()
            conn.close()
            _become_worker(request, fds)
        for fd in fds:
            os.close(fd)
        children[pid] = conn
        conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")


def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
    data, fds, _flags, _addr = socket.recv_fds(conn, 1 << 16, 3)
    if len(fds) != 3 or len(data) < _HEADER.size:
        raise ValueError("malformed launch request")
    (size,) = _HEADER.unpack_from(data)
    body = data[_HEADER.size :]
    while len(body) < size:
        more = conn.recv(size - len(body))
        if not more:
            raise ValueError("launch request cut short")
        body += more
    return json.loads(body), fds


def _become_worker(request: dict, fds: list[int]) -> None:
    """In the forked child: take the launcher's stdio, environment and arguments, run the worker."""
    code = 1
    try:
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
            importlib.import_module("serve_app.warmstart")._forked = True
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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A dead process nobody has reaped yet (a zombie) still answers signal 0; in a
    # container whose init does not reap, a dead raylet would keep its zygote forever.
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def _kill(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def main(argv: list[str]) -> None:
    if argv and argv[0] == "--zygote":
        serve_zygote(argv[1], int(argv[2]), argv[3], int(argv[4]) if len(argv) > 4 else None)
        return
    preload, new_zygote = ",".join(PRELOAD), True
    while argv and argv[0].startswith("--"):  # the launcher's own options, then the worker's command
        option, argv = argv[0], argv[1:]
        if option.startswith("--preload="):
            preload = option.split("=", 1)[1]
        elif option == "--no-new-zygote":
            new_zygote = False
        else:
            argv = [option, *argv]
            break
    if sys.platform != "linux" or not argv:
        os.execv(sys.executable, [sys.executable, *argv])
    launch(preload, argv, new_zygote)


if __name__ == "__main__":
    main(sys.argv[1:])
