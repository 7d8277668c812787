"""`blip2 serve`: an HTTP API (FastAPI) for caption, ask, match and search, with a web page at `/`."""

from blip2.serve.app import ServerSettings, create_app

__all__ = ["ServerSettings", "create_app"]
