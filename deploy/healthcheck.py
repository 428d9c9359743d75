"""Container health check: ``python /opt/parley/healthcheck.py [PATH] [PORT]``.

GETs ``http://<PARLEY_HOST>:<PORT><PATH>`` (defaults ``/healthz`` and ``PARLEY_PORT`` or 8080; a
wildcard host means the loopback address) and exits 0 on a 2xx answer, 1 otherwise. Used by the
image's HEALTHCHECK (``/healthz``), by compose for readiness (``/readyz``) and for the worker's
metrics port (``/metrics 9100``). Standard library only: the image has no curl.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

TIMEOUT_S = 4.0


def main(argv: list[str]) -> int:
    path = argv[1] if len(argv) > 1 else "/healthz"
    port = argv[2] if len(argv) > 2 else os.environ.get("PARLEY_PORT", "8080")
    host = os.environ.get("PARLEY_HOST", "127.0.0.1")
    if host in ("", "0.0.0.0"):  # noqa: S104 (a wildcard bind: probe the loopback instead)
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    url = f"http://{host}:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:  # noqa: S310 (fixed http URL)
            return 0 if 200 <= response.status < 300 else 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"healthcheck: {path}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
