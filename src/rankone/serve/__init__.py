"""Serving patched models: arms (stable, candidate, base, pins), routing, per-row low-rank deltas,
continuous batching, metrics and a dashboard behind the OpenAI API.

    from rankone.serve import Server, ServeSettings, create_app
    server = Server(load_model(path), ServeSettings(port=8000), registry="registry.db").start()
    uvicorn.run(create_app(server), host="127.0.0.1", port=8000)

`rankone serve` does exactly this. The registry is the server's only state.
"""

from rankone.serve.server import Server
from rankone.serve.settings import ServeSettings


def create_app(server: Server):  # noqa: ANN201 - FastAPI is imported only when an app is made
    from rankone.serve.app import create_app as make

    return make(server)


__all__ = ["Server", "ServeSettings", "create_app"]
