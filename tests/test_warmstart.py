"""The fork server behind fast cold starts, driven without Ray: launcher, zygote, fallback."""

import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
import traceback
from pathlib import Path

import pytest
from conftest import cmdline, early_zygotes, wait_for, zygotes_of

from serve_app.ray_shell import warmstart
from serve_app.ray_shell.zygote import job_has_processes, retirement

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="warm start is Linux-only")

PRELOAD = "json,decimal"  # light stand-ins for torch and transformers

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    print(json.dumps({
        "argv": sys.argv[1:], "cwd": os.getcwd(), "pid": os.getpid(), "ppid": os.getppid(),
        "marker": os.environ.get("WARM_MARKER"), "path0": sys.path[0],
        "extra_on_path": os.environ.get("EXTRA_DIR") in sys.path,
        "preloaded": "decimal" in sys.modules,
        "frozen": __import__("gc").get_freeze_count(),
        "forked": __import__("serve_app.ray_shell.warmstart").ray_shell.warmstart.forked_from_zygote(),
    }), flush=True)
    if "--sleep" in sys.argv:
        import time; time.sleep(60)
    sys.exit(int(sys.argv[-1]) if sys.argv[-1].isdigit() else 0)
    """
)


@pytest.fixture()
def script(tmp_path):
    path = tmp_path / "worker.py"
    path.write_text(SCRIPT)
    return path


def launch(script, *args, env_extra=None, preload=PRELOAD, cwd=None, new_zygote=True,
           reply_timeout=None, **popen):
    env = {**os.environ, "WARM_MARKER": "from-launcher", **(env_extra or {})}
    options = [f"--preload={preload}"] + ([] if new_zygote else ["--no-new-zygote"])
    options += [] if reply_timeout is None else [f"--reply-timeout={reply_timeout}"]
    return subprocess.Popen(
        [sys.executable, "-m", "serve_app.ray_shell.launcher", *options, str(script), *args],
        env=env, cwd=cwd, stdout=subprocess.PIPE, text=True, **popen,
    )


def wait_for_zygote(preload=PRELOAD, timeout_s=20, address=None):
    import socket

    address = address or warmstart.zygote_address(preload, os.getpid())
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(address)
            return
        except OSError:
            time.sleep(0.1)
        finally:
            probe.close()
    raise AssertionError("zygote never answered")


def test_worker_is_forked_by_the_zygote_with_the_launchers_world(script, tmp_path):
    assert warmstart.ensure_zygote(PRELOAD, os.getpid()) is True
    wait_for_zygote()
    assert warmstart.ensure_zygote(PRELOAD, os.getpid()) is False  # one zygote, reused
    extra = tmp_path / "extra"
    extra.mkdir()
    # The launcher must import this checkout's serve_app, as the zygote did: keep the
    # runner's PYTHONPATH behind the worker's own directory.
    pythonpath = os.pathsep.join(filter(None, [str(extra), os.environ.get("PYTHONPATH")]))
    proc = launch(script, "--flag", "7", cwd=tmp_path,
                  env_extra={"PYTHONPATH": pythonpath, "EXTRA_DIR": str(extra)})
    out, _ = proc.communicate(timeout=30)
    report = json.loads(out)
    assert proc.returncode == 7  # the worker's exit code comes back through the launcher
    assert report["argv"] == ["--flag", "7"]
    assert report["marker"] == "from-launcher"
    assert report["cwd"] == str(tmp_path)
    assert report["path0"] == str(script.parent)  # as `python worker.py` would set it
    assert report["extra_on_path"] is True  # PYTHONPATH of the worker, not of the zygote
    assert report["preloaded"] is True  # the import was paid once, in the zygote
    assert report["frozen"] > 0  # ... and its objects are outside the worker's collections
    assert report["forked"] is True
    assert "--zygote" in cmdline(report["ppid"])


def test_a_zygote_that_preloads_pyarrow_forks_without_jemallocs_background_thread(script):
    # ray.serve imports pandas, and so pyarrow, whose jemalloc starts a background thread
    # unless told not to: a fork beside a running thread can inherit a held lock.
    preload = "pyarrow,json"  # a preload no other test uses
    proc = launch(script, "0", preload=preload)  # starts that zygote; the next one is forked
    proc.communicate(timeout=60)
    wait_for_zygote(preload, timeout_s=60)
    proc = launch(script, "0", preload=preload, new_zygote=False)
    report = json.loads(proc.communicate(timeout=60)[0])
    assert report["forked"] is True
    zygote = report["ppid"]
    threads = [Path(f"/proc/{zygote}/task/{tid}/comm").read_text().strip()
               for tid in os.listdir(f"/proc/{zygote}/task")]
    assert "pyarrow" in cmdline(zygote) and "jemalloc_bg_thd" not in threads, threads


def test_terminating_the_launcher_terminates_the_worker(script):
    warmstart.ensure_zygote(PRELOAD, os.getpid())
    wait_for_zygote()
    proc = launch(script, "--sleep")
    worker = json.loads(proc.stdout.readline())["pid"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 128 + signal.SIGTERM
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{worker}") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{worker}")


def test_without_a_zygote_the_worker_still_runs(script, tmp_path):
    # A preload nobody serves yet: the launcher starts a zygote for next time, runs this one itself.
    preload = "json,fractions"
    proc = launch(script, "5", preload=preload)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 5
    report = json.loads(out)
    assert "--zygote" not in cmdline(report["ppid"])
    assert report["forked"] is False
    wait_for_zygote(preload)  # ... and the next one is warm


def test_an_app_deployed_before_the_launcher_moved_still_starts_its_workers(script):
    # Its py_executable runs `-m serve_app.ray_shell.warmstart`; once the code under it is
    # upgraded, that must still be a launcher, not a module that exits 0 and starts no worker.
    proc = subprocess.Popen([sys.executable, "-m", "serve_app.ray_shell.warmstart", f"--preload={PRELOAD}",
                             "--no-new-zygote", str(script), "6"], stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 6 and json.loads(out)["argv"] == ["6"]


def test_zygote_exits_with_its_parent():
    # A stand-in "raylet": the zygote must not outlive the process whose workers it forks.
    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        address = warmstart.zygote_address(PRELOAD, parent.pid)
        warmstart.start_zygote(address, parent.pid, PRELOAD)
        zygote = wait_for(lambda: listener_pid(address), 20, "the zygote to listen")
        assert address[1:] in cmdline(zygote)
    finally:
        parent.kill()
        parent.wait()
    wait_for(lambda: listener_pid(address) is None and not warmstart._alive(zygote), 20,
             "the zygote to exit with its parent")


def listener_pid(address):
    """The pid of the process listening at `address`, None if nothing answers there."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(address)
        raw = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return struct.unpack("3i", raw)[0]
    except OSError:
        return None
    finally:
        probe.close()


