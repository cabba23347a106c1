"""The lossd server: sessions of stateful losses behind lossd.v1.LossService."""

from .app import LossdServer, create_server
from .config import ServerConfig

__all__ = ["LossdServer", "ServerConfig", "create_server"]
