"""`qmedsam serve`: the nnInteractive v2 HTTP protocol on a CPU, so 3D Slicer's and napari's nnInteractive clients
segment with qmedsam. `wire` checks the client's packed arrays, `session` is one user's interactive state (no
HTTP), `leases` the claimed sessions and their timeouts, `app` the FastAPI routes."""
