"""The dask driver's door: the embedded cluster refuses strangers; external clusters over TLS; bad settings early."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import dask
import distributed
import psutil
import pytest
from distributed.security import Security

from starlette_concurrency import Concurrency, ConcurrencyError, ConfigurationError, DaskOptions
from starlette_concurrency._drivers.dask import DaskDriver

from .. import helpers

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    # Dask distributed runs on asyncio only.
    return "asyncio"


NOBODY = 65534
REFUSED = r"refused: (TypeError: TLS expects a `ssl_context`|(Fatal)?CommClosedError|OSError|SSLError|TimeoutError)"

# What a stranger on the machine tries: every server of the cluster (scheduler, workers, nannies), with a
# plain client, over plain TCP, and with a certificate of its own; each success leaves a marker file.
STRANGER = r"""
import asyncio, json, os, sys

import cloudpickle, distributed
from distributed.core import rpc
from distributed.security import Security

plan = json.loads(sys.argv[1])


def attack(name):
    def touch():
        open(os.path.join(plan["markers"], name), "w").close()
        return os.getuid()

    return touch


def plain(address):
    return address.replace("tls://", "tcp://")


async def attempt(name, coroutine):
    try:
        await asyncio.wait_for(coroutine, 60)
    except BaseException as exc:
        return name, f"refused: {type(exc).__name__}: {exc}"[:300]
    return name, "ran"


async def client(address, name, **options):
    async with distributed.Client(address, asynchronous=True, timeout="5s", **options) as c:
        await c.submit(attack(name), pure=False)


async def run(address, name, **connection_args):
    server = rpc(address, connection_args=connection_args, timeout=5)
    try:
        await server.run(function=cloudpickle.dumps(attack(name)))
    finally:
        await server.close_rpc()


async def main():
    own = Security.temporary()  # a certificate of the stranger's own, not signed by the cluster's
    scheduler = plan["scheduler"]
    attempts = [
        attempt("client", client(scheduler, "client")),
        attempt("client-tcp", client(plain(scheduler), "client-tcp")),
        attempt("client-own-cert", client(scheduler, "client-own-cert", security=own)),
    ]
    for n, address in enumerate(plan["servers"]):
        attempts += [
            attempt(f"run-{n}", run(address, f"run-{n}")),
            attempt(f"run-{n}-tcp", run(plain(address), f"run-{n}-tcp")),
            attempt(f"run-{n}-own-cert", run(address, f"run-{n}-own-cert", **own.get_connection_args("client"))),
        ]
    print(json.dumps(dict(await asyncio.gather(*attempts))))


asyncio.run(main())
"""


async def _stranger(plan: dict[str, Any], *, uid: int | None, home: Path) -> dict[str, str]:
    """Run the stranger's script as `uid` (``None``: as this process's uid), with no certificate of ours."""
    command = [sys.executable, "-c", STRANGER, json.dumps(plan)]
    if uid is not None:
        command = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *command]
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        # A refused handshake is retried until the connect timeout (30 s by default): keep the refusals quick.
        "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "3s",
    }
    result = await anyio.run_process(command, env=env, cwd="/", check=False)
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-3000:]
    outcome: dict[str, str] = json.loads(result.stdout.decode().strip().splitlines()[-1])
    return outcome


def _needs_setpriv() -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("running a client as another uid needs root and setpriv")
    # The stranger runs this very interpreter. One installed where uid 65534 cannot read it (pyenv's
    # under root's home, mode 700) cannot run for it, or runs as another Python without our packages:
    # checked, since a readable one must run the test.
    probe = "import sys, distributed; print('%d.%d' % sys.version_info[:2])"
    as_nobody = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        cwd="/",
        timeout=60,
    )
    ours = f"{sys.version_info.major}.{sys.version_info.minor}"
    if as_nobody.returncode != 0 or as_nobody.stdout.strip() != ours:
        got = as_nobody.stdout.strip() or (as_nobody.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(
            f"uid {NOBODY} cannot run this Python {ours} with distributed ({sys.executable}: got {got!r}); "
            "install it where every user can read it to run this test"
        )


@pytest.fixture
def stranger_home() -> Iterator[Path]:
    """A home directory the stranger (uid 65534) may use: pytest's own temporary directories are private to root."""
    home = Path(tempfile.mkdtemp(prefix="dask-stranger-"))
    home.chmod(0o777)
    yield home
    shutil.rmtree(home, ignore_errors=True)


