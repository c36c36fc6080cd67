"""Load test of the Serve application on loopback: dynamic batching and autoscaling.

    python bench/serve.py                     # both parts (5-10 minutes on 2 shared cores)
    python bench/serve.py --skip-autoscale    # the batching table only
    python bench/serve.py --clients 1 4 16 --requests 96 --seconds 30 --tokens 48

Batching: the app (tiny model, random weights, classical segmenter) is deployed twice side by
side, with the captioner's `@serve.batch` max_batch_size 1 and --batch. Two routes are measured:
POST /v1/describe (one region, the --task answer) and POST /v1/chat/completions (one region by
`regions`, a question about it), each of --tokens new tokens (the random model never stops
early). For each number of concurrent clients, after one unmeasured round on each app, the two
apps are measured in turn, --repeats times, alternating which goes first (so both see the same
machine), each run sending requests in a loop until --requests (at least 6 per client) are done
or --seconds pass. Printed per route and client count: the median over repeats of requests/s,
p50 and p99 latency, and the mean batch the captioner ran; then per route the throughput ratio
batched / batch 1 at 16 clients (the target is at least 3x), beside the ceiling: the same
requests straight to the engine in the benchmark's process, --batch as one batch against one at
a time (what batching gives without HTTP, Serve and their processes sharing the cores).

Autoscaling: the captioner deployed with autoscaling (1 to 3 replicas, a small
target_ongoing_requests and short delays); 32 clients for --load-seconds, then idle. The running
replicas are read from `serve status` before, at the end of the load and after the idle period,
and from serve.status() every second in between (the same controller state).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# Ray on loopback only, without token auth (this instance lives for the benchmark).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from osprey.data.shapes import ShapesConfig, render_sample  # noqa: E402

CHAT_QUESTION = "What is <region1>? Describe it."


def scene():
    """The one image and region every request asks about."""
    return render_sample(np.random.default_rng(0), ShapesConfig(image_size=96, max_shapes=3))


def request_body(tokens: int, task: str) -> dict:
    from PIL import Image
    from pycocotools import mask as mask_utils

    scene_ = scene()
    buffer = io.BytesIO()
    Image.fromarray(scene_.image).save(buffer, format="PNG")
    rle = mask_utils.encode(np.asfortranarray(scene_.masks[0].astype(np.uint8)))
    return {
        "image": base64.b64encode(buffer.getvalue()).decode("ascii"),
        "regions": [{"rle": {"size": list(rle["size"]), "counts": rle["counts"].decode()}}],
        "tasks": [task],
        "max_new_tokens": tokens,
    }


def chat_body(tokens: int) -> dict:
    """The same image and region as an OpenAI Chat Completions request."""
    describe = request_body(tokens, "short")
    url = "data:image/png;base64," + describe["image"]
    return {
        "model": "osprey",
        "max_tokens": tokens,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": CHAT_QUESTION},
        ]}],
        "regions": describe["regions"],
    }  # fmt: skip


# route -> (path, the Captioner stats list counting its batches)
ROUTES = {"describe": ("/v1/describe", "batches"), "chat": ("/v1/chat/completions", "chat_batches")}


async def load(url: str, body: dict, clients: int, requests: int, seconds: float) -> dict:
    """`clients` concurrent loops until `requests` are done or `seconds` pass."""
    import aiohttp

    latencies: list[float] = []
    errors = 0
    deadline = time.monotonic() + seconds
    remaining = requests

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal remaining, errors
        while remaining > 0 and time.monotonic() < deadline:
            remaining -= 1
            began = time.monotonic()
            async with session.post(url, json=body) as response:
                await response.read()
                if response.status == 200:
                    latencies.append(time.monotonic() - began)
                else:
                    errors += 1

    timeout = aiohttp.ClientTimeout(total=seconds + 120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        began = time.monotonic()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        elapsed = time.monotonic() - began
    done = np.array(latencies) if latencies else np.array([np.nan])
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": errors,
        "throughput": len(latencies) / elapsed,
        "p50": float(np.percentile(done, 50)),
        "p99": float(np.percentile(done, 99)),
    }


def deploy(
    model_dir: str, port: int, batch: int, autoscale: bool = False, name: str = "osprey"
) -> str:
    from ray import serve

    from osprey.serve.app import build_app

    args = {"model": model_dir, "device": "cpu", "max_batch_size": batch,
            "batch_wait_timeout_s": 0.01}  # fmt: skip
    captioner = {"ray_actor_options": {"num_cpus": 0.1}, "max_ongoing_requests": max(32, 2 * batch),
                 "max_queued_requests": 1000}  # fmt: skip
    if autoscale:
        captioner["autoscaling_config"] = {
            "min_replicas": 1,
            "max_replicas": 3,
            "target_ongoing_requests": 4,
            "upscale_delay_s": 2,
            "downscale_delay_s": 8,
            "metrics_interval_s": 1,
            "look_back_period_s": 3,
        }
    options = {
        "OspreyIngress": {"ray_actor_options": {"num_cpus": 0.1}, "max_ongoing_requests": 256,
                          "max_queued_requests": 1000},
        "MaskGenerator": {"ray_actor_options": {"num_cpus": 0.1}},
        "Captioner": captioner,
    }  # fmt: skip
    prefix = "/" if name == "osprey" else f"/{name}"
    serve.run(build_app(args, options), name=name, route_prefix=prefix)
    return f"http://127.0.0.1:{port}{prefix.rstrip('/')}"


def captioner_stats(app: str = "osprey") -> dict:
    from ray import serve

    return serve.get_deployment_handle("Captioner", app).stats.remote().result()


def batching(model_dir: str, port: int, options: argparse.Namespace) -> None:
    from ray import serve

    bodies = {
        "describe": request_body(options.tokens, options.task),
        "chat": chat_body(options.tokens),
    }
    apps = {batch: f"batch{batch}" for batch in (1, options.batch)}
    urls = {batch: deploy(model_dir, port, batch, name=name) for batch, name in apps.items()}
    tables: dict[str, dict[int, list[dict]]] = {}
    for route, (path, counter) in ROUTES.items():
        body = bodies[route]
        for batch in apps:
            asyncio.run(load(urls[batch] + path, body, 2, 4, 60))  # warm-up
        tables[route] = {batch: [] for batch in apps}
        for clients in options.clients:
            for batch in apps:  # one unmeasured round each
                asyncio.run(load(urls[batch] + path, body, clients, clients, 60))
            runs: dict[int, list[dict]] = {batch: [] for batch in apps}
            for repeat in range(options.repeats):
                order = list(apps) if repeat % 2 == 0 else list(reversed(apps))
                for batch in order:
                    before = len(captioner_stats(apps[batch])[counter])
                    requests = max(options.requests, 6 * clients)
                    row = asyncio.run(
                        load(urls[batch] + path, body, clients, requests, options.seconds)
                    )
                    batches = captioner_stats(apps[batch])[counter][before:]
                    row["mean_batch"] = float(np.mean(batches)) if batches else 0.0
                    runs[batch].append(row)
            for batch in apps:
                row = median_row(runs[batch])
                tables[route][batch].append(row)
                print(
                    f"{route:<8} batch<={batch:<3} clients {clients:>3}: "
                    f"{row['throughput']:6.1f} req/s  p50 {row['p50'] * 1000:7.0f} ms  "
                    f"p99 {row['p99'] * 1000:7.0f} ms  mean batch {row['mean_batch']:4.1f}  "
                    f"({row['requests']} ok, {row['errors']} errors)",
                    flush=True,
                )
    for name in apps.values():
        serve.delete(name)

    for route, rows in tables.items():
        print(f"\nPOST {ROUTES[route][0]}, tiny model, 1 region, {options.tokens} new tokens, "
              f"median of {options.repeats} interleaved runs")  # fmt: skip
        print("| max_batch_size | clients | req/s | p50 ms | p99 ms | mean batch |")
        print("|---|---|---|---|---|---|")
        for batch, table in rows.items():
            for r in table:
                print(f"| {batch} | {r['clients']} | {r['throughput']:.1f} | {r['p50'] * 1000:.0f} | "
                      f"{r['p99'] * 1000:.0f} | {r['mean_batch']:.1f} |")  # fmt: skip
    ceiling = engine_ceiling(model_dir, options)
    if 16 in options.clients:
        at = options.clients.index(16)
        for route, rows in tables.items():
            ratio = rows[options.batch][at]["throughput"] / rows[1][at]["throughput"]
            verdict = "ok" if ratio >= 3 else "BELOW the 3x target"
            print(
                f"{route}: throughput at 16 clients, batched / batch 1: {ratio:.1f}x ({verdict}); "
                f"the engine alone, {options.batch} requests as one batch / one at a time: "
                f"{ceiling[route]:.1f}x"
            )


def engine_ceiling(model_dir: str, options: argparse.Namespace) -> dict[str, float]:
    """What batching can give at most here: the same requests straight to the engine in this
    process, `--batch` of them as one batch against one at a time (interleaved, --repeats,
    median), without HTTP, Serve or the other processes' CPU."""
    from osprey.infer.config import EngineConfig, SamplingParams, Task
    from osprey.infer.engine import STANDARD_TASKS, ChatRequest, RegionCaptioner

    engine = RegionCaptioner.from_pretrained(
        model_dir, EngineConfig(max_batch_images=options.batch)
    )
    scene_ = scene()
    image, mask = scene_.image, scene_.masks[0]
    task = STANDARD_TASKS[options.task]
    # As the captioner caps a describe task's tokens (osprey.serve.deployments.Captioner).
    tasks = [Task(task.name, task.question, min(task.max_new_tokens, options.tokens))]
    turn = [{"from": "human", "value": CHAT_QUESTION}]
    chat = ChatRequest(image, turn, [mask], SamplingParams(max_new_tokens=options.tokens))
    work = {
        "describe": lambda n: engine.caption([image] * n, [[mask]] * n, tasks),
        "chat": lambda n: engine.chat([chat] * n),
    }
    ratios = {}
    for route, run in work.items():
        run(options.batch)  # warm-up
        times: dict[str, list[float]] = {"one": [], "batch": []}
        for repeat in range(options.repeats):
            for how in ("one", "batch") if repeat % 2 == 0 else ("batch", "one"):
                began = time.perf_counter()
                if how == "batch":
                    run(options.batch)
                else:
                    for _ in range(options.batch):
                        run(1)
                times[how].append(time.perf_counter() - began)
        ratios[route] = float(np.median(times["one"]) / np.median(times["batch"]))
    return ratios


