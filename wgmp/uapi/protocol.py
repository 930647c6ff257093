"""The configuration protocol `wg` speaks over /var/run/wireguard/IFACE.sock, without I/O.

A connection carries requests one after another:

    get=1\\n\\n                           -> the device state, then errno=0\\n\\n
    set=1\\n key=value\\n ... \\n           -> errno=N\\n\\n

`RequestReader` turns the bytes of one connection into `GetRequest`, `SetRequest` and
`UAPIError` values; `format_get` and `format_errno` produce the replies. The server around it
reads, feeds, applies and writes. Everything here follows wireguard-go's device/uapi.go as
shipped in Debian bookworm (0.0.20220316, built with Go 1.19), byte for byte where the
reference is observable.

Error codes. A reply carries a negated errno, as wireguard-go's ipc package defines it:

    code   name (ipc)          wireguard-go returns it for
    ----   -----------------   -------------------------------------------------------------
      -5   IpcErrorIO          a set line longer than 65535 bytes (bufio.Scanner ErrTooLong)
     -22   IpcErrorInvalid     an unknown device or peer key; any value that does not parse or
                               is out of range (keys, ports, fwmark, endpoint, prefix,
                               keepalive); a "true"-only flag with another value;
                               protocol_version other than "1"; "get=1\\n" followed by a byte
                               other than "\\n"; creating a peer beyond 65536 peers; an
                               endpoint zone that names no interface
     -71   IpcErrorProtocol    a set line without "="
     -98   IpcErrorPortInUse   binding listen_port, or setting fwmark on the sockets, failed
     -55   IpcErrorUnknown     any other failure (never reached in practice)
     -12   (wgmp only)         a set request of more than `max_set_lines` lines; wireguard-go
                               has no such limit (ENOMEM: we refuse to hold more)

An operation line other than exactly "get=1\\n" or "set=1\\n" gets no reply at all: wireguard-go
logs it and closes the connection (`UAPIError.hangup`).

One extension, wgmp's own: "wgmp-stats=1\\n\\n" is a `StatsRequest`, answered with the
Prometheus text of `wgmp stats` and then the end of the connection (no errno line: the reader
closes after it). wireguard-go hangs up on that line like on any other unknown operation, which
is how `wgmp stats` tells the two apart. Every other byte sequence is read exactly as before.

Applying a set request. wireguard-go applies each line as it reads it, so a failure half-way
leaves the earlier lines applied (a bad line after "listen_port=1111" still changes the port;
checked against the real daemon). wgmp does better: `RequestReader` yields a `SetRequest` only
once every line of it has parsed, so the control plane can apply it as a whole. What can fail
only while applying (EADDRINUSE on the bind, an unknown endpoint zone, too many peers) is the
control plane's to report with the codes above.

Stream handling, where wgmp differs from wireguard-go on purpose:
- wireguard-go reads set lines through a bufio.Scanner that reads ahead, so a request sent
  right behind a set request in the same write is lost; wgmp answers it.
- After a failed set line wireguard-go replies at once and then reads the rest of that request
  as operation lines, which ends the connection; wgmp replies at once too, then skips to the
  request's blank line and carries on with the next request.
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network
from typing import Final

from wgmp.protocol.constants import KEY_LEN
from wgmp.protocol.errors import ConfigError

__all__ = [
    "IPC_ERROR_INVALID",
    "IPC_ERROR_IO",
    "IPC_ERROR_PORT_IN_USE",
    "IPC_ERROR_PROTOCOL",
    "IPC_ERROR_TOO_LARGE",
    "IPC_ERROR_UNKNOWN",
    "MAX_LINE_LENGTH",
    "MAX_SET_LINES",
    "AddAllowedIP",
    "BeginPeer",
    "DeviceSnapshot",
    "GetRequest",
    "Operation",
    "PeerSnapshot",
    "RemoveAllowedIP",
    "RemovePeer",
    "ReplaceAllowedIPs",
    "ReplacePeers",
    "Request",
    "RequestReader",
    "SetEndpoint",
    "SetFwmark",
    "SetListenPort",
    "SetPersistentKeepalive",
    "SetPresharedKey",
    "SetPrivateKey",
    "SetRequest",
    "StatsRequest",
    "UAPIError",
    "UpdateOnly",
    "format_endpoint",
    "format_compact_prefixes",
    "format_errno",
    "format_get",
    "format_allowed_lines",
    "format_peer",
    "format_peer_head",
    "format_snapshot_peer",
    "format_prefix",
    "parse_request",
]

# Reply codes, as written after "errno=" (wireguard-go's ipc/uapi_unix.go; Linux numbers).
IPC_ERROR_IO: Final = -5  # -EIO
IPC_ERROR_PROTOCOL: Final = -71  # -EPROTO
IPC_ERROR_INVALID: Final = -22  # -EINVAL
IPC_ERROR_PORT_IN_USE: Final = -98  # -EADDRINUSE
IPC_ERROR_UNKNOWN: Final = -55  # wireguard-go's "ENOANO"
IPC_ERROR_TOO_LARGE: Final = -12  # -ENOMEM, wgmp only (see the module docstring)

# A set line may hold at most this many bytes before its "\n" (a "\r" counts): bufio.Scanner's
# 64 KiB buffer must hold the line and its newline. Checked against the real daemon.
MAX_LINE_LENGTH: Final = 65535
# At most this many lines in one set request. About 100 bytes are held per parsed line (96 for
# 10,000 peers x 10 IPv4 allowed IPs, measured with tracemalloc), so this bounds one request
# near 100-150 MB; the most peers a daemon holds (65,536) with 10 allowed IPs each is 850,000
# lines. A request of 100,000 such peers is refused whole (docs/many-peers.md).
MAX_SET_LINES: Final = 1 << 20

# A dotted quad as netip.ParseAddr takes it: four decimal parts, no leading zeros (each part
# <= 255 is checked apart). One regular expression match, not a split and a test per part:
# the bulk of a large `wg setconf` is IPv4 allowed IPs (perf/bench_control.py).
_PART: Final = rb"(0|[1-9][0-9]{0,2})"
_DOTTED_QUAD: Final = re.compile(rb"\.".join([_PART] * 4))
_DOTTED_QUAD_TEXT: Final = re.compile(_DOTTED_QUAD.pattern.decode())
# A whole `allowed_ip=` line with a dotted quad and a plain length (strconv.Atoi's other
# forms, "+8", "-0" and "08", take the general path); `_OCTET` reads its numbers.
_OCTET: Final = {str(value).encode(): value for value in range(256)}
_ALLOWED_IPV4: Final = re.compile(
    rb"allowed_ip=" + _DOTTED_QUAD.pattern + rb"/([0-9]{1,3})"
).fullmatch
_OP_LINE_MAX: Final = 6  # len(b"get=1\n")
# wgmp's extension (see the module docstring); only bytes that are a prefix of it are held
# beyond _OP_LINE_MAX.
_STATS_OPERATION: Final = b"wgmp-stats=1\n"


class UAPIError(ConfigError):
    """A request that gets an error reply: `code` is the value to write after "errno=".

    With `hangup` set, wireguard-go writes no reply and closes the connection instead.
    """

    def __init__(self, code: int, detail: str, *, hangup: bool = False) -> None:
        super().__init__(f"IPC error {code}: {detail}")
        self.code = code
        self.detail = detail
        self.hangup = hangup


# ---------------------------------------------------------------------------------------------
# Requests and the operations of a set request.


@dataclass(frozen=True, slots=True)
class GetRequest:
    """`get=1`: reply with `format_get` of the current state."""


@dataclass(frozen=True, slots=True)
class SetPrivateKey:
    """`private_key=`: the key, clamped as wireguard-go stores it; None removes it (all zeros).

    A peer whose public key matches the new key's public key is removed by wireguard-go.
    """

    private_key: bytes | None = field(repr=False)


@dataclass(frozen=True, slots=True)
class SetListenPort:
    """`listen_port=`: rebind to this port (0: any). A failed bind is IPC_ERROR_PORT_IN_USE."""

    port: int


@dataclass(frozen=True, slots=True)
class SetFwmark:
    """`fwmark=`: the mark for outgoing packets; 0 removes it. Failure: IPC_ERROR_PORT_IN_USE."""

    fwmark: int


@dataclass(frozen=True, slots=True)
class ReplacePeers:
    """`replace_peers=true`: remove every peer now; the peer sections that follow add new ones."""


@dataclass(frozen=True, slots=True)
class BeginPeer:
    """`public_key=`: the following operations apply to this peer, created if it is new.

    A section whose key is the device's own public key is parsed but ignored (wireguard-go's
    "dummy" peer). Creating more than 65536 peers is IPC_ERROR_INVALID in wireguard-go.
    """

    public_key: bytes


@dataclass(frozen=True, slots=True)
class UpdateOnly:
    """`update_only=true`: if this section created the peer, drop it and ignore the section."""


@dataclass(frozen=True, slots=True)
class RemovePeer:
    """`remove=true`: remove the peer; the rest of its section is parsed but ignored."""


@dataclass(frozen=True, slots=True)
class SetPresharedKey:
    """`preshared_key=`: 32 bytes; all zeros is WireGuard's "no preshared key"."""

    preshared_key: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class SetEndpoint:
    """`endpoint=`: `a.b.c.d:port` or `[v6]:port`, IP literals only.

    wireguard-go's bind parses with netip.ParseAddrPort and never resolves names (`wg`
    resolves them before it writes the line). A v6 address may carry a zone (`fe80::1%eth0`,
    kept in `address.scope_id`): wireguard-go accepts an interface name or a number and
    answers IPC_ERROR_INVALID for a name it cannot find; resolving it is the caller's job.
    """

    address: IPv4Address | IPv6Address
    port: int

    @property
    def host(self) -> str:
        """The address as text, with its zone: what `socket.getaddrinfo` takes."""
        return str(self.address)