async def _servers(client: Any) -> tuple[str, list[str]]:
    identity = await client.scheduler.identity()  # every worker: n_workers=-1, the default, is not in 2024.8
    workers = identity["workers"]
    servers = [*workers, *(info["nanny"] for info in workers.values() if info.get("nanny"))]
    return str(identity["address"]), servers


async def test_the_embedded_cluster_refuses_strangers(tmp_path: Path, stranger_home: Path) -> None:
    _needs_setpriv()
    markers = tmp_path / "markers"
    markers.mkdir()
    driver = DaskDriver(workers=1)
    async with Concurrency(driver=driver, env_file=None) as concurrency:
        scheduler, servers = await _servers(driver.client)
        assert scheduler.startswith("tls://127.0.0.1:")
        assert len(servers) == 2, "expected one worker and its nanny"
        assert all(address.startswith("tls://127.0.0.1:") for address in servers)
        plan = {"scheduler": scheduler, "servers": servers, "markers": str(markers)}
        as_nobody = await _stranger(plan, uid=NOBODY, home=stranger_home)
        as_ourselves = await _stranger(plan, uid=None, home=stranger_home)
        # Our own client, with the certificates, still works.
        assert await concurrency.run(lambda: "ours") == "ours"
        secrets = _processes_showing_a_key()
    for who, outcome in (("uid 65534", as_nobody), ("this uid, without the certificates", as_ourselves)):
        assert len(outcome) == 3 + 3 * len(servers)
        # Refused at the door (no TLS context, a handshake that fails), not by a mistake in the script.
        ran = [name for name, verdict in outcome.items() if not re.match(REFUSED, verdict)]
        assert not ran, f"{who} was not refused at the connection: {ran} ({outcome})"
    assert not list(markers.iterdir()), "a stranger's code ran in the cluster"
    assert not secrets, f"the cluster's private key shows in the command line or environment of {secrets}"


def _processes_showing_a_key() -> list[int]:
    """Our descendants whose command line or environment holds a private key (other users can read command lines)."""
    showing = []
    for process in psutil.Process().children(recursive=True):
        try:
            seen = " ".join(process.cmdline()) + " ".join(process.environ().values())
        except psutil.Error:
            continue
        if "PRIVATE KEY" in seen:
            showing.append(process.pid)
    return showing


async def test_the_strangers_script_does_get_into_an_open_cluster(tmp_path: Path, stranger_home: Path) -> None:
    # The control: without TLS (the driver before this fix), the same attempts run code as this process's user.
    _needs_setpriv()
    markers = tmp_path / "markers"
    markers.mkdir()
    async with (
        distributed.LocalCluster(  # type: ignore[no-untyped-call]
            n_workers=1,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            scheduler_port=0,
            dashboard_address=None,
            asynchronous=True,
        ) as cluster,  # fmt: skip
        distributed.Client(cluster, asynchronous=True, set_as_default=False) as client,  # type: ignore[no-untyped-call]
    ):
        scheduler, servers = await _servers(client)
        plan = {"scheduler": scheduler, "servers": servers, "markers": str(markers)}
        outcome = await _stranger(plan, uid=NOBODY, home=stranger_home)
    expected = ["client", *(f"run-{n}" for n in range(len(servers)))]
    assert [name for name in expected if outcome[name] == "ran"] == expected, outcome
    assert {path.name for path in markers.iterdir()} >= set(expected)


