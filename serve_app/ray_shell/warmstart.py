"""Fast cold starts: fork model workers from a process that has already imported torch.

Ray gives every actor a fresh Python process, and in it importing torch and
transformers' modeling code takes about 3.5 s of a 6 s cold start on a 2-core
CPU. Ray lets a deployment start its workers through another program
(runtime_env `py_executable`). The Embedder's workers start through the launcher
(`launcher.py`): it asks a per-node zygote process, which has imported Ray, torch and
transformers but never run a tensor op or touched CUDA, to fork the worker,
the way PyTorch's DataLoader forks its workers. The child becomes the Ray
worker exactly as `python default_worker.py ...` would have.

A zygote serves the workers of one Ray job only: Ray's core library reads the
job id (`RAY_JOB_ID`) from the environment once per process, when it is first
loaded, so a child forked for another job would register under the wrong job
and be refused. The zygote's address therefore names the job, and a zygote is
started with the job's id in its environment. The same holds for the settings Ray and
Serve read from the environment when imported (`RAY_SERVE_*` among them): a forked
worker has the zygote's, which are the node's as Ray started it (the service sets them
for the whole cluster); settings given per application in a runtime_env do not reach them.

A batch job's driver starts its actors' zygote before `ray.init`, when no job id
exists yet (`early_zygote`): the zygote imports torch and transformers, about
three quarters of its imports, while Ray starts, then waits. Once Ray is up the
driver binds the zygote's address itself and hands it the bound socket, the job id
and the raylet's pid (`driver_zygote`); the zygote then imports Ray and forks the
actors. A launcher that comes between finds the address bound and waits in its
backlog, as with any zygote still importing.

The address also names the code the zygote imports (`code_fingerprint`: this
package's sources, where the preloaded libraries are installed), so `serve deploy`
of new code on a long-lived cluster, or a reinstalled torch, gets a new zygote
instead of forking workers that run the old code. A zygote ends with its raylet, or
with its driver (a batch job's); one that no launcher can reach any more (its code
changed on disk, or, for the ingress's, no process of its job is left on the node)
closes its socket and ends once its last worker has (`zygote.retirement`, asked every 30 s),
instead of holding its imports (0.2-0.3 GB) until the raylet exits.

What it buys: a CPU replica's cold start 6.3-8.3 s -> 2.3-3.0 s on 2 cores
(`python bench/serve_bench.py`, README); with Serve's own imports in the zygote too, the
replica's process reaches its constructor in 0.2 s instead of 0.85 s, and with the
zygote's objects frozen (gc.freeze) the full collection Serve runs once a replica is up
takes 5 ms instead of 0.3 s.

Threat model. The zygote runs whatever its peer asks, as the zygote's user, and an
abstract-namespace socket has no file permissions: any local process can connect.
So the zygote checks every connection with SO_PEERCRED and closes (and logs) any
peer whose uid is not its own; root is another uid too. A peer of the same user
could run that code itself, so the zygote grants it nothing new and takes its
request (argv, environment, cwd) as given. The launcher checks the zygote the same
way: a process of another user that bound the name first would otherwise receive
the worker's environment and stdio; such a squatter can only make workers start cold.

Fallback. Anything unexpected before the worker runs makes the launcher run it the
ordinary way, slower but never broken: no zygote yet (it starts one for next time),
one of another user, no answer within REPLY_TIMEOUT_S (a zygote still importing
answers within it), a connection closed early, another OS. The forked child waits
for the launcher's go, sent once the launcher holds its pid, so a launcher that gave
up never has two workers. The zygote reads many requests at once, each within
REQUEST_TIMEOUT_S, so a peer that connects and says nothing holds up no one.

    python -m serve_app.ray_shell.launcher [--preload=M,..] [--no-new-zygote] [--reply-timeout=S] WORKER_SCRIPT ARGS...
    python -m serve_app.ray_shell.zygote --zygote ADDRESS PARENT_PID MODULES [--owner=PID] [--job-bound] [--check-every=S]
    python -m serve_app.ray_shell.zygote --zygote - 0 MODULES --owner=PID --channel=FD [--check-every=S]
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import importlib.util
import json
import os
import socket
import stat
import struct
import subprocess
import sys

_HEADER = struct.Struct("!I")
_CREDENTIALS = struct.Struct("3i")  # struct ucred, as SO_PEERCRED gives it: pid, uid, gid
_GO = b"g"  # launcher -> forked child: "I have your pid, run"
# The launcher's wait for the zygote to fork it: long enough for a zygote that is still
# importing (~4.5 s of one core) on a busy node, well inside Ray's 60 s for a worker to register.
REPLY_TIMEOUT_S = 20.0
# The zygote's wait for a whole request once a peer connects (and a child's for its go).
REQUEST_TIMEOUT_S = 5.0
# How often a zygote asks whether anyone can still use it (`zygote.retirement`).
RETIRE_CHECK_S = 30.0
_forked = False  # set in a worker the zygote forked
# How a Ray process finds the cluster's token (Ray 2.60's token authentication).
_AUTH_VARIABLES = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
# Imported in the zygote once, shared by every forked worker. ray.serve (0.6 s of a
# replica's start on 2 cores, most of it pandas, which Serve's utilities import) only with
# jemalloc's background thread off: pyarrow, which pandas imports, starts it otherwise, and
# forking is only safe without busy threads (`zygote._ARROW_JEMALLOC`).
PRELOAD = [
    "ray",
    "ray._private.worker",
    "torch",
    "transformers",
    "transformers.modeling_utils",
    "serve_app.model.embedder",
    "ray.serve",
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
    return f"{sys.executable} -m serve_app.ray_shell.launcher --preload={preload_for(model_type)}{flag}"


def zygote_address(preload: str, parent_pid: int, job_id: str | None = None) -> str:
    """An abstract-namespace socket name, one per Ray node session, job, interpreter, preload and code.

    `job_id` defaults to this process's `RAY_JOB_ID`, which Ray sets for its workers.
    """
    job = os.environ.get("RAY_JOB_ID", "") if job_id is None else job_id
    # The interpreter by what it is (`python` and `python3` in one venv are the same),
    # and the environment by its prefix (two venvs can share one interpreter).
    interpreter = f"{os.path.realpath(sys.executable)}|{sys.prefix}"
    code = code_fingerprint(preload)
    key = hashlib.sha1(f"{interpreter}|{preload}|{job}|{code}".encode()).hexdigest()[:12]
    return f"\0sheet-embeddings-zygote-{os.getuid()}-{parent_pid}-{key}"


def code_fingerprint(preload: str) -> str:
    """A digest of the code a zygote for `preload` imports: this package's sources, the libraries' installs.

    The package by content (about 150 kB of .py files: 0.5 ms, against 0.13 ms for
    paths, sizes and mtimes); a library by where its top-level module lies and that file's
    inode, size and mtime, which a reinstall or an upgrade rewrites (0.2 ms for Ray, torch
    and transformers; `importlib.metadata` versions would cost 38 ms). It runs in every
    launcher: 1.1-1.2 ms in a fresh interpreter on 2 cores (0.65 ms warm, `python -m timeit
    -s "from serve_app.ray_shell import warmstart; p = warmstart.preload_for('bert')"
    "warmstart.code_fingerprint(p)"`).
    """
    digest = hashlib.sha1()
    package = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))  # serve_app/
    for root, dirs, files in os.walk(package):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(root, name)
            with open(path, "rb") as source:
                digest.update(f"{path}\0".encode() + source.read() + b"\0")
    for top in sorted({module.split(".")[0] for module in preload.split(",")} - {os.path.basename(package)}):
        digest.update(f"{top}|{_install_stamp(top)}\0".encode())
    return digest.hexdigest()


def _install_stamp(module: str) -> str:
    """Where a top-level module is installed and when that file was written; found without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin:
        return "missing"
    try:
        st = os.stat(spec.origin)
    except OSError:
        return spec.origin  # a built-in or frozen module: its name is all there is
    return f"{spec.origin}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}"