@dataclass(frozen=True, slots=True)
class SetPersistentKeepalive:
    """`persistent_keepalive_interval=`: seconds, 0 turns it off.

    Turning it on (from 0) sends a keepalive at once, when the section ends.
    """

    interval: int


@dataclass(frozen=True, slots=True)
class ReplaceAllowedIPs:
    """`replace_allowed_ips=true`: drop the peer's allowed IPs now."""


@dataclass(frozen=True, slots=True)
class AddAllowedIP:
    """`allowed_ip=prefix`: route the prefix to this peer (taking it from any other peer).

    `packed` is the address as sent (4 or 16 bytes), not masked; wireguard-go masks when it
    inserts (`network`). Packed, not an address object: one costs ~1 us to make and as much
    to pack again, 0.2 s of a `wg setconf` of 100,000 prefixes, and the allowed-IPs tables
    of control and of every worker take packed addresses.
    """

    packed: bytes
    cidr: int

    @property
    def address(self) -> IPv4Address | IPv6Address:
        return _address_of(self.packed)

    @property
    def network(self) -> IPv4Network | IPv6Network:
        return ip_network((self.address, self.cidr), strict=False)


@dataclass(frozen=True, slots=True)
class RemoveAllowedIP:
    """`allowed_ip=-prefix`: remove the prefix if this peer holds it (newer wg and kernels).

    Debian bookworm's wireguard-go 0.0.20220316 answers IPC_ERROR_INVALID to the "-" form;
    wgmp accepts it as later wireguard-go and the kernel do. `packed` as in `AddAllowedIP`.
    """

    packed: bytes
    cidr: int

    @property
    def address(self) -> IPv4Address | IPv6Address:
        return _address_of(self.packed)

    @property
    def network(self) -> IPv4Network | IPv6Network:
        return ip_network((self.address, self.cidr), strict=False)


