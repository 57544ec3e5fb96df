"""The expert registry service: a FastAPI app that speaks the Hub protocol subset and expert search."""

from .app import app_from_env, create_app, serve
from .auth import create_token, list_tokens, revoke_token
from .settings import RegistrySettings

__all__ = ["RegistrySettings", "app_from_env", "create_app", "create_token", "list_tokens", "revoke_token", "serve"]