def ensure_zygote(preload: str, parent_pid: int, *, job_id: str | None = None,
                  owner_pid: int | None = None, job_bound: bool = False,
                  check_every_s: float = RETIRE_CHECK_S) -> bool:
    """Start a zygote for workers of `parent_pid` (the raylet) unless one answers; True if new.

    A Ray worker calls this for its own job. A driver passes its `job_id` (it has no
    `RAY_JOB_ID`) and its own pid as `owner_pid`: that zygote ends with the driver.
    `job_bound`: the caller is a process that lives as long as its job on this node (the
    Serve ingress), so the zygote retires once no process of the job is left here.
    """
    if sys.platform != "linux":
        return False
    address = zygote_address(preload, parent_pid, job_id)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(REQUEST_TIMEOUT_S)
    try:
        probe.connect(address)
        return False
    except OSError:
        env = None
        if job_id is not None:  # what Ray would give the job's workers
            env = {"RAY_JOB_ID": job_id, "RAY_RAYLET_PID": str(parent_pid)}
        start_zygote(address, parent_pid, preload, env=env, owner_pid=owner_pid,
                     job_bound=job_bound, check_every_s=check_every_s)
        return True
    finally:
        probe.close()


def driver_zygote(model_type: str) -> bool:
    """From a Ray driver: start the zygote for this job's workers on this node; True if new.

    A zygote this driver started before Ray (`early_zygote`) gets the job, if it is still there.
    """
    import ray

    preload = preload_for(model_type)
    raylet = local_raylet_pid()
    if raylet is None:
        drop_early_zygotes()
        return False
    job_id = ray.get_runtime_context().get_job_id()
    if give_job(preload, raylet, job_id):
        return True
    return ensure_zygote(preload, raylet, job_id=job_id, owner_pid=os.getpid())