def _address_of(packed: bytes) -> IPv4Address | IPv6Address:
    return IPv4Address(packed) if len(packed) == 4 else IPv6Address(packed)


Operation = (
    SetPrivateKey
    | SetListenPort
    | SetFwmark
    | ReplacePeers
    | BeginPeer
    | UpdateOnly
    | RemovePeer
    | SetPresharedKey
    | SetEndpoint
    | SetPersistentKeepalive
    | ReplaceAllowedIPs
    | AddAllowedIP
    | RemoveAllowedIP
)


@dataclass(frozen=True, slots=True)
class SetRequest:
    """`set=1`: every line parsed, in order. `protocol_version=1` lines leave no operation.

    Device operations come before the first `BeginPeer`; each peer's follow its `BeginPeer`.
    """

    operations: tuple[Operation, ...]


@dataclass(frozen=True, slots=True)
class StatsRequest:
    """`wgmp-stats=1` (wgmp only): reply with the Prometheus text, then close the connection."""


Request = GetRequest | SetRequest | StatsRequest


# ---------------------------------------------------------------------------------------------
# Values, parsed as wireguard-go (Go 1.19's strconv and net/netip) parses them.


def _invalid(detail: str) -> UAPIError:
    return UAPIError(IPC_ERROR_INVALID, detail)


def _parse_key(value: bytes, what: str) -> bytes:
    # hex.DecodeString (either case) into exactly 32 bytes.
    if len(value) != 2 * KEY_LEN:
        raise _invalid(f"failed to set {what}: hex string does not fit the slice")
    try:
        return binascii.unhexlify(value)
    except binascii.Error:
        raise _invalid(f"failed to set {what}: invalid hex") from None


def _parse_uint(value: bytes, bits: int, what: str) -> int:
    # strconv.ParseUint(value, 10, bits): ASCII digits only, leading zeros allowed.
    if not value.isdigit():
        raise _invalid(f"failed to parse {what}: {value!r}")
    digits = value.lstrip(b"0") or b"0"
    if len(digits) > 20 or (number := int(digits)) >= 1 << bits:
        raise _invalid(f"failed to parse {what}: {value!r} out of range")
    return number


def _parse_true(value: bytes, what: str) -> None:
    if value != b"true":
        raise _invalid(f"failed to set {what}, invalid value: {value!r}")


