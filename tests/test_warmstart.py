"""The fork server behind fast cold starts, driven without Ray: launcher, zygote, fallback."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from serve_app import warmstart

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


def launch(script, *args, env_extra=None, preload=PRELOAD, cwd=None, **popen):
    env = {**os.environ, "WARM_MARKER": "from-launcher", **(env_extra or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "serve_app.warmstart", f"--preload={preload}", str(script), *args],
        env=env, cwd=cwd, stdout=subprocess.PIPE, text=True, **popen,
    )


def wait_for_zygote(preload=PRELOAD, timeout_s=20):
    import socket

    address = warmstart.zygote_address(preload, os.getpid())
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


def cmdline(pid):
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode()


def test_worker_is_forked_by_the_zygote_with_the_launchers_world(script, tmp_path):
    import json

    assert warmstart.ensure_zygote(PRELOAD, os.getpid()) is True
    wait_for_zygote()
    assert warmstart.ensure_zygote(PRELOAD, os.getpid()) is False  # one zygote, reused
    extra = tmp_path / "extra"
    extra.mkdir()
    proc = launch(script, "--flag", "7", cwd=tmp_path,
                  env_extra={"PYTHONPATH": str(extra), "EXTRA_DIR": str(extra)})
    out, _ = proc.communicate(timeout=30)
    report = json.loads(out)
    assert proc.returncode == 7  # the worker's exit code comes back through the launcher
    assert report["argv"] == ["--flag", "7"]
    assert report["marker"] == "from-launcher"
    assert report["cwd"] == str(tmp_path)
    assert report["path0"] == str(script.parent)  # as `python worker.py` would set it
    assert report["extra_on_path"] is True  # PYTHONPATH of the worker, not of the zygote
    assert report["preloaded"] is True  # the import was paid once, in the zygote
    assert "--zygote" in cmdline(report["ppid"])


def test_terminating_the_launcher_terminates_the_worker(script):
    import json

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
    import json

    # A preload nobody serves yet: the launcher starts a zygote for next time, runs this one itself.
    preload = "json,fractions"
    proc = launch(script, "5", preload=preload)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 5
    report = json.loads(out)
    assert "--zygote" not in cmdline(report["ppid"])
    wait_for_zygote(preload)  # ... and the next one is warm


def test_zygote_exits_with_its_parent(tmp_path):
    # A stand-in "raylet": the zygote must not outlive the process whose workers it forks.
    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    address = warmstart.zygote_address(PRELOAD, parent.pid)
    warmstart.start_zygote(address, parent.pid, PRELOAD)
    time.sleep(1.0)
    zygotes = subprocess.run(["pgrep", "-f", address[1:]], capture_output=True, text=True).stdout.split()
    assert len(zygotes) == 1
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{zygotes[0]}") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{zygotes[0]}")


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
