"""The configuration interface `wg` uses: the UAPI protocol (pure) and, beside it, its server."""

from wgmp.uapi.protocol import (
    IPC_ERROR_INVALID,
    IPC_ERROR_IO,
    IPC_ERROR_PORT_IN_USE,
    IPC_ERROR_PROTOCOL,
    IPC_ERROR_TOO_LARGE,
    IPC_ERROR_UNKNOWN,
    DeviceSnapshot,
    GetRequest,
    PeerSnapshot,
    RequestReader,
    SetRequest,
    UAPIError,
    format_errno,
    format_get,
    parse_request,
)

__all__ = [
    "IPC_ERROR_INVALID",
    "IPC_ERROR_IO",
    "IPC_ERROR_PORT_IN_USE",
    "IPC_ERROR_PROTOCOL",
    "IPC_ERROR_TOO_LARGE",
    "IPC_ERROR_UNKNOWN",
    "DeviceSnapshot",
    "GetRequest",
    "PeerSnapshot",
    "RequestReader",
    "SetRequest",
    "UAPIError",
    "format_errno",
    "format_get",
    "parse_request",
]
