"""GhostCloak Relay: a WebSocket relay that keeps a wallet's identity from the Midnight node."""

from . import native as _native

__version__ = "0.1.0"

#: True when the data plane runs compiled (see :mod:`.native`), False when pure Python.
NATIVE = _native.activate(__path__)
