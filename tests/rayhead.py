"""A separate local Ray head for tests that need what `ray start --head` gives: the job and REST APIs."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import BUNDLED, command_lines, free_port

REPO = Path(__file__).resolve().parents[1]
FINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class RayHead:
    """`ray start --head` in a temporary directory, with the job API on a free port."""

    def __init__(self, temp_dir: Path, serve_env: dict[str, str] | None = None,
                 gpu_nodes: int = 0) -> None:
        """`gpu_nodes`: an autoscaling cluster whose head has no GPU and which adds up to that
        many nodes of one CPU and one GPU as work asks for them, as `cluster.yaml`'s does.
        They are Ray's fake nodes: raylets on this machine, started by the autoscaler."""
        self.temp_dir = temp_dir
        self.dashboard_port = free_port()
        # Token authentication, as the README starts a local cluster (Ray 2.60's default:
        # without it Ray's daemons take any caller on every interface). Serve runs with
        # Ray's defaults (Python proxy) unless `serve_env` gives its flags: the session's
        # own settings are left out.
        base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_SERVE_")}
        self.env = {**base, **(serve_env or {}), "RAY_AUTH_MODE": "token"}
        # As the README starts one: `ray start` checks a token only where one exists (a
        # fresh machine has none until a Ray generates it).
        ray_cli = str(Path(sys.executable).with_name("ray"))
        subprocess.run([ray_cli, "get-auth-token", "--generate"], env=self.env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60, umask=0o077)
        port = free_port()
        command = [
            ray_cli, "start", "--head", "--block",
            f"--port={port}", f"--dashboard-port={self.dashboard_port}",
            "--dashboard-host=127.0.0.1", "--include-dashboard=true",
            f"--ray-client-server-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            "--num-cpus=2", "--num-gpus=0", "--object-store-memory=400000000",
            f"--temp-dir={temp_dir}", "--disable-usage-stats",
        ]
        if gpu_nodes:
            command.append(f"--autoscaling-config={self._fake_autoscaling(port, gpu_nodes)}")
            self.env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
        # Its own process group: Ray's daemons stay in it, so teardown stops exactly this
        # cluster (`ray stop` would also stop the session's Serve cluster).
        self.process = subprocess.Popen(
            command, env=self.env, start_new_session=True, umask=0o077,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self.client = self._connect()

    def _fake_autoscaling(self, port: int, gpu_nodes: int) -> Path:
        """The autoscaler's config for Ray's fake node provider (`RAY_FAKE_CLUSTER`)."""
        from ray.util import get_node_ip_address

        config = {
            "cluster_name": "fake", "max_workers": gpu_nodes, "upscaling_speed": 1.0,
            "idle_timeout_minutes": 5, "head_node_type": "ray.head.default", "auth": {}, "docker": {},
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True,
                         "disable_node_updaters": True, "disable_launch_config_check": True,
                         "gcs_address": f"{get_node_ip_address()}:{port}"},
            "available_node_types": {
                "ray.head.default": {"resources": {"CPU": 2}, "node_config": {}, "max_workers": 0},
                "gpu": {"resources": {"CPU": 1, "GPU": 1}, "node_config": {},
                        "min_workers": 0, "max_workers": gpu_nodes},
            },
            **{key: [] for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                                   "worker_setup_commands", "head_start_ray_commands",
                                   "worker_start_ray_commands", "cluster_synced_files",
                                   "rsync_exclude", "rsync_filter")},
            "file_mounts": {}, "file_mounts_sync_continuously": False,
        }
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        path = self.temp_dir / "autoscaling.json"
        path.write_text(json.dumps(config))
        return path

    def _connect(self):
        from ray.job_submission import JobSubmissionClient

        # The token `ray start` keeps in ~/.ray/auth_token, sent as `ray job submit` sends it
        # with RAY_AUTH_MODE=token (this process's Ray settings are left as they are).
        token_file = Path.home() / ".ray" / "auth_token"
        deadline = time.monotonic() + 90
        while True:
            try:
                self.headers = {"Authorization": f"Bearer {token_file.read_text().strip()}"}
                return JobSubmissionClient(f"http://127.0.0.1:{self.dashboard_port}", headers=self.headers)
            except Exception:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise
                time.sleep(1)

    def submit(self, *args: str, working_dir: bool = False, model: str = BUNDLED,
               dtype: str = "float32", env: dict[str, str] | None = None) -> str:
        # float32: compared with float32 vectors
        runtime_env = {"env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})}}
        if working_dir:
            runtime_env["working_dir"] = str(REPO)
        entrypoint = " ".join(["python", "-m", "serve_app.batch", *args, "--model", model,
                               "--dtype", dtype])
        return self.client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)

    def status(self, job_id: str) -> str:
        """The job's status: PENDING, RUNNING, or one of FINAL."""
        return str(self.client.get_job_status(job_id)).split(".")[-1]

    def wait(self, job_id: str, timeout_s: float = 240) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = self.status(job_id)
            if status in FINAL:
                return status
            time.sleep(0.5)
        self.client.stop_job(job_id)
        raise AssertionError(f"job {job_id} did not finish within {timeout_s} s")

    def logs(self, job_id: str) -> str:
        return self.client.get_job_logs(job_id)

    def stop(self) -> None:
        # Killed, not stopped: Serve's graceful shutdown waits out every ingress's draining
        # period (about 40 s of a 90 s test), and SIGTERM to the group stops the GCS before
        # the raylet, which then waits on it (`ray start --block` had not exited 30 s
        # later). Ray's workers (and the HAProxy they start) run outside the `ray start`
        # process group, so they are found by their command lines while the raylet still
        # names its node, and killed after the group.
        strays = processes_of(self.temp_dir)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):  # the strays are killed regardless
            self.process.wait(30)
        for pid in strays:  # warm-start launchers, workers, HAProxy: anything left
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def processes_of(temp_dir: Path) -> list[int]:
    """Processes whose command line names this cluster's temp dir or its node's HAProxy dir."""
    marks = [str(temp_dir)]
    found = {pid: " ".join(args) for pid, args in command_lines().items()}
    for line in found.values():
        if marks[0] in line and "--node_id=" in line:  # the raylet names its node
            node_id = line.split("--node_id=", 1)[1].split()[0]
            marks.append(f"haproxy-serve/{node_id}")
    return [pid for pid, line in found.items() if pid != os.getpid() and any(m in line for m in marks)]
