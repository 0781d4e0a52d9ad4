"""The search service: ``imram serve`` answers text, image and explain queries over HTTP."""

from imram.serving.app import create_app, serve
from imram.serving.engine import Limits, RequestError, SearchService

__all__ = ["Limits", "RequestError", "SearchService", "create_app", "serve"]
