"""Drop-in remote classes, one per catalog entry: `from lossd.client import NTXentLoss`.

Each takes the in-process constructor's arguments plus where to run, so switching a
lightly trainer is a change of import (and, if needed, a `server=` argument).
"""

from __future__ import annotations

import inspect
from typing import Any

from lossd.losses import registry

from .connection import LossClient
from .remote import RemoteLoss

_EXTRAS = (
    inspect.Parameter("server", inspect.Parameter.KEYWORD_ONLY, default=None),
    inspect.Parameter("client", inspect.Parameter.KEYWORD_ONLY, default=None),
    inspect.Parameter("session_id", inspect.Parameter.KEYWORD_ONLY, default=None),
    inspect.Parameter("token", inspect.Parameter.KEYWORD_ONLY, default=None),
    inspect.Parameter("seed", inspect.Parameter.KEYWORD_ONLY, default=None),
    inspect.Parameter("device", inspect.Parameter.KEYWORD_ONLY, default=None),
    inspect.Parameter("shared_bank", inspect.Parameter.KEYWORD_ONLY, default=None),
    inspect.Parameter("world_size", inspect.Parameter.KEYWORD_ONLY, default=1),
    inspect.Parameter("rank", inspect.Parameter.KEYWORD_ONLY, default=0),
    inspect.Parameter("attach_only", inspect.Parameter.KEYWORD_ONLY, default=False),
)


def dropin_class(spec: registry.LossSpec) -> type[RemoteLoss]:
    """The remote twin of one loss class."""
    constructor = spec.constructor

    def __init__(
        self: RemoteLoss,
        *args: Any,
        server: str | None = None,
        client: LossClient | None = None,
        session_id: str | None = None,
        token: str | None = None,
        seed: int | None = None,
        device: str | None = None,
        shared_bank: str | None = None,
        world_size: int = 1,
        rank: int = 0,
        attach_only: bool = False,
        **kwargs: Any,
    ) -> None:
        try:
            config = dict(constructor.bind(*args, **kwargs).arguments)
        except TypeError as error:
            raise TypeError(f"{spec.name}: {error}") from None
        owned = client is None
        connection = LossClient(server, token=token) if client is None else client
        try:
            RemoteLoss.__init__(
                self,
                connection,
                spec.name,
                session_id=session_id,
                seed=seed,
                device=device,
                shared_bank=shared_bank,
                world_size=world_size,
                rank=rank,
                attach_only=attach_only,
                config=config,
            )
        except BaseException:
            if owned:
                connection.close()
            raise
        self._owns_client = owned

    def forward(self: RemoteLoss, *args: Any, **kwargs: Any) -> Any:
        return RemoteLoss.forward(self, *args, **kwargs)

    forward.__signature__ = spec.forward  # type: ignore[attr-defined]
    forward.__doc__ = spec.cls.forward.__doc__

    def close(self: RemoteLoss, delete_session: bool = False) -> None:
        RemoteLoss.close(self, delete_session)
        if getattr(self, "_owns_client", False):
            self.client.close()

    __init__.__signature__ = constructor.replace(  # type: ignore[attr-defined]
        parameters=[
            inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
            *constructor.parameters.values(),
            *_EXTRAS,
        ]
    )
    doc = (
        f"Remote {spec.name}: lossd computes it on a server.\n\n"
        f'Takes {spec.name}\'s constructor arguments, plus `server` ("host:port"; default '
        "$LOSSD_SERVER or localhost:50051) or `client` (a LossClient), and optionally "
        "`session_id`, `token`, `seed`, `device`, `shared_bank`, `world_size`/`rank` "
        "and `attach_only` (see LossClient.loss).\n\n" + (inspect.getdoc(spec.cls) or "")
    )
    return type(
        spec.name,
        (RemoteLoss,),
        {
            "__init__": __init__,
            "forward": forward,
            "close": close,
            "__doc__": doc,
            "__module__": "lossd.client",
            "__qualname__": spec.name,
        },
    )


#: The drop-in classes by name.
DROPIN_CLASSES: dict[str, type[RemoteLoss]] = {
    name: dropin_class(spec) for name, spec in registry.LOSSES.items()
}
