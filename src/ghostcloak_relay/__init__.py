"""GhostCloak Relay: a WebSocket relay that keeps a wallet's identity from the Midnight node."""

__version__ = "0.1.0"