# A driver's zygotes started before Ray, by preload: the driver's end of each one's channel.
_early: dict[str, socket.socket] = {}


def early_zygote(preload: str) -> bool:
    """From a driver about to start Ray: a zygote that imports what needs no job meanwhile; True if new.

    Ray's modules wait for the job id (`driver_zygote` hands it over); the rest, torch and
    transformers, take 2.5-3 s of one core (module docstring). The zygote ends with this
    driver, and at once if the driver closes the channel without a job (`drop_early_zygotes`).
    """
    if sys.platform != "linux" or preload in _early:
        return False
    ours, theirs = socket.socketpair()
    # Its output goes to a log of its own until it knows its raylet, then to that raylet's
    # zygote log: never to the driver's stdout, a pipe it would hold open after the driver.
    command = [sys.executable, "-m", "serve_app.ray_shell.zygote", "--zygote", "-", "0", preload,
               f"--owner={os.getpid()}", f"--channel={theirs.fileno()}"]
    with theirs, _open_log("early") as out:
        subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
                         pass_fds=(theirs.fileno(),), env=_zygote_env())
    _early[preload] = ours
    return True


def drop_early_zygotes() -> None:
    """Tell the zygotes this driver started before Ray that no job comes: they exit."""
    while _early:
        _early.popitem()[1].close()


def give_job(preload: str, raylet: int, job_id: str) -> bool:
    """Hand this driver's early zygote for `preload` its job: False if it has none, or it has gone.

    The driver binds the zygote's address and sends it the bound socket, with the job id
    and the raylet's pid: the address is there before the first actor's launcher looks for
    it, however far the zygote has got with its imports.
    """
    channel = _early.pop(preload, None)
    if channel is None:
        return False
    address = zygote_address(preload, raylet, job_id)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(address)
        listener.listen(64)
        # With the token settings as `ray.init` left them in the driver's environment
        # (RAY_AUTH_MODE=token, where none was set when the zygote started): Ray's core
        # library reads them once, when the zygote loads it, and workers without the token
        # are refused. Only these: the zygote reads one short message.
        auth = {k: v for k, v in os.environ.items() if k in _AUTH_VARIABLES}
        body = json.dumps({"address": address[1:], "parent": raylet, "job": job_id, "env": auth}).encode()
        socket.send_fds(channel, [body], [listener.fileno()])
        return True
    except OSError:  # it died, or a zygote of this job has the address already
        return False
    finally:
        listener.close()  # the zygote holds its own copy
        channel.close()


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


def _peer(conn: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a connected AF_UNIX socket."""
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDENTIALS.size)
    return _CREDENTIALS.unpack(raw)


def start_zygote(address: str, parent: int, preload: str, *, env: dict[str, str] | None = None,
                 owner_pid: int | None = None, job_bound: bool = False,
                 check_every_s: float = RETIRE_CHECK_S) -> None:
    """Start the zygote in the background for the next worker; never wait for it.

    It lives while `parent` (the raylet) does, and `owner_pid` too when given, and retires
    as `zygote.retirement` says (asked every `check_every_s`).
    """
    command = [sys.executable, "-m", "serve_app.ray_shell.zygote", "--zygote", address[1:], str(parent),
               preload, f"--check-every={check_every_s:g}"]
    if owner_pid is not None:
        command.append(f"--owner={owner_pid}")
    if job_bound:
        command.append("--job-bound")
    with _open_log(parent) as out:
        subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
                         env=_zygote_env(env))


def _log_path(parent: int | str) -> str:
    """The zygotes' log of one raylet's node (of a driver's zygotes before Ray: "early"), in
    this user's own folder: in a shared /tmp, a file of a name anyone can predict may be
    another user's (every worker start would fail on it) or a link they planted."""
    folder = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"sheet-embeddings-{os.getuid()}")
    with contextlib.suppress(FileExistsError):
        os.mkdir(folder, 0o700)
    info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise PermissionError(f"{folder} is not a folder of this user's alone")
    return os.path.join(folder, f"zygote-{parent}.log")


def _open_log(parent: int | str):
    """The zygotes' log, open for appending; without one (`_log_path` refused its folder, or
    it cannot be written) warm starts go on, their output discarded."""
    try:
        return open(_log_path(parent), "ab")
    except OSError:
        return open(os.devnull, "ab")


def _zygote_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, **(extra or {}), "PYTORCH_NVML_BASED_CUDA_CHECK": "1"}


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


if __name__ == "__main__":
    # Deployments made before the launcher had a module of its own start their workers
    # through `python -m serve_app.ray_shell.warmstart ...`: still a launcher, so an
    # upgrade of the code under a running app does not leave its next replica unable to start.
    from serve_app.ray_shell.launcher import main

    main(sys.argv[1:])
