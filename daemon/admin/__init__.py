"""The operations plane: the REST admin API and Prometheus metrics, served by uvicorn on a thread of its own.

``ops`` holds what the API does, run on the daemon's event loop (through ``bridge``) so it sees the same
state the data plane does; ``app`` is the FastAPI application; ``server`` runs it on the admin listeners.
"""