def _packed_ipv4(text: bytes) -> bytes:
    """A dotted quad as netip.ParseAddr takes it, packed (~0.6 us; checking part by part
    and making an address object cost ~2 us, 0.2 s of a 100,000-prefix `wg setconf`)."""
    match = _DOTTED_QUAD.fullmatch(text)
    try:
        if match is None:
            raise ValueError(text)
        return bytes(map(int, match.groups()))  # ValueError for a part above 255
    except ValueError:
        raise _invalid(f"invalid IP address {text!r}") from None


def _parse_addr(text: bytes, *, allow_zone: bool) -> IPv4Address | IPv6Address:
    # netip.ParseAddr: strict dotted quad (no leading zeros) or IPv6 text, a zone only on v6.
    if b":" not in text:
        return IPv4Address(_packed_ipv4(text))
    try:
        string = text.decode("ascii")
        if not allow_zone and "%" in string:
            raise ValueError("zone in prefix")
        return IPv6Address(string)
    except ValueError:  # UnicodeDecodeError and AddressValueError are ValueErrors
        raise _invalid(f"invalid IP address {text!r}") from None


def _parse_endpoint(value: bytes) -> SetEndpoint:
    # netip.ParseAddrPort: split at the last ":", brackets iff IPv6.
    host, colon, port = value.rpartition(b":")
    if not colon or not host or not port:
        raise _invalid(f"failed to set endpoint {value!r}: not an ip:port")
    bracketed = host[:1] == b"["
    if bracketed:
        if len(host) < 2 or host[-1:] != b"]":
            raise _invalid(f"failed to set endpoint {value!r}: missing ]")
        host = host[1:-1]
    number = _parse_uint(port, 16, "endpoint port")
    address = _parse_addr(host, allow_zone=True)
    if bracketed != (address.version == 6):
        raise _invalid(f"failed to set endpoint {value!r}: brackets iff IPv6")
    return SetEndpoint(address, number)


def _parse_prefix(value: bytes) -> tuple[bytes, int]:
    # netip.ParsePrefix (Go 1.19): "/" required, no zone, bits by strconv.Atoi (so "+8", "08"
    # and "-0" pass, as they do on the real daemon), 0 <= bits <= 32 or 128. Returns the
    # packed address (as sent, unmasked) and the length.
    text, slash, bits = value.rpartition(b"/")
    if not slash:
        raise _invalid(f"failed to set allowed ip: no '/' in {value!r}")
    if b":" not in text:
        # IPv4, the bulk of large configurations: packed straight from the text.
        packed = _packed_ipv4(text)
        max_bits = 32
    else:
        packed = _parse_addr(text, allow_zone=False).packed
        max_bits = 128
    if bits.isdigit() and len(bits) <= 3:  # the common form, checked below like the others
        cidr = int(bits)
    else:
        digits = bits[1:] if bits[:1] in (b"+", b"-") else bits
        if not digits.isdigit():
            raise _invalid(f"failed to set allowed ip: bad bits after slash in {value!r}")
        digits = digits.lstrip(b"0") or b"0"
        cidr = int(digits) if len(digits) <= 3 else 1 << 16
        if bits[:1] == b"-" and cidr:
            cidr = -1
    if not 0 <= cidr <= max_bits:
        raise _invalid(f"failed to set allowed ip: prefix length out of range in {value!r}")
    return packed, cidr


def _private_key(value: bytes) -> SetPrivateKey:
    key = _parse_key(value, "private_key")
    if not any(key):
        return SetPrivateKey(None)
    clamped = bytearray(key)
    clamped[0] &= 248
    clamped[31] = (clamped[31] & 127) | 64
    return SetPrivateKey(bytes(clamped))


def _allowed_ip(value: bytes) -> AddAllowedIP | RemoveAllowedIP:
    if value[:1] == b"-":
        return RemoveAllowedIP(*_parse_prefix(value[1:]))
    return AddAllowedIP(*_parse_prefix(value))


def _protocol_version(value: bytes) -> None:
    if value != b"1":
        raise _invalid(f"invalid protocol version: {value!r}")


def _replace_peers(value: bytes) -> ReplacePeers:
    _parse_true(value, "replace_peers")
    return ReplacePeers()


def _update_only(value: bytes) -> UpdateOnly:
    _parse_true(value, "update only")
    return UpdateOnly()


def _remove(value: bytes) -> RemovePeer:
    _parse_true(value, "remove")
    return RemovePeer()


def _replace_allowed_ips(value: bytes) -> ReplaceAllowedIPs:
    _parse_true(value, "replace allowedips")
    return ReplaceAllowedIPs()


_Handler = Callable[[bytes], Operation | None]

_DEVICE_KEYS: Final[dict[bytes, _Handler]] = {
    b"private_key": _private_key,
    b"listen_port": lambda v: SetListenPort(_parse_uint(v, 16, "listen_port")),
    b"fwmark": lambda v: SetFwmark(_parse_uint(v, 32, "fwmark")),
    b"replace_peers": _replace_peers,
}

