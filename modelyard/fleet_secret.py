"""The header that carries the fleet secret to containers: only routers, agents and trusted zero-hop
clients hold the secret, and every container (Triton, ours) refuses calls without it.

Triton's `--grpc-restricted-protocol=...:KEY=VALUE` checks the header `triton-grpc-protocol-KEY` (measured
on 2.51: its refusal names it); our container and the router check the same header, so one header serves
every container.
"""

FLEET_SECRET_KEY = "modelyard-fleet-secret"
FLEET_SECRET_HEADER = f"triton-grpc-protocol-{FLEET_SECRET_KEY}"