# An external cluster over TLS: a real `dask scheduler` and `dask worker` given certificate files.


def _write_certificates(directory: Path) -> dict[str, Path]:
    """Write a fresh self-signed certificate (its own CA) and its key to files, as an operator would have them."""
    security = Security.temporary()  # type: ignore[no-untyped-call]
    files = {"ca": directory / "ca.pem", "cert": directory / "cert.pem", "key": directory / "key.pem"}
    files["ca"].write_text(security.tls_ca_file)
    files["cert"].write_text(security.tls_client_cert)
    files["key"].write_text(security.tls_client_key)
    files["key"].chmod(0o600)
    return files


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, Path]]]:
    """A `dask scheduler` and one `dask worker` that speak TLS only; yields the address and the certificate files."""
    directory = tmp_path_factory.mktemp("dask-tls")
    files = _write_certificates(directory)
    tls = ["--tls-ca-file", str(files["ca"]), "--tls-cert", str(files["cert"]), "--tls-key", str(files["key"])]
    dask = str(Path(sys.executable).parent / "dask")
    scheduler_file = directory / "scheduler.json"
    processes: list[subprocess.Popen[bytes]] = []
    with (directory / "cluster.log").open("wb") as log:

        def spawn(*args: str) -> subprocess.Popen[bytes]:
            process = subprocess.Popen([dask, *args], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
            processes.append(process)
            return process

        try:
            scheduler = spawn("scheduler", "--protocol", "tls", "--host", "127.0.0.1", "--port", "0",
                              "--no-dashboard", "--scheduler-file", str(scheduler_file), *tls)  # fmt: skip
            address = helpers.scheduler_address(scheduler_file, scheduler)
            spawn("worker", address, "--host", "127.0.0.1", "--nthreads", "1", "--no-dashboard", *tls)
            yield address, files
        finally:
            for process in reversed(processes):  # the worker first, then the scheduler it would wait for
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


async def test_an_external_tls_cluster_with_a_security_argument(tls_cluster: tuple[str, dict[str, Path]]) -> None:
    address, files = tls_cluster
    assert address.startswith("tls://")
    security = Security(  # type: ignore[no-untyped-call]
        tls_ca_file=str(files["ca"]),
        tls_client_cert=str(files["cert"]),
        tls_client_key=str(files["key"]),
        require_encryption=True,
    )
    driver = DaskDriver(DaskOptions(address=address, security=security))
    async with Concurrency(driver, env_file=None) as concurrency:
        pid, greeting = await concurrency.run([os.getpid, lambda: "over TLS"])
    assert greeting == "over TLS"
    assert pid != os.getpid(), "the task did not run in the cluster's worker"


async def test_an_external_tls_cluster_from_the_environment(
    tls_cluster: tuple[str, dict[str, Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    address, files = tls_cluster
    monkeypatch.setenv("CONCURRENCY_DASK_ADDRESS", address)
    monkeypatch.setenv("CONCURRENCY_DASK_TLS_CA_FILE", str(files["ca"]))
    monkeypatch.setenv("CONCURRENCY_DASK_TLS_CERT", str(files["cert"]))
    monkeypatch.setenv("CONCURRENCY_DASK_TLS_KEY", str(files["key"]))
    async with Concurrency(driver="dask", env_file=None) as concurrency:
        assert await concurrency.run({"a": lambda: 1, "b": lambda: 2}) == {"a": 1, "b": 2}


async def test_an_external_tls_cluster_refuses_other_certificates(
    tls_cluster: tuple[str, dict[str, Path]], tmp_path: Path
) -> None:
    address, _ = tls_cluster
    # Without certificates the driver refuses at construction; a raw client with a certificate that the
    # cluster's CA did not sign is refused by the scheduler.
    with pytest.raises(ConfigurationError, match="tls:// address, but no client certificate"):
        DaskDriver(DaskOptions(address=address))
    other = _write_certificates(tmp_path)
    stranger = DaskDriver(
        DaskOptions(
            address=address,
            security=Security(  # type: ignore[no-untyped-call]
                tls_ca_file=str(other["ca"]),
                tls_client_cert=str(other["cert"]),
                tls_client_key=str(other["key"]),
                require_encryption=True,
            ),
        )
    )
    with dask.config.set({"distributed.comm.timeouts.connect": "3s"}):
        concurrency = Concurrency(stranger, env_file=None)
        with pytest.raises(ConcurrencyError, match="cannot reach the dask scheduler"):
            await concurrency.run(lambda: "should not run")
        await concurrency.aclose()


# The scratch directory: distributed's default is a fixed path in the shared temp dir, reused if it exists and put
# first on sys.path of every process of the cluster. Another local user who makes it first can plant modules there.

PLANTED = "planted_by_a_stranger"
STRANGER_PLANTS = r"""
import os, sys

scratch = os.path.join(sys.argv[1], "dask-scratch-space")
os.makedirs(scratch, exist_ok=True)
os.chmod(scratch, 0o777)
with open(os.path.join(scratch, sys.argv[2] + ".py"), "w") as module:
    module.write("open(%r, 'w').close()\n" % os.path.join(sys.argv[1], "planted-module-ran"))
os.chmod(module.name, 0o666)
"""


@pytest.fixture
def shared_tmp(stranger_home: Path) -> Iterator[Path]:
    """A world-writable sticky directory standing for /tmp, as Dask's temporary-directory; uid 65534 plants first."""
    stranger_home.chmod(0o1777)
    result = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
         sys.executable, "-c", STRANGER_PLANTS, str(stranger_home), PLANTED],
        capture_output=True, cwd="/", check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    planted = stranger_home / "dask-scratch-space" / f"{PLANTED}.py"
    assert planted.stat().st_uid == NOBODY
    with dask.config.set({"temporary-directory": str(stranger_home)}):
        yield stranger_home


def _sees_the_planted_module() -> bool:
    import importlib.util

    return importlib.util.find_spec(PLANTED) is not None


async def test_the_embedded_clusters_scratch_directory_is_its_own(shared_tmp: Path) -> None:
    _needs_setpriv()
    driver = DaskDriver(workers=1)
    async with Concurrency(driver=driver, env_file=None) as concurrency:
        scratch = driver.scratch_directory
        assert scratch is not None
        info = os.stat(scratch)
        assert (info.st_uid, info.st_mode & 0o777) == (os.getuid(), 0o700)
        assert Path(scratch).parent == shared_tmp  # under Dask's temporary-directory, as distributed's would be
        assert not _sees_the_planted_module(), "the stranger's directory is on this process's sys.path"
        in_worker = await concurrency.run(
            lambda: __import__("importlib.util").util.find_spec("planted_by_a_stranger") is not None
        )
        assert not in_worker, "the stranger's directory is on the worker's sys.path"
        assert not [entry for entry in sys.path if entry.startswith(str(shared_tmp / "dask-scratch-space"))]
    assert not os.path.exists(scratch), "the scratch directory outlived the driver"
    assert not (shared_tmp / "planted-module-ran").exists()


async def test_distributeds_default_scratch_directory_would_serve_the_planted_module(shared_tmp: Path) -> None:
    # The control: a LocalCluster left to its default directory (the driver before this fix) puts the
    # stranger's directory first on this process's sys.path.
    _needs_setpriv()
    path = list(sys.path)
    try:
        async with distributed.LocalCluster(  # type: ignore[no-untyped-call]
            n_workers=1,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            scheduler_port=0,
            dashboard_address="127.0.0.1:0",  # 8787 may be taken (another cluster, or one closing)
            asynchronous=True,
        ):
            assert _sees_the_planted_module()
    finally:
        sys.path[:] = path
