"""``python -m ghostcloak_relay.healthcheck``: the container's HEALTHCHECK.

Asks this host's relay for ``/health`` on ``PORT`` and exits 0 only if it answers
``"status": "ok"``. With ``RELAY_TLS_CERT`` set it speaks HTTPS to 127.0.0.1 without
verifying the certificate (it is the relay's own, reached over loopback). Standard
library only, so it costs little every interval.
"""

from __future__ import annotations

import json
import os
import ssl
import sys
import urllib.request


def main() -> int:
    port = os.environ.get("PORT", "8443")
    ctx: ssl.SSLContext | None = None
    scheme = "http"
    if os.environ.get("RELAY_TLS_CERT"):
        scheme = "https"
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(
            f"{scheme}://127.0.0.1:{port}/health", timeout=4, context=ctx
        ) as resp:
            ok = json.loads(resp.read()).get("status") == "ok"
    except (OSError, ValueError):
        ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
