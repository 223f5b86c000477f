"""The dask driver refuses a bad address or unusable TLS settings at construction, naming the argument or variable."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from distributed.security import Security

from starlette_concurrency import Concurrency, ConfigurationError, DaskOptions
from starlette_concurrency._drivers.dask import DaskDriver

TLS_VARIABLES = ("CONCURRENCY_DASK_TLS_CA_FILE", "CONCURRENCY_DASK_TLS_CERT", "CONCURRENCY_DASK_TLS_KEY")


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CONCURRENCY_DASK_ADDRESS", *TLS_VARIABLES):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def pem(tmp_path: Path) -> dict[str, Path]:
    """A self-signed certificate, its key, and a second key that does not belong to it, as files."""
    security = Security.temporary()  # type: ignore[no-untyped-call]
    other = Security.temporary()  # type: ignore[no-untyped-call]
    files = {
        "ca": tmp_path / "ca.pem",
        "cert": tmp_path / "cert.pem",
        "key": tmp_path / "key.pem",
        "other_key": tmp_path / "other-key.pem",
        "garbage": tmp_path / "garbage.pem",
    }
    files["ca"].write_text(security.tls_ca_file)
    files["cert"].write_text(security.tls_client_cert)
    files["key"].write_text(security.tls_client_key)
    files["other_key"].write_text(other.tls_client_key)
    files["garbage"].write_text("not a certificate\n")
    return files


@pytest.mark.parametrize(
    "address",
    [
        "not a url",
        "tcp://host:notaport",
        "http://scheduler.internal:8786",
        "tcp://scheduler.internal",
        "tcp://scheduler.internal:0",
        "tcp://scheduler.internal:70000",
        "tcp://:8786",
    ],
)
def test_a_bad_address_in_the_environment_is_refused_at_construction(
    address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONCURRENCY_DASK_ADDRESS", address)
    with pytest.raises(ConfigurationError, match="CONCURRENCY_DASK_ADDRESS"):
        Concurrency(driver="dask", env_file=None)
    with pytest.raises(ConfigurationError, match=r"DaskOptions\.address"):
        DaskDriver(DaskOptions(address=address))


@pytest.mark.parametrize("address", ["tcp://10.1.2.3:8786", "127.0.0.1:8786", "tcp://[::1]:8786", "scheduler:8786"])
def test_a_good_address_is_accepted_without_connecting(address: str) -> None:
    assert DaskDriver(DaskOptions(address=address)).address == address


def test_tls_files_from_the_environment_make_the_clients_security(
    pem: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONCURRENCY_DASK_TLS_CA_FILE", str(pem["ca"]))
    monkeypatch.setenv("CONCURRENCY_DASK_TLS_CERT", str(pem["cert"]))
    monkeypatch.setenv("CONCURRENCY_DASK_TLS_KEY", str(pem["key"]))
    driver = DaskDriver(DaskOptions(address="tls://127.0.0.1:8786"))
    assert isinstance(driver.security, Security)
    security: Any = driver.security
    assert (security.tls_ca_file, security.tls_client_cert, security.tls_client_key) == (
        str(pem["ca"]),
        str(pem["cert"]),
        str(pem["key"]),
    )
    assert security.require_encryption


def test_tls_files_and_the_address_can_come_from_a_dotenv_file(pem: dict[str, Path], tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text(
        "CONCURRENCY_DASK_ADDRESS=tls://127.0.0.1:8786\n"
        f"CONCURRENCY_DASK_TLS_CA_FILE={pem['ca']}\n"
        f"CONCURRENCY_DASK_TLS_CERT={pem['cert']}\n"
        f"CONCURRENCY_DASK_TLS_KEY={pem['key']}\n"
    )
    driver = Concurrency(driver="dask", env_file=env_file)._runtime.driver("dask")
    assert isinstance(driver, DaskDriver)
    assert driver.address == "tls://127.0.0.1:8786"
    security: Any = driver.security
    assert (security.tls_ca_file, security.tls_client_cert, security.tls_client_key) == (
        str(pem["ca"]),
        str(pem["cert"]),
        str(pem["key"]),
    )


@pytest.mark.parametrize(
    ("variables", "error"),
    [
        ({"CONCURRENCY_DASK_TLS_CERT": "cert"}, "CONCURRENCY_DASK_TLS_CA_FILE must be set too"),
        ({"CONCURRENCY_DASK_TLS_CA_FILE": "ca"}, "CONCURRENCY_DASK_TLS_CERT must be set too"),
        ({"CONCURRENCY_DASK_TLS_KEY": "key"}, "CONCURRENCY_DASK_TLS_CA_FILE must be set too"),
        (
            {"CONCURRENCY_DASK_TLS_CA_FILE": "/no/such/ca.pem", "CONCURRENCY_DASK_TLS_CERT": "cert"},
            "CONCURRENCY_DASK_TLS_CA_FILE names no readable file: '/no/such/ca.pem'",
        ),
        (
            {"CONCURRENCY_DASK_TLS_CA_FILE": "ca", "CONCURRENCY_DASK_TLS_CERT": "/no/such/cert.pem"},
            "CONCURRENCY_DASK_TLS_CERT names no readable file",
        ),
        (
            {
                "CONCURRENCY_DASK_TLS_CA_FILE": "ca",
                "CONCURRENCY_DASK_TLS_CERT": "cert",
                "CONCURRENCY_DASK_TLS_KEY": "/",
            },
            "CONCURRENCY_DASK_TLS_KEY names no readable file",
        ),
        (
            {"CONCURRENCY_DASK_TLS_CA_FILE": "garbage", "CONCURRENCY_DASK_TLS_CERT": "cert"},
            "CONCURRENCY_DASK_TLS_CA_FILE .* holds no usable CA certificate",
        ),
        (
            {"CONCURRENCY_DASK_TLS_CA_FILE": "ca", "CONCURRENCY_DASK_TLS_CERT": "garbage"},
            "CONCURRENCY_DASK_TLS_CERT .* hold no certificate with its private key",
        ),
        (
            {"CONCURRENCY_DASK_TLS_CA_FILE": "ca", "CONCURRENCY_DASK_TLS_CERT": "cert"},  # the key is in neither
            "CONCURRENCY_DASK_TLS_CERT .* hold no certificate with its private key",
        ),
        (
            {
                "CONCURRENCY_DASK_TLS_CA_FILE": "ca",
                "CONCURRENCY_DASK_TLS_CERT": "cert",
                "CONCURRENCY_DASK_TLS_KEY": "other_key",
            },
            "CONCURRENCY_DASK_TLS_CERT .* and CONCURRENCY_DASK_TLS_KEY .* hold no certificate with its private key",
        ),
    ],
)
def test_unusable_tls_files_are_refused_naming_the_variable(
    variables: dict[str, str], error: str, pem: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONCURRENCY_DASK_ADDRESS", "tls://127.0.0.1:8786")
    for name, value in variables.items():
        monkeypatch.setenv(name, str(pem.get(value, value)))
    with pytest.raises(ConfigurationError, match=error):
        Concurrency(driver="dask", env_file=None)


def test_tls_settings_must_fit_the_address(pem: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    security = Security(  # type: ignore[no-untyped-call]
        tls_ca_file=str(pem["ca"]),
        tls_client_cert=str(pem["cert"]),
        tls_client_key=str(pem["key"]),
        require_encryption=True,
    )
    with pytest.raises(ConfigurationError, match=r"requires encryption, but .* 'tcp://127.0.0.1:8786' is not a tls://"):
        DaskDriver(DaskOptions(address="tcp://127.0.0.1:8786", security=security))
    with pytest.raises(ConfigurationError, match=r"no DaskOptions\.address / CONCURRENCY_DASK_ADDRESS is set"):
        DaskDriver(DaskOptions(security=security))
    for encrypted in ("tls://127.0.0.1:8786", "wss://127.0.0.1:8786"):
        assert DaskDriver(DaskOptions(address=encrypted, security=security)).security is security
    with pytest.raises(ConfigurationError, match=r"security must be a distributed\.Security, not dict"):
        DaskDriver(DaskOptions(address="tls://127.0.0.1:8786", security={"tls_ca_file": str(pem["ca"])}))
    with pytest.raises(ConfigurationError, match="tls:// address, but no client certificate is configured"):
        DaskDriver(DaskOptions(address="tls://127.0.0.1:8786"))
    with pytest.raises(ConfigurationError, match="tls:// address, but no client certificate is configured"):
        DaskDriver(DaskOptions(address="tls://127.0.0.1:8786", security=Security()))  # type: ignore[no-untyped-call]
    # The TLS variables without an address would go unused: say so rather than start an embedded cluster.
    monkeypatch.setenv("CONCURRENCY_DASK_TLS_CA_FILE", str(pem["ca"]))
    monkeypatch.setenv("CONCURRENCY_DASK_TLS_CERT", str(pem["cert"]))
    monkeypatch.setenv("CONCURRENCY_DASK_TLS_KEY", str(pem["key"]))
    with pytest.raises(ConfigurationError, match=r"CONCURRENCY_DASK_TLS_CA_FILE .* no DaskOptions\.address"):
        Concurrency(driver="dask", env_file=None)


def test_without_cryptography_the_embedded_cluster_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cryptography", None)  # what `import cryptography` does when not installed
    with pytest.raises(ConfigurationError, match=r"needs the 'cryptography' package .*starlette-concurrency\[dask\]"):
        DaskDriver()
    assert DaskDriver(DaskOptions(address="tcp://127.0.0.1:8786")).address  # an external cluster does not
