"""`ddm-coordinator serve --dashboard HOST:PORT`: a read-only web page served by the coordinator
process itself, beside gRPC.

- ``data``: what the page shows, from ``coordinator.status.build_status`` and ``build_events``
  (the functions `status --json` and `events --json` print), nothing else;
- ``samples``: a grid of samples of each newly published ensemble, drawn once in the background;
- ``app``: the Starlette application (the page, its JSON, the grids, the login), with the
  headers that keep other sites from reading or framing it;
- ``server``: uvicorn in a thread of the serving process, and the settings `serve` checks.
"""
