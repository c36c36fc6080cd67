import os

# Ray and any server a test starts stay on loopback.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "false")
# Ray workers import train functions defined in test modules by name.
_tests_dir = os.path.dirname(os.path.abspath(__file__))
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (_tests_dir, os.environ.get("PYTHONPATH", "")) if p
)
# Credentials for the moto S3 server the tests start; set before Ray starts so its workers see them.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """The end-to-end module (`pytest.mark.critical_path`) first, before the session fixtures
    start services that stay up: the Serve tests' replicas and their cluster took CPU from its
    bases pretraining and Ray jobs when it ran last.

    Measured on 2 cores: the suite is CPU-bound (vmstat idle ~1-5%), so two pytest-xdist
    workers did not shorten it (~32 min either way): the end-to-end module's bases
    pretraining took 20 min instead of 8 beside the other worker."""
    items.sort(key=lambda item: not item.get_closest_marker("critical_path"))


@pytest.fixture(autouse=True)
def _restore_torch_state():
    dtype = torch.get_default_dtype()
    threads = torch.get_num_threads()
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, proc, timeout: float = 60) -> None:
    import socket
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"nothing listens on 127.0.0.1:{port}") from None
            time.sleep(0.2)


class RayCluster:
    """A Ray head started with `ray start --block` on loopback, as a user would run it."""

    def __init__(self, tmp: str, num_cpus: int = 4) -> None:
        import subprocess
        import sys

        self.port, self.dashboard_port = free_port(), free_port()
        bin_dir = os.path.dirname(sys.executable)
        # Jobs run `python` from the head's PATH: make it this venv's. Auth is off because the
        # cluster only listens on 127.0.0.1 and lives for one test session.
        self.env = dict(
            os.environ,
            PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""),
            RAY_AUTH_MODE="disabled",
            # Ray 2.60 otherwise drains for 30 s on SIGTERM before it stops.
            RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
            RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        )
        self.proc = subprocess.Popen(
            [os.path.join(bin_dir, "ray"), "start", "--head", "--block",
             "--node-ip-address=127.0.0.1", f"--port={self.port}",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
             "--include-dashboard=true", f"--num-cpus={num_cpus}", "--disable-usage-stats",
             # The agent's default port (52365) may be held by another Ray on the machine.
             f"--dashboard-agent-listen-port={free_port()}",
             f"--temp-dir={tmp}"],
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        wait_for_port(self.port, self.proc)
        wait_for_port(self.dashboard_port, self.proc)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def stop(self) -> None:
        import signal

        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=60)
        except (ProcessLookupError, OSError):
            pass


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    os.environ["RAY_AUTH_MODE"] = "disabled"
    # Ray's socket paths must stay short: a tmp_path is too long for AF_UNIX.
    import tempfile

    tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    cluster = RayCluster(tmp)
    yield cluster
    import ray

    ray.shutdown()
    cluster.stop()


@pytest.fixture(scope="session")
def local_ray(ray_cluster):
    """This test process as a driver of the loopback test cluster."""
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_cluster.address, log_to_driver=False, configure_logging=False)
    return ray


@pytest.fixture(scope="session")
def moto_s3():
    """A moto S3 server on 127.0.0.1: (pyarrow filesystem, S3Options pointing at it)."""
    import socket
    import subprocess
    import sys
    import time

    from osprey.io.storage import S3Options

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # The venv's moto, not whatever `moto_server` is first on PATH.
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.1)
    options = S3Options(endpoint=f"127.0.0.1:{port}", scheme="http", region="us-east-1")
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(
        endpoint_override=options.endpoint, scheme="http", allow_bucket_creation=True
    )
    yield fs, options
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def serve_app(local_ray, tmp_path_factory):
    """The `osprey` Serve application (tiny model, small limits) on 127.0.0.1, shared by the
    serve tests (API, browser, fuzzing)."""
    from serve_support import app_args, app_options, deploy, start_serve

    from osprey.infer.tiny import write_tiny_model

    model_dir = str(write_tiny_model(tmp_path_factory.mktemp("serve-model")))
    port = free_port()
    start_serve(port)
    app = deploy("osprey", "/", port, app_args(model_dir), app_options())
    app.model_dir, app.port = model_dir, port
    yield app
    from ray import serve

    serve.shutdown()