def test_a_dead_parent_left_unreaped_counts_as_gone():
    # The zygote lives while its raylet does; a raylet that died but was never reaped
    # (a zombie, in a container whose init does not reap) must not keep it forever.
    _alive = warmstart._alive
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while _alive(child.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        assert not _alive(child.pid)
        assert child.poll() is not None  # it was a zombie until now: we had not reaped it
    finally:
        child.wait()
    assert _alive(os.getpid())


def test_the_zygote_address_names_the_job(monkeypatch):
    monkeypatch.setenv("RAY_JOB_ID", "01000000")
    mine = warmstart.zygote_address(PRELOAD, 42)
    assert mine == warmstart.zygote_address(PRELOAD, 42, "01000000")  # a worker's own job
    assert mine != warmstart.zygote_address(PRELOAD, 42, "02000000")
    assert mine != warmstart.zygote_address(PRELOAD, 43, "01000000")


def test_a_zygote_forks_only_workers_of_its_job_and_ends_with_its_owner(script, tmp_path):
    """Ray's core library reads the job id once per process: a zygote started for job A
    must never fork a worker of job B (it would register under job A and be refused)."""
    parent = os.getpid()  # stands in for the raylet
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # the driver
    preload = "json,calendar"  # a preload no other test uses
    try:
        assert warmstart.ensure_zygote(preload, parent, job_id="0a000000", owner_pid=owner.pid) is True
        address = warmstart.zygote_address(preload, parent, "0a000000")
        wait_for_zygote(address=address)
        reports = launch_for_jobs(script, "3", preload, ["0a000000", "0b000000"], timeout_s=30)
        assert reports["0a000000"]["forked"] is True  # the job's own worker is forked ...
        zygote = reports["0a000000"]["ppid"]
        assert address[1:] in cmdline(zygote)
        with open(f"/proc/{zygote}/environ", "rb") as environ:
            env = dict(item.split(b"=", 1) for item in environ.read().split(b"\0") if b"=" in item)
        assert env[b"RAY_JOB_ID"] == b"0a000000"  # what Ray's core library will read in its children
        assert env[b"RAY_RAYLET_PID"] == str(parent).encode()
        assert reports["0b000000"]["forked"] is False  # ... another job's worker starts cold ...
        # A launcher starts a zygote (Popen, which returns once it has exec'd) before it runs
        # its worker, so one started for job B would be in /proc by now: no wait is needed.
        assert [z for z in zygotes_of(parent) if z != zygote and preload in cmdline(z)] == []  # ... and starts no zygote

        owner.kill()  # the driver ends: its zygote goes too
        owner.wait()
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{zygote}") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not os.path.exists(f"/proc/{zygote}")
    finally:
        owner.kill()
        owner.wait()


def early_zygote_of(owner: int, preload: str) -> int | None:
    """The zygote a driver (`owner`) started before Ray for `preload`, once it has detached."""
    return next((pid for pid, (driver, args) in early_zygotes().items() if driver == owner and preload in args),
                None)


def launch_for_jobs(script, code: str, preload: str, jobs: list[str], timeout_s: float) -> dict[str, dict]:
    """A worker launched as one of each Ray job in `jobs` would be (no new zygote), each
    exiting with `code`: their reports, by job."""
    reports = {}
    for job in jobs:
        proc = launch(script, code, preload=preload, env_extra={"RAY_JOB_ID": job}, new_zygote=False)
        out, _ = proc.communicate(timeout=timeout_s)
        assert proc.returncode == int(code)
        reports[job] = json.loads(out)
    return reports


def mapped(pid: int, library: str) -> bool:
    with open(f"/proc/{pid}/maps") as maps:
        return library in maps.read()


def test_a_zygote_started_before_ray_imports_ray_once_given_its_job_and_forks_that_jobs_workers(script):
    """A batch job's driver starts its actors' zygote before ray.init, when no job id exists:
    Ray's core library, which reads the id once as it loads, must wait for it."""
    parent = os.getpid()  # stands in for the raylet
    preload = "ray,json,decimal"  # Ray first, as in PRELOAD: it still loads last
    log = Path(warmstart._log_path(parent))
    try:
        assert warmstart.early_zygote(preload) is True
        assert warmstart.early_zygote(preload) is False  # one a preload
        zygote = wait_for(lambda: early_zygote_of(os.getpid(), preload), 20, "the early zygote")
        wait_for(lambda: mapped(zygote, "_decimal"), 30, "the zygote to import decimal")
        assert not mapped(zygote, "_raylet")  # no job yet, so no Ray

        assert warmstart.give_job(preload, parent, "0c000000") is True
        assert warmstart.give_job(preload, parent, "0c000000") is False  # handed over once
        reports = launch_for_jobs(script, "4", preload, ["0c000000", "0d000000"], timeout_s=60)
        assert reports["0c000000"]["forked"] is True  # the job's worker, forked by that zygote ...
        assert reports["0c000000"]["ppid"] == zygote
        assert reports["0d000000"]["forked"] is False  # ... and no other job's
        assert mapped(zygote, "_raylet")  # Ray came once the job was known
        wait_for(lambda: log.exists() and f"zygote {zygote} ready" in log.read_text(), 10, "the ready line")
        assert "before its job was known" in log.read_text()  # its output went to the raylet's log
    finally:
        warmstart.drop_early_zygotes()
        with contextlib.suppress(NameError, ProcessLookupError):
            os.kill(zygote, signal.SIGKILL)


def test_an_early_zygote_ends_when_its_driver_needs_none_or_ends_before_ray_and_writes_to_its_own_log(tmp_path):
    preload = "json,fractions"  # a preload no other test uses
    assert warmstart.early_zygote(preload) is True
    zygote = wait_for(lambda: early_zygote_of(os.getpid(), preload), 20, "the early zygote")
    warmstart.drop_early_zygotes()  # warm start does not apply after all (a GPU cluster, say)
    wait_for(lambda: not os.path.exists(f"/proc/{zygote}"), 20, "the dropped zygote to exit")

    # A driver that fails before Ray is up (ray.init refused, say) takes its zygote with it.
    driver = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from serve_app.ray_shell import warmstart; "
         f"warmstart.early_zygote({preload!r}); print('started', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert driver.stdout.readline().strip() == "started"
        zygote = wait_for(lambda: early_zygote_of(driver.pid, preload), 20, "the driver's early zygote")
        # Its output goes to a log, not to the driver's stdout: a pipe held open by the zygote
        # kept `python -m serve_app.batch ... | tee` waiting after the driver had failed.
        assert os.readlink(f"/proc/{zygote}/fd/1") == warmstart._log_path("early")
        driver.stdin.close()
        driver.wait(timeout=20)
        wait_for(lambda: not os.path.exists(f"/proc/{zygote}"), 20, "the zygote to exit with its driver")
    finally:
        driver.kill()
        driver.wait()


def test_the_zygotes_log_is_in_a_folder_of_this_users_alone_and_a_planted_one_is_not_used(
        monkeypatch, tmp_path):
    # A log of a predictable name in the shared /tmp could be another user's file (every
    # worker start failed on it) or a link they planted (appended to, wherever it points).
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    mine = tmp_path / f"sheet-embeddings-{os.getuid()}"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o777)
    mine.symlink_to(elsewhere)
    with warmstart._open_log("early") as log:
        log.write(b"a line")
    assert log.name == os.devnull and list(elsewhere.iterdir()) == []
    mine.unlink()
    mine.mkdir(mode=0o755)  # this user's, but others may read and enter it
    os.chmod(mine, 0o755)
    with warmstart._open_log("early") as log:
        assert log.name == os.devnull
    mine.rmdir()
    with warmstart._open_log("early") as log:
        log.write(b"a line\n")
    assert log.name == str(mine / "zygote-early.log") and (mine.stat().st_mode & 0o777) == 0o700
    assert (mine / "zygote-early.log").read_bytes() == b"a line\n"


