"""`blip2 serve`: an HTTP API (FastAPI) for caption, ask, match and search, with a web page at `/`."""

from blip2.serve.app import create_app
from blip2.serve.limits import ServerSettings

__all__ = ["ServerSettings", "create_app"]