_PEER_KEYS: Final[dict[bytes, _Handler]] = {
    b"update_only": _update_only,
    b"remove": _remove,
    b"preshared_key": lambda v: SetPresharedKey(_parse_key(v, "preshared key")),
    b"endpoint": _parse_endpoint,
    b"persistent_keepalive_interval": lambda v: SetPersistentKeepalive(
        _parse_uint(v, 16, "persistent keepalive interval")
    ),
    b"replace_allowed_ips": _replace_allowed_ips,
    b"allowed_ip": _allowed_ip,
    b"protocol_version": _protocol_version,
}


class _SetParser:
    """The lines of one set request, checked one by one as wireguard-go's IpcSetOperation."""

    __slots__ = ("operations", "_keys")

    def __init__(self) -> None:
        self.operations: list[Operation] = []
        self._keys = _DEVICE_KEYS

    @property
    def in_peer_section(self) -> bool:
        return self._keys is _PEER_KEYS

    def line(self, line: bytes) -> None:
        key, equals, value = line.partition(b"=")
        if not equals:
            raise UAPIError(IPC_ERROR_PROTOCOL, f"failed to parse line {line!r}")
        if key == b"public_key":
            self._keys = _PEER_KEYS
            self.operations.append(BeginPeer(_parse_key(value, "peer public key")))
            return
        handler = self._keys.get(key)
        if handler is None:
            kind = "device" if self._keys is _DEVICE_KEYS else "peer"
            raise _invalid(f"invalid UAPI {kind} key: {key!r}")
        operation = handler(value)
        if operation is not None:
            self.operations.append(operation)

    def request(self) -> SetRequest:
        return SetRequest(tuple(self.operations))


# ---------------------------------------------------------------------------------------------
# The stream of one connection.

_OPERATION, _GET_NEWLINE, _SET, _SKIP, _CLOSED, _STATS_NEWLINE = range(6)


