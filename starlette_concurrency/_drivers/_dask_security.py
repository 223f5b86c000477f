"""The dask driver's checks of its address and TLS settings, made at construction rather than at the first connect."""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from .._checks import quote
from .._exceptions import ConfigurationError

__all__ = [
    "ADDRESS",
    "SECURE_SCHEMES",
    "TLS_CA",
    "TLS_CERT",
    "TLS_KEY",
    "check_address",
    "check_cryptography",
    "check_security",
    "security_from_environment",
]

ADDRESS = "DaskOptions.address / CONCURRENCY_DASK_ADDRESS"
SECURE_SCHEMES = ("tls://", "wss://")  # the transports distributed encrypts
TLS_CA, TLS_CERT, TLS_KEY = "CONCURRENCY_DASK_TLS_CA_FILE", "CONCURRENCY_DASK_TLS_CERT", "CONCURRENCY_DASK_TLS_KEY"
_INSTALL_HINT = "pip install 'starlette-concurrency[dask]'"


def check_address(address: str) -> str:
    """Refuse, at construction, an address that distributed would only reject when connecting."""
    from distributed.comm.addressing import parse_address
    from distributed.comm.registry import get_backend

    if not isinstance(address, str) or not address.strip():
        raise ConfigurationError(f"{ADDRESS} must be a scheduler address such as tcp://host:8786, got {quote(address)}")
    address = address.strip()
    try:
        scheme, location = parse_address(address, strict=False)
        backend: Any = get_backend(scheme)
        try:
            host, port = backend.get_address_host_port(location)
        except NotImplementedError:  # not an IP transport (inproc://): nothing more to check here
            return address
    except (ValueError, TypeError, ImportError) as exc:
        raise ConfigurationError(
            f"{ADDRESS} is not a dask scheduler address: {quote(address)} ({quote(str(exc), 80)}); "
            "expected e.g. tcp://host:8786"
        ) from None
    if not host or not 0 < port < 65536:
        raise ConfigurationError(f"{ADDRESS} needs a host and a port from 1 to 65535, got {quote(address)}")
    return address


def security_from_environment(distributed: ModuleType, variables: Mapping[str, str]) -> Any:
    """Build the client's `Security` from the `CONCURRENCY_DASK_TLS_*` files, or ``None`` if none is set."""
    paths = {name: variables.get(name, "").strip() or None for name in (TLS_CA, TLS_CERT, TLS_KEY)}
    if not any(paths.values()):
        return None
    for name in (TLS_CA, TLS_CERT):
        if paths[name] is None:
            raise ConfigurationError(f"{name} must be set too: a TLS client needs {TLS_CA} and {TLS_CERT}")
    for name, path in paths.items():
        if path is not None and not os.path.isfile(path):
            raise ConfigurationError(f"{name} names no readable file: {quote(path)}")
    ca, cert, key = paths[TLS_CA], paths[TLS_CERT], paths[TLS_KEY]
    try:
        context = ssl.create_default_context(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(f"{TLS_CA} ({ca!r}) holds no usable CA certificate: {exc}") from None
    try:
        context.load_cert_chain(cert, key)  # type: ignore[arg-type]
    except (OSError, ssl.SSLError) as exc:
        named = f"{TLS_CERT} ({cert!r})" + (f" and {TLS_KEY} ({key!r})" if key else "")
        raise ConfigurationError(f"{named} hold no certificate with its private key: {exc}") from None
    return distributed.Security(tls_ca_file=ca, tls_client_cert=cert, tls_client_key=key, require_encryption=True)


def check_security(security: Any, address: str | None, origin: str) -> None:
    """Refuse TLS settings that cannot work with the address, before anything connects."""
    if address is None:
        raise ConfigurationError(
            f"{origin} secures a connection to an external cluster, but no {ADDRESS} is set; "
            "the embedded cluster makes certificates of its own"
        )
    try:
        security.get_connection_args("client")
    except (OSError, ValueError, ssl.SSLError) as exc:
        raise ConfigurationError(f"{origin} cannot build a TLS client: {exc}") from None
    if security.require_encryption and not address.startswith(SECURE_SCHEMES):
        raise ConfigurationError(
            f"{origin} requires encryption, but {ADDRESS} {quote(address)} is not a tls:// address"
        )


def check_cryptography() -> None:
    try:
        import cryptography  # noqa: F401  (what `Security.temporary()` makes the embedded cluster's certificates with)
    except ImportError as exc:
        raise ConfigurationError(
            f"the 'dask' driver's embedded cluster needs the 'cryptography' package for its TLS certificates "
            f"({exc}); {_INSTALL_HINT}, or set {ADDRESS} to an external cluster"
        ) from exc