def test_batch_actors_start_warm_only_where_it_applies(monkeypatch):
    """No zygote for GPU actors, for warm_start=off, or where the job brings its own interpreter."""
    from serve_app.batch import actors
    from serve_app.batch.actors import warm_start_executable
    from serve_app.core.config import AppArgs
    from serve_app.core.modelinfo import resolve_model

    spec = resolve_model("bundled:minilm")
    started, dropped = [], []
    monkeypatch.setattr(warmstart, "driver_zygote", lambda model_type: started.append(model_type))
    # A zygote started before Ray on the chance (`prepare_warm_start`) is told to go.
    monkeypatch.setattr(warmstart, "drop_early_zygotes", lambda: dropped.append(True))
    assert warm_start_executable(AppArgs(warm_start="off"), spec, 0.0) is None
    assert warm_start_executable(AppArgs(), spec, 0.25) is None
    runtime_env = {"pip": ["requests"], "working_dir": "."}  # the job's, as Ray reports it
    monkeypatch.setattr(actors, "_job_runtime_env", lambda: runtime_env)
    assert warm_start_executable(AppArgs(), spec, 0.0) is None
    assert started == []
    assert len(dropped) == 3

    runtime_env = {"working_dir": "."}
    executable = warm_start_executable(AppArgs(), spec, 0.0)
    assert executable.split()[:3] == [sys.executable, "-m", "serve_app.ray_shell.launcher"]
    assert "--no-new-zygote" in executable.split()  # other nodes start cold, leaving no zygote behind
    assert started == [spec.model_type]
    assert len(dropped) == 3