class RequestReader:
    """Splits the bytes of one UAPI connection into requests, in the order they arrive.

    `feed` takes whatever `recv` returned and gives back the requests it completed: a
    `GetRequest`, a `SetRequest` (all of its lines parsed), a `StatsRequest`, or a `UAPIError`
    for a request that gets an error reply (or, with `hangup`, none: close the connection).
    After a hangup or a `StatsRequest` the reader ignores all further input. Memory is bounded
    by one line (`MAX_LINE_LENGTH`) plus the parsed lines of one set request (`max_set_lines`).
    """

    def __init__(self, *, max_set_lines: int = MAX_SET_LINES) -> None:
        self._max_set_lines = max_set_lines
        # The unconsumed tail: never a whole line. Kept as chunks so that a line arriving a
        # byte at a time is not copied again for every byte.
        self._tail: list[bytes] = []
        self._tail_length = 0
        self._state = _OPERATION
        self._parser: _SetParser | None = None
        self._lines = 0
        self._in_long_line = False  # dropping the rest of an over-long line

    @property
    def buffered(self) -> int:
        """Bytes held for a line not yet complete (at most MAX_LINE_LENGTH)."""
        return self._tail_length

    @property
    def closed(self) -> bool:
        """True once the connection should be closed (after a hangup)."""
        return self._state == _CLOSED

    def feed(self, data: bytes) -> list[Request | UAPIError]:
        """Consume `data`; return the requests it completed, oldest first."""
        if self._state == _CLOSED or not data:
            return []
        out: list[Request | UAPIError] = []
        if self._state in (_SET, _SKIP) and b"\n" not in data:
            if not self._in_long_line:
                self._tail.append(bytes(data))
                self._tail_length += len(data)
                if self._tail_length > MAX_LINE_LENGTH:
                    self._too_long(out)
                    self._tail, self._tail_length = [], 0
            return out
        self._tail.append(bytes(data))
        buffer = b"".join(self._tail)
        position = self._run(buffer, 0, out)
        self._tail = [buffer[position:]] if position < len(buffer) else []
        self._tail_length = len(buffer) - position
        return out

    def end_of_input(self) -> list[Request | UAPIError]:
        """The peer shut down its side: finish what wireguard-go would finish.

        A set request cut short still ends as if its blank line had come (bufio.Scanner hands
        out a final unterminated line, and wireguard-go then replies). A partial "get=1" or
        operation line is dropped without a reply.
        """
        out: list[Request | UAPIError] = []
        if self._state == _SET and not self._in_long_line:
            line = b"".join(self._tail)
            if line.endswith(b"\r"):
                line = line[:-1]
            if line:
                self._set_line(line, out)
            if self._state == _SET:
                self._end_set(out)
        self._tail, self._tail_length = [], 0
        self._state = _CLOSED
        return out

    def _run(self, buffer: bytes, position: int, out: list[Request | UAPIError]) -> int:
        end = len(buffer)
        while position < end:
            state = self._state
            if state == _OPERATION:
                newline = buffer.find(b"\n", position, position + _OP_LINE_MAX)
                stats_end = position + len(_STATS_OPERATION)
                if newline < 0 and _STATS_OPERATION.startswith(buffer[position:stats_end]):
                    if end < stats_end:
                        return position  # perhaps the extension: wait for the rest
                    newline = stats_end - 1
                if newline < 0:
                    if end - position >= _OP_LINE_MAX:
                        self._hangup(buffer[position : position + _OP_LINE_MAX], out)
                        return end
                    return position
                operation = buffer[position:newline]
                position = newline + 1
                if operation == b"set=1":
                    self._state = _SET
                    self._parser = _SetParser()
                    self._lines = 0
                elif operation == b"get=1":
                    self._state = _GET_NEWLINE
                elif operation == _STATS_OPERATION[:-1]:
                    self._state = _STATS_NEWLINE
                else:
                    self._hangup(operation, out)
                    return end
            elif state == _GET_NEWLINE:
                byte = buffer[position]
                position += 1
                self._state = _OPERATION
                if byte == 0x0A:
                    out.append(GetRequest())
                else:
                    out.append(_invalid(f"trailing character in UAPI get: {bytes([byte])!r}"))
            elif state == _STATS_NEWLINE:
                if buffer[position] != 0x0A:
                    self._hangup(_STATS_OPERATION + buffer[position : position + 1], out)
                    return end
                out.append(StatsRequest())
                self._state = _CLOSED  # the reply ends the connection
                return end
            else:  # _SET or _SKIP: one line at a time
                if state == _SET and not self._in_long_line:
                    last = buffer.rfind(b"\n", position)
                    if last >= 0:
                        position = self._set_lines(buffer, position, last, out)
                        continue
                newline = buffer.find(b"\n", position)
                if newline < 0:
                    if end - position > MAX_LINE_LENGTH:
                        self._too_long(out)
                        return end
                    if self._in_long_line:
                        return end
                    return position
                line = buffer[position:newline]
                position = newline + 1
                if self._in_long_line:
                    self._in_long_line = False
                    continue
                if len(line) > MAX_LINE_LENGTH:
                    self._too_long(out)
                    self._in_long_line = False
                    continue
                if line[-1:] == b"\r":
                    line = line[:-1]
                if not line:
                    if state == _SET:
                        self._end_set(out)
                    self._state = _OPERATION
                elif state == _SET:
                    self._set_line(line, out)
        return position

    def _set_lines(
        self, buffer: bytes, position: int, last: int, out: list[Request | UAPIError]
    ) -> int:
        """The lines of a set request from `position` to the newline at `last`, as the loop
        in `_run` would take them one by one, without its search and dispatch per line
        (a `wg setconf` of 10,000 peers is 130,000 lines); returns where it stopped: after
        the last of them, or after the line that ended the request or failed it."""
        parser = self._parser
        assert parser is not None
        operations, room = parser.operations, self._max_set_lines - self._lines
        for line in buffer[position:last].split(b"\n"):
            position += len(line) + 1
            # An IPv4 allowed IP in a peer's section, most lines of a large request, in one
            # match and two dict lookups: ~1 us a line less than through `_SetParser.line`
            # (tests/uapi/test_protocol.py holds it to netip's rules). Anything else it looks
            # like (a part above 255, a length written otherwise) takes the general path,
            # which says what is wrong.
            match = _ALLOWED_IPV4(line)
            if match is not None and room > 0 and parser.in_peer_section:
                a, b, c, d, bits = match.groups()
                try:
                    packed = bytes((_OCTET[a], _OCTET[b], _OCTET[c], _OCTET[d]))
                    cidr = _OCTET[bits]
                except KeyError:
                    pass
                else:
                    if cidr <= 32:
                        operations.append(AddAllowedIP(packed, cidr))
                        self._lines += 1
                        room -= 1
                        continue
            if len(line) > MAX_LINE_LENGTH:
                self._too_long(out)
                self._in_long_line = False
                return position
            if line[-1:] == b"\r":
                line = line[:-1]
            if not line:
                self._end_set(out)
                return position
            self._set_line(line, out)
            if self._state != _SET:
                return position
            room = self._max_set_lines - self._lines
        return position

    def _set_line(self, line: bytes, out: list[Request | UAPIError]) -> None:
        assert self._parser is not None
        self._lines += 1
        try:
            if self._lines > self._max_set_lines:
                raise UAPIError(
                    IPC_ERROR_TOO_LARGE, f"set request longer than {self._max_set_lines} lines"
                )
            self._parser.line(line)
        except UAPIError as error:
            out.append(error)
            self._parser = None
            self._state = _SKIP

    def _end_set(self, out: list[Request | UAPIError]) -> None:
        assert self._parser is not None
        out.append(self._parser.request())
        self._parser = None
        self._state = _OPERATION

    def _too_long(self, out: list[Request | UAPIError]) -> None:
        # In _SKIP the line is dropped silently; in _SET it fails the request, as
        # bufio.Scanner's ErrTooLong makes wireguard-go answer EIO.
        if self._state == _SET and not self._in_long_line:
            out.append(UAPIError(IPC_ERROR_IO, "failed to read input: token too long"))
            self._parser = None
            self._state = _SKIP
        self._in_long_line = True

    def _hangup(self, operation: bytes, out: list[Request | UAPIError]) -> None:
        out.append(
            UAPIError(IPC_ERROR_PROTOCOL, f"invalid UAPI operation: {operation!r}", hangup=True)
        )
        self._state = _CLOSED


