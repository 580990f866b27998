"""Server settings: one frozen dataclass, validated on creation; CLI flags map 1:1 to fields."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from tandem.errors import TandemError


@dataclass(frozen=True)
class ServeSettings:
    host: str = "127.0.0.1"  # loopback unless told otherwise: nothing else on the network can connect
    port: int = 8000
    api_key: str | None = None  # when set, every route but /health and the page needs `Authorization: Bearer KEY`
    max_body_bytes: int = 4 * 1024 * 1024
    model_name: str | None = None  # the name clients use; default: the model directory's name
    allowed_origins: tuple[str, ...] = ()  # browser origins besides the server's own, e.g. "http://localhost:3000"
    log_level: str = "info"
    max_queue: int = 64  # requests waiting for their first token beyond this get 429 with Retry-After

    def __post_init__(self) -> None:
        if isinstance(self.allowed_origins, list):
            object.__setattr__(self, "allowed_origins", tuple(self.allowed_origins))
        if not isinstance(self.host, str) or not self.host:
            raise TandemError("--host must be a host name or IP address, e.g. 127.0.0.1")
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise TandemError(f"--port {self.port} is out of range: use 1..65535 (0 = any free port)")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key.strip()):
            raise TandemError("--api-key is empty: give a secret string or leave the flag out")
        if not isinstance(self.max_body_bytes, int) or self.max_body_bytes < 1024:
            raise TandemError(f"--max-body-bytes {self.max_body_bytes} is too small: use at least 1024")
        if not isinstance(self.max_queue, int) or self.max_queue < 1:
            raise TandemError(f"--max-queue {self.max_queue} is too small: use at least 1")
        if self.model_name is not None and not self.model_name.strip():
            raise TandemError("--model-name is empty: give a name or leave the flag out")
        for origin in self.allowed_origins:
            if not origin.startswith(("http://", "https://")) or origin.endswith("/"):
                raise TandemError(f"allowed origin {origin!r} must look like http://host:port (no trailing slash)")

    @property
    def loopback(self) -> bool:
        """Bound to this machine only (then Host headers must name it too: DNS-rebinding defence)."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False
