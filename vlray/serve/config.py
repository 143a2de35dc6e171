"""Settings of the search service (``jobs/serve.py``)."""

from __future__ import annotations

import ipaddress
from dataclasses import asdict, dataclass, fields
from typing import Any

DEFAULT_HOST = "127.0.0.1"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def is_loopback(host: str) -> bool:
    """Whether a bind address only accepts connections from this machine."""
    if host.lower() in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ServeConfig:
    """Everything :func:`vlray.serve.create_app` needs; plain values so Ray can ship it.

    Attributes:
        index: The job's ``OUT/index`` folder (local path or ``s3://`` prefix).
        api_key: When set, every ``/api/*`` request must send it in the ``x-api-key`` header.
        reload_interval_s: Check ``manifest.json`` for a new index at most this often; 0 turns
            reloading off.
        max_upload_bytes: Largest accepted image upload (and request body).
        max_pixels: Largest accepted ``width * height`` of an uploaded image (header check,
            before any pixel is decoded).
        max_k: Largest ``k`` a request may ask for.
        max_offset: Largest paging ``offset``.
        max_text_chars: Longest text query.
        preload_models: Load the image and text encoders at start instead of on first use.
        model: Load the model from this folder or hub id instead of the one the index records
            (it must hold the same weights: the manifest's fingerprint is checked).
        allowed_hosts: ``Host`` header names the service answers (the port is ignored,
            ``*.example.com`` matches subdomains, ``*`` anything); others get 400, which stops
            DNS rebinding. None answers any host; ``jobs/serve.py`` sets the loopback names
            when it binds a loopback address.
        max_decodes: Image uploads decoded and encoded at once (each can take
            ``max_pixels * 3`` bytes and more).
        decode_wait_s: How long an upload waits for a decode slot before a 503 with
            ``Retry-After`` (0: never wait).
    """

    index: str
    api_key: str | None = None
    reload_interval_s: float = 10.0
    max_upload_bytes: int = 20 << 20
    max_pixels: int = 50_000_000
    max_k: int = 1000
    max_offset: int = 10_000
    max_text_chars: int = 1000
    preload_models: bool = False
    model: str | None = None
    allowed_hosts: tuple[str, ...] | None = None
    max_decodes: int = 2
    decode_wait_s: float = 5.0

    def __post_init__(self) -> None:
        if self.allowed_hosts is not None:
            hosts = (
                (self.allowed_hosts,) if isinstance(self.allowed_hosts, str) else self.allowed_hosts
            )
            object.__setattr__(self, "allowed_hosts", tuple(h.strip().lower() for h in hosts))
        if self.max_decodes < 1:
            raise ValueError(f"max_decodes must be >= 1, got {self.max_decodes}")
        if self.decode_wait_s < 0:
            raise ValueError(f"decode_wait_s must be >= 0, got {self.decode_wait_s}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (the Ray Serve deployment's constructor argument)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ServeConfig:
        """The inverse of :meth:`to_dict`; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown serve settings: {sorted(unknown)}")
        return cls(**values)
