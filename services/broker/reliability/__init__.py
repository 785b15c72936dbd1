"""The reliability record as the broker serves it (docs/reliability.md): ``api`` and
``view`` answer ``GET /v1/providers/{id}/reliability`` from the record in Redis. The
meter writes the record (``services/meter/reliability``); the broker's engine reads the
scores every few seconds (``World.refresh_reliability``)."""