def test_python_and_python3_of_one_environment_share_a_zygote():
    """Ray starts workers as `python3` where the driver ran `python`: one zygote for both."""
    alias = [os.path.join(os.path.dirname(sys.executable), name) for name in ("python", "python3")]
    alias = [a for a in alias if os.path.exists(a)]
    if len(alias) < 2 or os.path.realpath(alias[0]) != os.path.realpath(alias[1]):
        pytest.skip("this environment has no python/python3 pair")
    code = "import json, sys; from serve_app.ray_shell import warmstart; print(json.dumps(warmstart.zygote_address('m', 1, 'j')))"
    seen = {json.loads(subprocess.check_output([a, "-c", code], text=True, timeout=60)) for a in alias}
    assert len(seen) == 1


# --- who may talk to a zygote, and what happens when a peer misbehaves -------------------

NOBODY = 65534
as_root = pytest.mark.skipif(os.getuid() != 0, reason="runs a peer as another user: needs root")


def fork_as_nobody(action):
    """Run `action(out_fd)` in a forked child of uid and gid nobody; its pid and a file reading `out_fd`."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            action(write)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(write)
    return pid, os.fdopen(read, "rb")


def exit_code(pid):
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@as_root
def test_the_zygote_refuses_a_peer_of_another_user(script, tmp_path):
    preload = "json,numbers"  # a preload no other test uses
    warmstart.ensure_zygote(preload, os.getpid())
    address = warmstart.zygote_address(preload, os.getpid())
    wait_for_zygote(address=address)
    marker = tmp_path / "ran"
    intruder = tmp_path / "intruder.py"
    intruder.write_text(f"open({str(marker)!r}, 'w').close()\n")

    def intrude(out):
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.settimeout(10)
        conn.connect(address)
        request = json.dumps({"argv": [str(intruder)], "env": {}, "cwd": "/"}).encode()
        try:
            socket.send_fds(conn, [struct.pack("!I", len(request)) + request], [0, 1, 2])
            reply = conn.recv(4096)
        except (BrokenPipeError, ConnectionResetError):  # closed before or while it was sent
            reply = b""
        os.write(out, b"reply:" + reply)

    pid, out = fork_as_nobody(intrude)
    with out:
        assert out.read() == b"reply:"  # closed unanswered: nothing was forked for it
    assert exit_code(pid) == 0
    log = Path(warmstart._log_path(os.getpid()))
    wait_for(lambda: f"refused pid {pid}: it runs as uid {NOBODY}" in log.read_text(), 10,
             "the zygote to log the refusal")
    proc = launch(script, "2", preload=preload, new_zygote=False)  # its own user is still served
    report, _ = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert json.loads(report)["forked"] is True
    assert not marker.exists()


@as_root
def test_a_launcher_starts_cold_rather_than_talk_to_a_zygote_of_another_user(script):
    """Another user who bound the zygote's name first gets neither the worker's environment nor its stdio."""
    preload = "json,glob"
    address = warmstart.zygote_address(preload, os.getpid())

    def squat(out):
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(address)
        listener.listen(8)
        os.write(out, b"bound\n")
        listener.settimeout(30)
        conn, _ = listener.accept()
        conn.settimeout(3)
        received = 0
        with contextlib.suppress(TimeoutError):  # an old launcher sends, then waits
            while chunk := conn.recv(1 << 16):
                received += len(chunk)
        os.write(out, str(received).encode())

    pid, out = fork_as_nobody(squat)
    with out:
        assert out.readline() == b"bound\n"
        proc = launch(script, "3", preload=preload, new_zygote=False, stderr=subprocess.PIPE)
        report, err = proc.communicate(timeout=30)
        received = out.read()
    assert exit_code(pid) == 0
    assert received == b"0"  # not one byte of the request went to the squatter
    assert proc.returncode == 3
    assert json.loads(report)["forked"] is False
    assert f"held by uid {NOBODY}" in err


def test_peers_that_send_nothing_hold_up_no_worker_and_are_dropped(script):
    preload = "json,string"
    warmstart.ensure_zygote(preload, os.getpid())
    address = warmstart.zygote_address(preload, os.getpid())
    wait_for_zygote(address=address)
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    half = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        silent.connect(address)
        half.connect(address)
        socket.send_fds(half, [b"\0\0"], [0, 1, 2])  # half a header, then nothing
        # The launcher gives up in 3 s, before the zygote would drop the stuck peers
        # (REQUEST_TIMEOUT_S): forked means the zygote served it while they were pending.
        proc = launch(script, "4", preload=preload, new_zygote=False, reply_timeout=3)
        try:
            out, _ = proc.communicate(timeout=30)
        finally:
            proc.kill()
        assert proc.returncode == 4
        assert json.loads(out)["forked"] is True
        for peer in (silent, half):  # ... and the zygote hangs up on them in time
            peer.settimeout(warmstart.REQUEST_TIMEOUT_S + 20)
            assert peer.recv(1) == b""
    finally:
        silent.close()
        half.close()


def test_a_launcher_whose_zygote_never_answers_starts_its_worker_cold(script):
    preload = "json,textwrap"
    address = warmstart.zygote_address(preload, os.getpid())
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # takes connections, never answers
    mute.bind(address)
    mute.listen(8)
    proc = launch(script, "6", preload=preload, new_zygote=False, reply_timeout=1,
                  stderr=subprocess.PIPE)
    try:
        proc.wait(timeout=30)
    finally:
        proc.kill()
        # Only now: the launcher's stdio, sent with its request, waits in the mute socket's queue.
        mute.close()
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 6
    assert json.loads(out)["forked"] is False
    assert "no answer within 1 s" in err


def test_changed_code_gets_a_new_zygote(tmp_path):
    """After `serve deploy` of new code (or a library upgrade) workers must not fork from the old imports."""
    package = tmp_path / "serve_app"
    shutil.copytree(Path(warmstart.__file__).parents[1], package, ignore=shutil.ignore_patterns("__pycache__"))
    library = tmp_path / "fakelib" / "__init__.py"
    library.parent.mkdir()
    library.write_text("VERSION = 1\n")
    code = ("from serve_app.ray_shell import warmstart; print(warmstart.__file__);"
            "print(warmstart.zygote_address('fakelib,serve_app.model.embedder', 1, 'j')[1:])")

    def address():
        out = subprocess.check_output([sys.executable, "-c", code], cwd=tmp_path, text=True, timeout=60,
                                      env={**os.environ, "PYTHONPATH": str(tmp_path)}).split()
        assert out[0] == str(package / "ray_shell" / "warmstart.py")  # the copy, not the checkout
        return out[1]

    first = address()
    assert address() == first  # the same code: the same zygote
    embedder = package / "model" / "embedder.py"
    embedder.write_text(embedder.read_text() + "\n# the next release\n")
    second = address()
    assert second != first
    library.write_text("VERSION = 22\n")  # an upgraded library
    assert address() != second


def test_a_zygote_whose_code_changed_stops_listening_and_exits_after_its_last_worker(script, tmp_path):
    """After `serve deploy` of a new release no launcher can reach the old zygote (its address
    names the old code), so it must not hold its imports until the raylet exits."""
    package = tmp_path / "serve_app"
    shutil.copytree(Path(warmstart.__file__).parents[1], package, ignore=shutil.ignore_patterns("__pycache__"))
    env = {"PYTHONPATH": str(tmp_path)}
    preload = "json,shelve"  # a preload no other test uses
    # The copy's zygote, as the copy's ingress would start it, checking every 0.2 s ...
    start = (f"from serve_app.ray_shell import warmstart; "
             f"assert warmstart.ensure_zygote({preload!r}, {os.getpid()}, check_every_s=0.2)")
    subprocess.run([sys.executable, "-c", start], cwd=tmp_path, env={**os.environ, **env}, check=True)
    started = wait_for(lambda: [z for z in zygotes_of(os.getpid()) if preload in cmdline(z)], 20,
                       "the copy's zygote")
    address = "\0" + cmdline(started[0]).split("--zygote ", 1)[1].split()[0]
    zygote = wait_for(lambda: listener_pid(address), 20, "the copy's zygote to listen")
    # ... forks the copy's launcher's worker, which keeps running.
    worker = launch(script, "--sleep", preload=preload, env_extra=env, cwd=tmp_path, new_zygote=False)
    try:
        report = json.loads(worker.stdout.readline())
        assert report["forked"] is True and report["ppid"] == zygote
        embedder = package / "model" / "embedder.py"
        embedder.write_text(embedder.read_text() + "\n# the next release\n")
        wait_for(lambda: listener_pid(address) is None, 20, "the old zygote to stop listening")
        assert warmstart._alive(zygote)  # its worker still runs, and its exit code goes back
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=20) == 128 + signal.SIGTERM
        wait_for(lambda: not warmstart._alive(zygote), 20, "the old zygote to exit")
    finally:
        worker.kill()
        worker.wait()


def test_the_ingress_zygote_retires_once_no_process_of_its_job_is_left_and_no_other_does():
    """A new `serve run` on a long-lived cluster is a new Ray job with a zygote of its own;
    the old job's zygote, which its ingress started, must go once the old job's processes
    have. A zygote a launcher started (a node without the ingress, where replicas scale to
    zero while the job lives) is not bound to the job and stays."""
    job = f"{os.getpid() & 0xFFFFFF:06x}7e"
    job_process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                                   env={**os.environ, "RAY_JOB_ID": job})
    bound, unbound = "json,mailbox", "json,mimetypes"  # preloads no other test uses
    try:
        assert warmstart.ensure_zygote(bound, os.getpid(), job_id=job, job_bound=True, check_every_s=0.2)
        assert warmstart.ensure_zygote(unbound, os.getpid(), job_id=job, check_every_s=0.2)
        addresses = {p: warmstart.zygote_address(p, os.getpid(), job) for p in (bound, unbound)}
        zygotes = {p: wait_for(lambda p=p: listener_pid(addresses[p]), 20, "a zygote to listen")
                   for p in (bound, unbound)}
        assert job_has_processes(job)
        assert retirement(addresses[bound], bound, os.getpid(), job, True) == ""
        # A property that holds for a while, not a condition to wait for: watched over five
        # checks, the zygotes of a living job stay.
        watch_until = time.monotonic() + 1.0
        while time.monotonic() < watch_until:
            assert [listener_pid(addresses[p]) for p in (bound, unbound)] == [zygotes[bound], zygotes[unbound]]
            time.sleep(0.1)
        job_process.kill()
        job_process.wait()
        assert not job_has_processes(job)  # zygotes carry the job too, and do not count
        assert (retirement(addresses[bound], bound, os.getpid(), job, True)
                == f"no process of Ray job {job} is left on this node")
        assert retirement(addresses[unbound], unbound, os.getpid(), job, False) == ""
        wait_for(lambda: not warmstart._alive(zygotes[bound]), 20, "the ingress's zygote to exit")
        watch_until = time.monotonic() + 1.0
        while time.monotonic() < watch_until:
            assert listener_pid(addresses[unbound]) == zygotes[unbound]
            time.sleep(0.1)
    finally:
        job_process.kill()
        job_process.wait()
        for p in (bound, unbound):
            pid = listener_pid(warmstart.zygote_address(p, os.getpid(), job))
            if pid:
                os.kill(pid, signal.SIGTERM)
