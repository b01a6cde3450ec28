"""GhostCloak Relay benchmark suite: ``python -m bench`` (see ``bench/README.md``).

Side by side in one run, on one machine: a direct connection to a fast JSON-RPC echo
upstream, nginx as the reference transparent proxy, the relay's plain ``WS /rpc`` and its
envelope ``WS /relay``. Each variant is measured in interleaved rounds and reported as
medians: CPU time of the proxy process per request/response pair (the main figure),
pairs per second, latency (and latency added over ``direct``), generator cost, and
memory per idle session.
"""
