"""The ListLosses answer, built once from the registry."""

from __future__ import annotations

import inspect

from lossd.losses import registry
from lossd.v1 import codec
from lossd.v1 import lossd_pb2 as pb


def build_catalog() -> pb.ListLossesResponse:
    """Every loss of the registry as a LossInfo message."""
    return pb.ListLossesResponse(losses=[_loss_info(spec) for spec in registry.LOSSES.values()])


def _loss_info(spec: registry.LossSpec) -> pb.LossInfo:
    info = pb.LossInfo(
        name=spec.name,
        required=spec.required_config(),
        state=spec.state,
        returns=spec.returns.value,
        doc=inspect.getdoc(spec.cls) or "",
    )
    codec.encode_values(spec.constructor_defaults(), info.defaults)
    for arg in spec.args:
        default = spec.arg_default(arg.name)
        msg = info.args.add(
            name=arg.name,
            kind=arg.kind.value,
            batch=arg.batch.value,
            grad=arg.grad if isinstance(arg.grad, tuple) else (arg.grad,),
            dtype=arg.dtype.value,
            required=default is inspect.Parameter.empty,
        )
        if default is not inspect.Parameter.empty:
            codec.encode_value(default, out=msg.default)
    return info
