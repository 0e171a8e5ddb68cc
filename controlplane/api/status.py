"""How the control plane's errors become gRPC statuses: one table for both APIs.

The most specific class listed wins (the table is searched along the error's method resolution
order). Messages go to the caller as they are: every error of ours names the broken rule and
quotes the input, and none quotes a secret.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final, NoReturn

import grpc

from controlplane.attest.base import AttestationError
from controlplane.ca.errors import CAError
from controlplane.federation.client import BundleFetchError
from controlplane.federation.relationship import FederationError
from controlplane.model import ModelError
from controlplane.store.errors import (
    EntryExistsError,
    EventsPrunedError,
    FederationExistsError,
    JoinTokenError,
    NotFoundError,
    StoreError,
)
from spiffecore import SpiffeError

STATUS_FOR: Final[Mapping[type[SpiffeError], grpc.StatusCode]] = MappingProxyType(
    {
        ModelError: grpc.StatusCode.INVALID_ARGUMENT,
        EntryExistsError: grpc.StatusCode.ALREADY_EXISTS,
        FederationExistsError: grpc.StatusCode.ALREADY_EXISTS,
        FederationError: grpc.StatusCode.INVALID_ARGUMENT,
        BundleFetchError: grpc.StatusCode.FAILED_PRECONDITION,
        NotFoundError: grpc.StatusCode.NOT_FOUND,
        JoinTokenError: grpc.StatusCode.PERMISSION_DENIED,
        EventsPrunedError: grpc.StatusCode.ABORTED,
        AttestationError: grpc.StatusCode.PERMISSION_DENIED,
        CAError: grpc.StatusCode.INVALID_ARGUMENT,
        StoreError: grpc.StatusCode.UNAVAILABLE,
        SpiffeError: grpc.StatusCode.INVALID_ARGUMENT,
    }
)


def status_for(error: SpiffeError) -> grpc.StatusCode:
    for kind in type(error).__mro__:
        code = STATUS_FOR.get(kind)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


async def abort_with(context: grpc.aio.ServicerContext[object, object], error: SpiffeError) -> NoReturn:
    """End the call with the status the table gives ``error``, and its message."""
    await context.abort(status_for(error), str(error))
    raise AssertionError("context.abort returned")  # pragma: no cover - abort always raises