def parse_request(data: bytes | str | Iterable[bytes | str]) -> Request:
    """Parse exactly one request: its bytes, or its lines (newlines added).

    Raises `UAPIError` as `RequestReader` would report it; an unfinished or invalid operation
    line raises one with `hangup` set. Given several requests, raises ValueError.
    """
    if isinstance(data, str):
        data = data.encode()
    elif not isinstance(data, bytes | bytearray | memoryview):
        data = b"".join((line.encode() if isinstance(line, str) else line) + b"\n" for line in data)
    reader = RequestReader()
    items = reader.feed(bytes(data))
    if not reader.closed:
        items += reader.end_of_input()
    requests = []
    for item in items:
        if isinstance(item, UAPIError):
            raise item
        requests.append(item)
    if not requests:
        raise UAPIError(IPC_ERROR_PROTOCOL, "incomplete request", hangup=True)
    if len(requests) > 1:
        raise ValueError(f"{len(requests)} requests where one was expected")
    return requests[0]


# ---------------------------------------------------------------------------------------------
# Replies.


@dataclass(frozen=True, slots=True)
class PeerSnapshot:
    """One peer as `get` reports it. `allowed_ips` are written as given (see format_prefix)."""

    public_key: bytes
    preshared_key: bytes | None = field(default=None, repr=False)
    endpoint: tuple[str, int] | None = None
    last_handshake_time_sec: int = 0  # Unix time of the last handshake; 0 if never
    last_handshake_time_nsec: int = 0
    tx_bytes: int = 0
    rx_bytes: int = 0
    persistent_keepalive_interval: int = 0
    allowed_ips: Sequence[str] = ()


@dataclass(frozen=True, slots=True)
class DeviceSnapshot:
    """The device as `get` reports it, filled by the control plane.

    `listen_port` is the port actually bound (0 while no socket is open).
    """

    private_key: bytes | None = field(default=None, repr=False)
    listen_port: int = 0
    fwmark: int = 0
    peers: Sequence[PeerSnapshot] = ()


def _key_hex(key: bytes) -> str:
    if len(key) != KEY_LEN:
        raise ValueError(f"a key is {KEY_LEN} bytes, not {len(key)}")
    return key.hex()


def _go_address(address: IPv4Address | IPv6Address) -> str:
    # netip.Addr.String() of the address without its zone (the bind keeps the zone apart).
    if address.version == 4:
        return str(address)
    bare = IPv6Address(int(address))
    mapped = bare.ipv4_mapped
    if mapped is not None:
        return f"::ffff:{mapped}"
    return bare.compressed


def format_endpoint(host: str, port: int) -> str:
    """An endpoint as wireguard-go's Linux bind prints it: `1.2.3.4:5`, `[2001:db8::1]:5`.

    IPv6 is printed in RFC 5952 form, a v4-mapped address as `::ffff:1.2.3.4`, and a zone
    (`%eth0`) is dropped, as wireguard-go's LinuxSocketEndpoint.DstToString does.
    """
    if ":" not in host:
        # A canonical dotted quad, as every endpoint held is, prints as it is (~0.5 us where
        # an address object costs ~5, for each peer of a `wg show`).
        match = _DOTTED_QUAD_TEXT.fullmatch(host)
        if match is not None and all(len(part) < 3 or part <= "255" for part in match.groups()):
            return f"{host}:{port}"
        return f"{IPv4Address(host)}:{port}"
    address = IPv6Address(host)
    return f"[{_go_address(address)}]:{port}"


def format_compact_prefixes(compacts: Iterable[bytes]) -> list[str]:
    """`format_prefix` of each prefix in the allowed-IPs table's compact form
    (AllowedIPs.compact_entries_for_peer: a packed host address, or a packed masked address
    and its length in one more byte). IPv4 by %-formatting the bytes: 10,000 peers x 10
    prefixes in ~30 ms where address objects took ~0.4 s (`wg show` with many peers)."""
    return [
        _HOST4 % tuple(compact) if len(compact) == 4 else _compact_prefix(compact)
        for compact in compacts
    ]