def median_row(runs: list[dict]) -> dict:
    """The run of median throughput (its latencies and batch sizes with it)."""
    ordered = sorted(runs, key=lambda r: r["throughput"])
    return ordered[len(ordered) // 2]


def running(status, deployment: str = "Captioner") -> int:
    app = status.applications["osprey"]
    return int(app.deployments[deployment].replica_states.get("RUNNING", 0))


def serve_status_cli(dashboard: str) -> int:
    """Running captioner replicas according to the `serve status` command."""
    import yaml

    out = subprocess.run(
        [str(Path(sys.executable).parent / "serve"), "status", "-a", dashboard],
        capture_output=True, text=True, timeout=120, env=os.environ,
    ).stdout  # fmt: skip
    status = yaml.safe_load(out) or {}
    app = status.get("applications", {}).get("osprey", {})
    states = app.get("deployments", {}).get("Captioner", {}).get("replica_states", {})
    return int(states.get("RUNNING", 0))


def autoscaling(model_dir: str, port: int, dashboard: str, options: argparse.Namespace) -> None:
    from ray import serve

    url = deploy(model_dir, port, 4, autoscale=True) + "/v1/describe"
    body = request_body(options.tokens, options.task)
    print(f"\nautoscaling (captioner 1-3 replicas, target 4 ongoing requests): "
          f"`serve status` before the load: {serve_status_cli(dashboard)} running")  # fmt: skip
    timeline: list[tuple[float, str, int]] = []
    stop = threading.Event()
    began = time.monotonic()
    phase = ["load"]

    def poll() -> None:
        while not stop.is_set():
            try:
                timeline.append((time.monotonic() - began, phase[0], running(serve.status())))
            except Exception:
                pass
            stop.wait(1.0)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    result = asyncio.run(load(url, body, 32, 10**9, options.load_seconds))
    at_peak = serve_status_cli(dashboard)
    phase[0] = "idle"
    deadline = time.monotonic() + options.idle_seconds
    while time.monotonic() < deadline:
        if timeline and timeline[-1][1] == "idle" and timeline[-1][2] == 1:
            break
        time.sleep(1)
    stop.set()
    poller.join()
    after = serve_status_cli(dashboard)
    peak = max(n for _, p, n in timeline if p == "load") if timeline else 0
    print(f"load: 32 clients for {options.load_seconds:.0f} s, {result['throughput']:.1f} req/s, "
          f"p50 {result['p50'] * 1000:.0f} ms, p99 {result['p99'] * 1000:.0f} ms")  # fmt: skip
    changes = [
        (t, p, n) for i, (t, p, n) in enumerate(timeline) if i == 0 or n != timeline[i - 1][2]
    ]
    print("replicas over time: " + ", ".join(f"{t:.0f}s {p} {n}" for t, p, n in changes))
    print(f"`serve status`: at the end of the load {at_peak} running (peak seen {peak}); "
          f"after {timeline[-1][0] - options.load_seconds:.0f} s idle {after} running")  # fmt: skip
    verdict = "ok" if peak > 1 and after < peak else "NO scaling seen"
    print(f"autoscaling: up to {peak} under load, down to {after} after ({verdict})")
    serve.delete("osprey")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument(
        "--requests", type=int, default=64, help="per client count (at least 2x clients)"
    )
    parser.add_argument("--seconds", type=float, default=40.0, help="time limit per client count")
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per answer")
    parser.add_argument("--task", default="detailed", choices=("category", "short", "detailed"))
    parser.add_argument("--batch", type=int, default=16, help="max_batch_size of the batched run")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per setting")
    parser.add_argument("--load-seconds", type=float, default=30.0)
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument("--skip-batching", action="store_true")
    parser.add_argument("--skip-autoscale", action="store_true")
    options = parser.parse_args()

    import ray
    from ray import serve

    from osprey.infer.tiny import write_tiny_model

    port, dashboard_port = _free_port(), _free_port()
    ray.init(num_cpus=8, include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=dashboard_port, log_to_driver=False)  # fmt: skip
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = str(write_tiny_model(tmp))
            if not options.skip_batching:
                batching(model_dir, port, options)
            if not options.skip_autoscale:
                autoscaling(model_dir, port, f"http://127.0.0.1:{dashboard_port}", options)
    finally:
        serve.shutdown()
        ray.shutdown()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


if __name__ == "__main__":
    main()
