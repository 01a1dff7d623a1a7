"""What only Ray does: scaling to zero and back, fractional GPU packing, replica failures."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import openai
import pytest
import torch
from conftest import BUNDLED, cmdline, wait_for

from bench.corpus import sentences

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# Fast scaling for tests: the production defaults wait minutes before scaling to zero.
QUICK_SCALING = {
    "idle_timeout_s": 1.0,
    "downscale_delay_s": 1.0,
    "autoscaling_look_back_s": 1.0,
    "autoscaling_metrics_interval_s": 0.5,
}


def test_scale_from_zero_serves_the_first_request_then_returns_to_zero(
    serve_cluster, bundled_embedder
):
    # Idle 4 s before scaling to zero, so the replica is still there to be counted below.
    url = serve_cluster.deploy("cold", **{**QUICK_SCALING, "idle_timeout_s": 4.0})
    assert serve_cluster.replicas("cold") == {}
    health = httpx.get(f"{url}/health", timeout=10).json()
    assert health["replicas"] == "scaled to zero"  # /health answers without waking the model
    assert serve_cluster.replicas("cold") == {}

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120, max_retries=0)
    texts = ["first request after scale to zero", "合同终止"]
    response = client.embeddings.create(model=BUNDLED, input=texts)  # held, not dropped
    got = np.array([d.embedding for d in response.data])
    np.testing.assert_allclose(got, bundled_embedder.encode(texts).vectors, atol=1e-5)
    assert serve_cluster.replicas("cold").get("RUNNING") == 1
    # CPU replicas start warm: forked by the zygote that already imported torch.
    from ray import serve

    replica = serve.get_deployment_handle("Embedder", app_name="cold").describe.remote().result()
    zygote = cmdline(_parent_pid(replica["pid"]))
    assert "--zygote" in zygote and "ray.serve" in zygote  # Serve's imports paid there too
    # The replica's own account of its start, step by step (the cold-start benchmark's).
    startup = replica["startup"]
    assert all(v >= 0 for k, v in startup.items() if k.endswith("_s")) and startup["weights_s"] > 0
    assert startup["process_started_at"] < startup["ready_at"] < time.time()

    serve_cluster.wait_for(
        lambda: serve_cluster.replicas("cold") == {}, timeout_s=60, what="scale back to zero"
    )
    # And it comes back again.
    again = client.embeddings.create(model=BUNDLED, input="second cold start")
    assert len(again.data[0].embedding) == 384
    serve_cluster.delete("cold")


def test_qwen3_standin_is_served_through_the_openai_client(serve_cluster, small_standin_dir):
    from serve_app.core.modelinfo import resolve_model
    from serve_app.model.embedder import TextEmbedder
    from serve_app.model.hardware import cpu_bf16_features

    model = str(small_standin_dir)
    url = serve_cluster.deploy("standin", model=model, dtype="auto", min_replicas=1)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120, max_retries=0)
    texts = ["合同终止的条件是什么？", "Either party may terminate with thirty days' notice."]
    response = client.embeddings.create(model=model, input=texts)  # base64, as the client asks
    got = np.array([d.embedding for d in response.data])
    # The replica's answers carry its settings' version, the ingress's own, so they are cached.
    repeat = httpx.post(f"{url}/v1/embeddings", json={"input": texts}, timeout=60)
    assert repeat.headers["server-timing"].startswith("model;dur=0.0"), repeat.headers["server-timing"]
    dtype = "bfloat16" if cpu_bf16_features() else "float32"  # what dtype=auto picks here
    reference_model = TextEmbedder(resolve_model(model), dtype=dtype)
    reference = reference_model.encode(texts)
    assert got.shape == (2, 128)
    assert (got * reference.vectors).sum(axis=1).min() >= 0.999
    assert response.usage.prompt_tokens == sum(reference.tokens)  # each ends on one EOS
    card = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]
    runtime = card["runtime"]
    assert runtime["dtype"] == dtype and runtime["reason"].startswith("dtype=auto: ")
    # The version the replica answered with is the one the card names (the add-ins' cache key).
    assert response.system_fingerprint == card["system_fingerprint"] != "fp_mixed"
    # Once ready, the replica turns on its CPU fast paths in the background: short texts
    # sharing rows, and bfloat16 weights packed for oneDNN where this CPU has them (with
    # the norms and MLP activations fused around them); the same embeddings come back.
    from ray import serve

    from serve_app.model.packing import can_pack

    replica = serve.get_deployment_handle("Embedder", app_name="standin")
    packs = can_pack(reference_model.model, torch.device("cpu"), reference_model.dtype) is None
    serve_cluster.wait_for(lambda: replica.describe.remote().result(timeout_s=30)["speed_up"],
                           timeout_s=60, what="the replica's fast paths turned on")
    described = replica.describe.remote().result(timeout_s=30)
    assert described["rows_shared"] and described["weights_packed"] == described["elementwise_fused"] == packs
    assert len(described["speed_up"]) == 3 and any("share rows" in s for s in described["speed_up"]), described
    again = client.embeddings.create(model=model, input=[*texts, *sentences(20)])
    want = reference_model.encode([*texts, *sentences(20)]).vectors
    assert (np.array([d.embedding for d in again.data]) * want).sum(axis=1).min() >= 0.999
    serve_cluster.delete("standin")


def test_a_replicas_float16_overflow_reaches_the_client_as_its_sentence(
    serve_cluster, overflowing_standin_dir,
):
    model = str(overflowing_standin_dir)
    # Its warm-up pass overflows too: the replica still starts, and says why in each answer.
    url = serve_cluster.deploy("overflow", model=model, dtype="float16", min_replicas=1)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120, max_retries=0)
    with pytest.raises(openai.InternalServerError) as caught:
        client.embeddings.create(model=model, input=["合同终止的条件是什么？", "Rent is due monthly."])
    error = caught.value.body
    assert error["code"] == "model_output_not_finite", error
    assert error["message"].startswith(
        "The model gave inf or NaN values for 2 texts, running in float16 on cpu:"), error
    # The model loaded: the replica is not marked failed, so Ray's health check does not
    # replace it in a loop (each new one would fail its warm-up the same way).
    from ray import serve

    replica = serve.get_deployment_handle("Embedder", app_name="overflow")
    assert replica.describe.remote().result(timeout_s=30)["failure"] is None
    serve_cluster.delete("overflow")


def _parent_pid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def test_concurrent_requests_are_batched_and_correct(serve_cluster, bundled_embedder):
    import asyncio

    from ray import serve

    # One replica, so that its counts are every pass these requests took.
    url = serve_cluster.deploy("batched", min_replicas=1, max_replicas=1, batch_wait_timeout_s=0.5)
    replica = serve.get_deployment_handle("Embedder", app_name="batched")
    before = replica.describe.remote().result(timeout_s=60)
    texts = [f"sentence number {i} about contracts" for i in range(40)]
    requests = [texts[i : i + 4] for i in range(0, 40, 4)]

    async def run():
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            replies = await asyncio.gather(*(client.post("/v1/embeddings", json={"input": r}) for r in requests))
        return [r.json() for r in replies]

    bodies = asyncio.run(run())
    got = np.array([d["embedding"] for body in bodies for d in body["data"]])
    np.testing.assert_allclose(got, bundled_embedder.encode(texts).vectors, atol=1e-5)
    after = replica.describe.remote().result(timeout_s=60)
    assert after["pid"] == before["pid"]
    # Every text reached the model, in fewer passes than requests: they shared passes.
    assert after["texts_embedded"] - before["texts_embedded"] == len(texts)
    passes = after["forward_passes"] - before["forward_passes"]
    assert 1 <= passes < len(requests), passes
    serve_cluster.delete("batched")


def test_four_quarter_gpu_replicas_pack_onto_one_gpu(serve_cluster):
    import ray
    from ray import serve

    serve_cluster.deploy(
        "packed", gpu_fraction=0.25, min_replicas=4, max_replicas=4, replica_cpus=0
    )
    assert serve_cluster.replicas("packed") == {"RUNNING": 4}
    assert ray.available_resources().get("GPU", 0) == pytest.approx(0, abs=1e-6)
    handle = serve.get_deployment_handle("Embedder", app_name="packed")
    replies = [handle.describe.remote().result(timeout_s=30) for _ in range(40)]
    assert len({r["pid"] for r in replies}) > 1  # several replicas answered
    assert {tuple(r["gpu_ids"]) for r in replies} == {("0",)}  # all on the one card
    assert {r["node_id"] for r in replies} == {ray.get_runtime_context().get_node_id()}
    assert all(r["loaded"] and r["device"] == "cpu" for r in replies)  # CPU torch: no CUDA

    # The card is full: one more quarter-GPU task waits instead of running.
    @ray.remote(num_gpus=0.25, num_cpus=0)
    def quarter():
        return "ran"

    pending = quarter.remote()
    ready, _ = ray.wait([pending], timeout=3)
    assert ready == []
    serve_cluster.delete("packed")
    assert ray.get(pending, timeout=60) == "ran"  # released GPU share goes to the waiting task


def test_replica_that_cannot_load_answers_503_then_is_replaced_and_heals(serve_cluster, tmp_path, tiny_qwen3_dir):
    from ray import serve

    model = tmp_path / "model"
    shutil.copytree(tiny_qwen3_dir, model)
    weights = model / "model.safetensors"
    good = weights.read_bytes()
    url = serve_cluster.deploy("broken", model=str(model), served_model_name="tiny",
                               min_replicas=1, max_replicas=1, health_check_period_s=0.5)
    texts = iter(range(10**6))

    def fresh_request():  # a new text each time: the ingress's cache must not answer
        return httpx.post(f"{url}/v1/embeddings", json={"input": f"text {next(texts)}"}, timeout=120)

    assert fresh_request().status_code == 200
    handle = serve.get_deployment_handle("Embedder", app_name="broken")
    first = handle.describe.remote().result(timeout_s=60)["pid"]

    # The replica dies and its replacement finds the weights unreadable (a copy in progress).
    weights.write_bytes(b"not a safetensors file")
    os.kill(first, signal.SIGKILL)
    response = serve_cluster.wait_for(lambda: (r := fresh_request()).status_code == 503 and r,
                                      120, "the replacement's 503")
    error = response.json()["error"]
    assert "failed to load" in error["message"] and "'tiny'" in error["message"]
    assert str(tmp_path) not in error["message"]  # no internal paths, no exception text
    assert response.headers["Retry-After"]
    assert httpx.get(f"{url}/health", timeout=10).json()["status"] == "ok"

    weights.write_bytes(good)  # the fault ends: Ray must replace the broken replica
    serve_cluster.wait_for(
        lambda: fresh_request().status_code == 200, 120, "a replacement replica that loads the model",
    )
    serve_cluster.delete("broken")


def test_model_that_is_too_slow_is_a_503_not_a_hang(serve_cluster):
    url = serve_cluster.deploy("impatient", request_timeout_s=0.5, **QUICK_SCALING)
    response = httpx.post(f"{url}/v1/embeddings", json={"input": "cold"}, timeout=30)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "model_timeout"
    assert int(response.headers["Retry-After"]) >= 1
    serve_cluster.delete("impatient")


def test_serve_run_with_a_missing_model_prints_one_clear_line():
    # `serve run` builds the app before it starts Ray, so this needs no cluster.
    result = subprocess.run(
        [sys.executable, "-m", "ray.serve.scripts", "run", "serve_app:build_app",
         "model=Qwen/Qwen3-Embedding-0.6B"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    ours = [line for line in result.stderr.strip().splitlines() if " INFO " not in line]  # past Ray's own
    assert len(ours) == 1, result.stderr[-3000:]
    assert "Qwen/Qwen3-Embedding-0.6B" in ours[0] and "bundled:minilm" in ours[0]


def test_serve_config_yaml_is_valid_for_serve_deploy():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from serve_app.core.config import AppArgs

    with open("serve_config.yaml") as f:
        config = yaml.safe_load(f)
    schema = ServeDeploySchema.model_validate(config)
    app = schema.applications[0]
    assert app.import_path == "serve_app:build_app"
    AppArgs.model_validate(app.args)  # every arg is a typed setting
    json.dumps(config)


def test_a_short_request_is_answered_without_waiting_for_a_long_one_beside_it(bundled_spec):
    """The model replica answers each request when its own texts are done: a one-text
    request sent together with a 600-text one does not wait for the other's passes
    (@serve.batch, used before, answered a group only when all of it was done)."""
    import asyncio
    from dataclasses import asdict

    from serve_app.ray_shell.deployments import Embedder

    replica = Embedder.func_or_class(
        {"model": BUNDLED, "gpu_fraction": 0.0, "dtype": "float32"}, asdict(bundled_spec), 0.0)
    embedded = []  # texts of each pass, as it finishes
    encode = replica._scheduler._encode

    def counting(texts, threads, between):
        encoded = encode(texts, threads, between)
        embedded.append(len(texts))
        return encoded

    replica._scheduler._encode = counting
    done_when = {}  # texts embedded when each request was answered

    async def send(name: str, texts: list[str]):
        result = await replica.embed(texts)
        done_when[name] = sum(embedded)
        return result

    async def both():
        return await asyncio.gather(
            send("short", ["one short clause"]),
            send("long", [f"clause {i}: the tenant pays the rent monthly" for i in range(600)]))

    short, long = asyncio.run(both())
    assert len(short.vectors) == 1 and len(long.vectors) == 600
    assert done_when["short"] < 600 < done_when["long"], done_when
    replica._scheduler.shutdown()


def test_only_one_thread_of_a_replica_runs_torch_on_several_cores(bundled_spec):
    """With GNU OpenMP each thread that runs torch on several cores keeps a team of its
    own threads; two such teams on two cores made every pass half as slow again
    (bench/omp_team.py). Loading, the warm-up pass, the speed-up checks, a lone request
    and pooled ones on both workers: only worker 0's thread may use more than one."""
    import asyncio
    import threading
    from dataclasses import asdict

    from serve_app.ray_shell.deployments import Embedder

    several = set()  # names of the threads that ran a module on more than one torch thread

    def note(module, args):
        if torch.get_num_threads() > 1:
            several.add(threading.current_thread().name)

    hook = torch.nn.modules.module.register_module_forward_pre_hook(note)
    replica = None
    try:
        replica = Embedder.func_or_class(
            {"model": BUNDLED, "gpu_fraction": 0.0, "cpu_threads": 2}, asdict(bundled_spec), 0.0)
        wait_for(lambda: not any(t.name == "speed-up" for t in threading.enumerate()), 120,
                 "the replica's speed-up thread to finish")

        async def traffic():
            alone = await replica.embed(["one short clause"])
            pooled = await asyncio.gather(
                *(replica.embed([f"clause {i}.{j}: the tenant pays" for j in range(20)]) for i in range(4)))
            return alone, pooled

        alone, pooled = asyncio.run(traffic())
    finally:
        hook.remove()
        if replica is not None and replica._scheduler is not None:
            replica._scheduler.shutdown()
    assert len(alone.vectors) == 1 and [len(p.vectors) for p in pooled] == [20] * 4
    assert replica._scheduler.passes_by_worker[1] > 0  # the pooled requests used both workers
    assert len(several) == 1 and next(iter(several)).startswith("forward-0"), several


def test_the_ingress_handle_is_remade_for_the_transport_of_its_own_ray_settings(serve_cluster, monkeypatch):
    """A handle carries the transport of the process that built the app; a driver that
    imported Ray before setting RAY_SERVE_THROUGHPUT_OPTIMIZED (as this test process
    and the benchmarks did) builds one that uses actor calls on a cluster set up for
    gRPC. The ingress re-decides by its own (the cluster's) settings."""
    from ray.serve._private import constants
    from ray.serve.handle import DeploymentHandle

    from serve_app.ray_shell.transport import handle_for_this_replica

    built = DeploymentHandle("Embedder", "transport-check").options(_by_reference=True)
    monkeypatch.setattr(constants, "RAY_SERVE_USE_GRPC_BY_DEFAULT", True)
    assert handle_for_this_replica(built).handle_options._by_reference is False
    monkeypatch.setattr(constants, "RAY_SERVE_USE_GRPC_BY_DEFAULT", False)
    grpc_built = built.options(_by_reference=False)
    assert handle_for_this_replica(grpc_built).handle_options._by_reference is True