_HOST4: Final = "%d.%d.%d.%d/32"
_PREFIX4: Final = "%d.%d.%d.%d/%d"


def _compact_prefix(compact: bytes) -> str:
    size = len(compact)
    if size == 5:
        return _PREFIX4 % tuple(compact)
    if size == 16:
        return f"{_go_address(IPv6Address(compact))}/128"
    return f"{_go_address(IPv6Address(compact[:16]))}/{compact[16]}"


def format_prefix(address: IPv4Address | IPv6Address | str, cidr: int) -> str:
    """A prefix as Go's netip.Prefix.String: `10.0.0.0/8`, `2001:db8::/32`, `::ffff:1.2.3.4/128`.

    The address is printed as given: pass it masked, as the allowed-IPs table holds it.
    """
    if isinstance(address, str):
        address = IPv6Address(address) if ":" in address else IPv4Address(address)
    return f"{_go_address(address)}/{cidr}"


def format_get(snapshot: DeviceSnapshot) -> bytes:
    """The whole reply to `get=1`, in wireguard-go's order, ending with `errno=0\\n\\n`.

    Device: private_key (unless none), listen_port (unless 0), fwmark (unless 0). Then per peer:
    public_key, preshared_key (64 zeros if none), protocol_version=1, endpoint (unless none),
    last_handshake_time_sec, last_handshake_time_nsec, tx_bytes, rx_bytes,
    persistent_keepalive_interval, one allowed_ip line each. wireguard-go lists peers in Go map
    order (random); `wg` sorts them itself, so any order will do.
    """
    lines: list[str] = []
    add = lines.append
    if snapshot.private_key is not None and any(snapshot.private_key):
        add(f"private_key={_key_hex(snapshot.private_key)}")
    if snapshot.listen_port:
        add(f"listen_port={snapshot.listen_port}")
    if snapshot.fwmark:
        add(f"fwmark={snapshot.fwmark}")
    for peer in snapshot.peers:
        add(format_snapshot_peer(peer))
    add("errno=0\n\n")
    return "\n".join(lines).encode()


_ZERO_KEY: Final = bytes(KEY_LEN)


def format_peer_head(
    public_key: bytes, preshared_key: bytes | None, endpoint: tuple[str, int] | None
) -> str:
    """A peer's first lines in a `get` reply, up to its endpoint (with its newline)."""
    where = "" if endpoint is None else f"endpoint={format_endpoint(*endpoint)}\n"
    return (
        f"public_key={_key_hex(public_key)}\n"
        f"preshared_key={_key_hex(preshared_key or _ZERO_KEY)}\n"
        f"protocol_version=1\n{where}"
    )


def format_allowed_lines(allowed_ips: Sequence[str]) -> str:
    """A peer's allowed_ip lines, each after a newline ("" for none)."""
    return "\nallowed_ip=" + "\nallowed_ip=".join(allowed_ips) if allowed_ips else ""


def format_peer(
    head: str,
    last_handshake_time_sec: int,
    last_handshake_time_nsec: int,
    tx_bytes: int,
    rx_bytes: int,
    persistent_keepalive_interval: int,
    allowed_lines: str,
) -> str:
    """One peer's lines of a `get` reply, joined by "\n", with no newline after the last:
    `head` and `allowed_lines` as `format_peer_head` and `format_allowed_lines` make them
    (the control plane keeps those from one get to the next: they seldom change)."""
    # One string per peer, not one per line: with 10,000 peers the per-line appends were a
    # third of the reply's cost.
    return (
        f"{head}last_handshake_time_sec={last_handshake_time_sec}\n"
        f"last_handshake_time_nsec={last_handshake_time_nsec}\n"
        f"tx_bytes={tx_bytes}\nrx_bytes={rx_bytes}\n"
        f"persistent_keepalive_interval={persistent_keepalive_interval}{allowed_lines}"
    )


def format_snapshot_peer(peer: PeerSnapshot) -> str:
    """`format_peer` of a `PeerSnapshot`."""
    return format_peer(
        format_peer_head(peer.public_key, peer.preshared_key, peer.endpoint),
        peer.last_handshake_time_sec,
        peer.last_handshake_time_nsec,
        peer.tx_bytes,
        peer.rx_bytes,
        peer.persistent_keepalive_interval,
        format_allowed_lines(peer.allowed_ips),
    )


def format_errno(code: int) -> bytes:
    """The reply to a set request: `errno=0\\n\\n` on success, else e.g. `errno=-22\\n\\n`.

    `code` is written as given: pass 0 or one of the negative IPC_ERROR_* values.
    """
    return b"errno=%d\n\n" % code
