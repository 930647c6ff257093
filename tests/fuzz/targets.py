"""Coverage-guided fuzz targets for wgmp's parsers, run with atheris (libFuzzer for Python).

    python -m tests.fuzz.targets TARGET [libFuzzer options] [CORPUS_DIR ... | CRASH_FILE]

TARGET is one of `TARGETS`. Each target feeds the fuzzer's bytes to one parser and lets only
the project's declared error types pass (wgmp.protocol.errors.ProtocolError for what the
network sends, ConfigError and its subclass wgmp.uapi.protocol.UAPIError for configuration);
any other exception (IndexError, TypeError, struct.error, AssertionError, ...) is a finding:
atheris prints the traceback, writes the input to `crash-<sha1>` (or under
`-artifact_prefix=`) and exits non-zero. Given a crash file instead of a corpus directory,
the target runs that one input: the way to reproduce a finding (docs/fuzzing.md).

- `messages`: the four message parsers, the transport opener, the cookie checks, and control's
  sans-I/O handshake receiver (`Interface._receive_handshake`, with mac1 made valid when the
  input asks, so that the fuzzer gets past it to the Noise code).
- `uapi`: `RequestReader` fed in fuzzer-chosen chunks, `end_of_input`, `parse_request`.
- `inner`: an in-memory worker (as tests/dataplane/test_worker.py builds one) receiving
  properly sealed transport messages whose plaintexts are the fuzzer's bytes, then writing them
  to its TUN through the TCP coalescer. Nothing at all may raise there: a worker drops and
  counts what it cannot use.
- `coalesce`: `coalesce()` on lists of whole IP packets (the worker's contract: the IP length
  field equals the packet's length), checked against the reference re-segmenter.
- `allowedips`: inserts, removals and lookups of fuzzer-made prefixes in every accepted form,
  checked against a linear model.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

import atheris

with atheris.instrument_imports(include=["wgmp"]):
    from wgmp.control.interface import Interface
    from wgmp.dataplane.coalesce import coalesce
    from wgmp.dataplane.worker import ROLE_CURRENT, Worker
    from wgmp.ipc.channel import Channel
    from wgmp.ipc.keyslots import KeySlots
    from wgmp.protocol import messages
    from wgmp.protocol.allowedips import AllowedIPs
    from wgmp.protocol.constants import LABEL_MAC1, MAC_LEN
    from wgmp.protocol.cookie import CookieChecker, CookieGenerator
    from wgmp.protocol.crypto import DH_GENERATE, HASH, MAC
    from wgmp.protocol.errors import ConfigError, ProtocolError
    from wgmp.protocol.noise import StaticIdentity
    from wgmp.protocol.transport import open_transport, seal_transport
    from wgmp.stats.block import StatsBlock
    from wgmp.uapi.protocol import RequestReader, UAPIError, parse_request

__all__ = ["TARGETS", "main"]


# ---------------------------------------------------------------------------------------------
# messages


class _Random(random.Random):
    """Seeded randomness with what control asks of it (`random`, `getrandbits`)."""


_RNG = _Random(1)
_INTERFACE = Interface(KeySlots.create(64), _RNG)
_INTERFACE.set_private_key(DH_GENERATE(_RNG), now=0.0)
_OUR_PUBLIC = _INTERFACE.identity.public_key  # type: ignore[union-attr]
_PEER_PRIVATE = DH_GENERATE(_RNG)
_PEER_PUBLIC = StaticIdentity.from_private_key(_PEER_PRIVATE).public_key
_INTERFACE.peer(_PEER_PUBLIC, now=0.0)
_MAC1_KEY = HASH(LABEL_MAC1 + _OUR_PUBLIC)
_TRANSPORT_KEY = bytes(range(32))
_SOURCE = ("192.0.2.2", 51821)


def _with_mac1(data: bytes) -> bytes:
    """`data` with a valid mac1 for our interface, where a mac1 fits."""
    if len(data) < 2 * MAC_LEN:
        return data
    body = data[: -2 * MAC_LEN]
    return body + MAC(_MAC1_KEY, body) + data[-MAC_LEN:]


def fuzz_messages(data: bytes) -> None:
    if not data:
        return
    mode, data = data[0], data[1:]
    messages.message_type(data)
    for parse in (
        messages.parse_initiation,
        messages.parse_response,
        messages.parse_cookie_reply,
        messages.parse_transport_header,
    ):
        with contextlib.suppress(ProtocolError):
            parse(data)
    with contextlib.suppress(ProtocolError):
        open_transport(_TRANSPORT_KEY, data)
    checker = CookieChecker(_OUR_PUBLIC)
    checker.check_mac1(data)
    checker.check_mac2(data, b"\x01" * 6, now=0.0)
    if mode & 1:
        data = _with_mac1(data)
    if mode & 2:
        _INTERFACE.note_backlog(1 << 20, 0.0)  # under load: cookie replies and rate limits
    now = 1000.0 + (mode >> 2)
    with contextlib.suppress(ProtocolError):
        _INTERFACE._receive_handshake(data, _SOURCE, now, time.time_ns(), None)
    _INTERFACE.under_load_until = 0.0
    _INTERFACE.datagrams.clear()
    _INTERFACE.commands.clear()


def _message_seeds() -> list[bytes]:
    rng = _Random(2)
    generator = CookieGenerator(_OUR_PUBLIC)
    peer = StaticIdentity.from_private_key(_PEER_PRIVATE)
    from wgmp.protocol.noise import Handshake

    handshake = Handshake(peer, _OUR_PUBLIC)
    initiation = handshake.create_initiation(sender_index=7, unix_time_ns=1, rng=rng)
    initiation_bytes = generator.add_macs(initiation.pack(), now=0.0)
    response = messages.Response(9, 7, bytes(32), bytes(16)).pack()
    cookie = messages.CookieReply(7, bytes(24), bytes(32)).pack()
    transport = seal_transport(_TRANSPORT_KEY, 5, 0, b"\x45" + bytes(19), 1420)
    return [b"\x00" + m for m in (initiation_bytes, response, cookie, transport)] + [
        b"\x01" + initiation_bytes,
        b"\x03" + initiation_bytes,
    ]


# ---------------------------------------------------------------------------------------------
# uapi

_UAPI_ERRORS = (UAPIError,)


def fuzz_uapi(data: bytes) -> None:
    provider = atheris.FuzzedDataProvider(data)
    cuts = provider.ConsumeIntListInRange(provider.ConsumeIntInRange(0, 8), 1, 64)
    stream = provider.ConsumeBytes(provider.remaining_bytes())
    reader = RequestReader(max_set_lines=64)
    position = 0
    for cut in [*cuts, len(stream)]:
        for item in reader.feed(stream[position : position + cut]):
            _check_uapi_item(item)
        position += cut
        if position >= len(stream):
            break
    if position < len(stream):
        for item in reader.feed(stream[position:]):
            _check_uapi_item(item)
    assert reader.buffered <= 65535 + 64, f"reader holds {reader.buffered} bytes"
    for item in reader.end_of_input():
        _check_uapi_item(item)
    with contextlib.suppress(UAPIError):
        try:
            parse_request(stream)
        except ValueError as err:  # several requests where one was expected: documented
            if "requests where one was expected" not in str(err) and not isinstance(
                err, ConfigError
            ):
                raise


def _check_uapi_item(item: object) -> None:
    if isinstance(item, UAPIError):
        assert isinstance(item.code, int) and item.code < 0, item


def _uapi_seeds() -> list[bytes]:
    key = "a" * 64
    return [
        b"\x00get=1\n\n",
        b"\x00set=1\nprivate_key=" + key.encode() + b"\nlisten_port=51820\nfwmark=0\n"
        b"replace_peers=true\npublic_key=" + key.encode() + b"\nendpoint=[fe80::1%lo]:1\n"
        b"allowed_ip=10.0.0.0/8\nallowed_ip=-fd00::/64\npersistent_keepalive_interval=25\n"
        b"preshared_key=" + key.encode() + b"\nprotocol_version=1\nreplace_allowed_ips=true\n"
        b"update_only=true\nremove=true\n\n",
        b"\x00wgmp-stats=1\n\n",
        b"\x00set=1\r\nlisten_port=1\r\n\r\nget=1\n\n",
    ]


# ---------------------------------------------------------------------------------------------
# inner packets through an in-memory worker

_THEIRS4 = bytes([198, 51, 100, 2])
_THEIRS6 = bytes.fromhex("fd0000ee000000000000000000000002")
_OURS4 = bytes([198, 51, 100, 1])
_OWNED_INDEX = 0x0700  # low byte 0: owned by worker 0 (indextable.py)
_RECEIVE_KEY = bytes(range(32, 64))
_ENDPOINT = ("192.0.2.2", 51820)
_PKTINFO = (socket.IPPROTO_IP, 8, bytes(12))


class _FakeSocket:
    def sendmsg(self, buffers: list[bytes], ancillary: list[Any], flags: int, address: Any) -> int:
        return sum(len(b) for b in buffers)


class _WorkerRig:
    def __init__(self) -> None:
        self.tun_ours, self.tun_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        os.set_blocking(self.tun_ours.fileno(), False)
        self.tun_theirs.setblocking(False)
        self.control, worker_end = socket.socketpair()
        self.control.setblocking(False)
        self.worker = Worker(
            0,
            self.tun_ours.fileno(),
            {4: _FakeSocket()},  # type: ignore[dict-item]
            Channel(worker_end),
            KeySlots.create(8),
            StatsBlock.create(),
            vnet_hdr=True,
        )
        self.worker._set_peer(1, list(_ENDPOINT), [[_THEIRS4, 32], [_THEIRS6, 128]])
        slot = self.worker.keyslots.publish(
            local_index=_OWNED_INDEX,
            remote_index=9,
            peer_id=1,
            is_initiator=False,
            created=time.monotonic(),
            send_key=bytes(32),
            receive_key=_RECEIVE_KEY,
        )
        self.worker._install(slot, ROLE_CURRENT, time.monotonic())
        self.counter = 0

    def drain(self) -> None:
        for sock in (self.tun_theirs, self.control):
            with contextlib.suppress(BlockingIOError):
                while sock.recv(1 << 17):
                    pass


_RIG: _WorkerRig | None = None


def _shape(packet: bytearray, mode: int) -> bytes:
    """Point the fuzzer's packet at the allowed source (mode bit 0) and make its IP length
    field say its real length (bit 1) or lie by a small amount (bit 2), so that most inputs
    pass the worker's early checks and reach the coalescer."""
    if not packet:
        return b""
    version = packet[0] >> 4
    if mode & 1:
        if version == 4 and len(packet) >= 16:
            packet[12:16] = _THEIRS4
        elif version == 6 and len(packet) >= 24:
            packet[8:24] = _THEIRS6
    if mode & 2 and version == 4 and len(packet) >= 4:
        packet[2:4] = len(packet).to_bytes(2, "big")
    elif mode & 2 and version == 6 and len(packet) >= 6:
        packet[4:6] = max(len(packet) - 40, 0).to_bytes(2, "big")
    if mode & 4 and version == 4 and len(packet) >= 4:
        packet[2:4] = (mode >> 3).to_bytes(2, "big")  # a short, lying total length (0..31)
    return bytes(packet)


def _records(data: bytes, limit: int) -> list[tuple[int, bytes]]:
    """The input as records [mode: 1 byte][length: 2 bytes, big-endian][bytes], at most
    `limit` of them (a short last record takes what is left): a layout the seeds can use."""
    records: list[tuple[int, bytes]] = []
    position = 0
    while position < len(data) and len(records) < limit:
        mode = data[position]
        length = int.from_bytes(data[position + 1 : position + 3], "big") % 1501
        records.append((mode, data[position + 3 : position + 3 + length]))
        position += 3 + length
    return records


def fuzz_inner(data: bytes) -> None:
    global _RIG
    if _RIG is None:
        _RIG = _WorkerRig()
    rig = _RIG
    now = time.monotonic()
    for mode, packet in _records(data, 8):
        plaintext = _shape(bytearray(packet), mode)
        message = seal_transport(_RECEIVE_KEY, _OWNED_INDEX, rig.counter, plaintext, 0)
        rig.counter += 1
        view = memoryview(message)
        rig.worker._receive_train(view, len(message), len(message), _ENDPOINT, _PKTINFO, now)
    rig.worker._write_tun()
    rig.drain()


def _seed(packets: list[bytes], mode: int) -> bytes:
    return b"".join(bytes([mode]) + len(p).to_bytes(2, "big") + p for p in packets)


def _inner_seeds() -> list[bytes]:
    from tests.dataplane.test_coalesce import tcp4, tcp6

    return [
        _seed([tcp4(0, b"a" * 100), tcp4(100, b"b" * 100)], 1),
        _seed([tcp6(0, b"a" * 64), tcp6(64, b"b" * 64)], 1),
        _seed([bytes([0x45]) + bytes(39)], 3),
        _seed([bytes([0x45, 0, 0, 5]) + bytes(36)], 1),
        _seed([bytes([0x60]) + bytes(20)], 1),
    ]


# ---------------------------------------------------------------------------------------------
# coalesce on packets that keep the worker's contract


def _normal(packet: bytes) -> bytes:
    """A packet with what the merge may rewrite cleared: IPv4 id and checksum, TCP checksum."""
    out = bytearray(packet)
    if out[0] >> 4 == 4:
        out[4:6] = out[10:12] = b"\0\0"
        iph = (out[0] & 15) * 4
        tcp = out[9] == 6
    else:
        iph, tcp = 40, out[6] == 6
    if tcp and len(out) >= iph + 18:
        out[iph + 16 : iph + 18] = b"\0\0"
    return bytes(out)


def fuzz_coalesce(data: bytes) -> None:
    from tests.dataplane.test_coalesce import resegment

    packets = []
    for mode, raw in _records(data, 16):
        packet = bytearray(raw)
        if mode & 1 and len(packet) >= 40:
            packet[0] = 0x60 | (packet[0] & 0x0F)
            packet[4:6] = (len(packet) - 40).to_bytes(2, "big")
        elif len(packet) >= 20:
            packet[0] = 0x40 | (packet[0] & 0x0F)
            packet[2:4] = len(packet).to_bytes(2, "big")
        else:
            continue
        packets.append(bytes(packet))
    if not packets:
        return
    buffers = coalesce(packets)
    assert len(buffers) <= len(packets)
    again = [segment for buffer in buffers for segment in resegment(buffer)]
    assert sorted(map(_normal, again)) == sorted(map(_normal, packets)), "coalesce lost bytes"


def _coalesce_seeds() -> list[bytes]:
    from tests.dataplane.test_coalesce import tcp4, tcp6

    return [
        _seed([tcp4(0, b"a" * 100), tcp4(100, b"b" * 100), tcp4(200, b"c" * 10)], 0),
        _seed([tcp6(0, b"x" * 8), tcp6(8, b"y" * 8)], 1),
    ]


# ---------------------------------------------------------------------------------------------
# allowed IPs


def _prefix(provider: atheris.FuzzedDataProvider) -> Any:
    form = provider.ConsumeIntInRange(0, 4)
    if form == 0:
        return provider.ConsumeUnicodeNoSurrogates(48)
    if form == 1:
        return (provider.ConsumeBytes(provider.ConsumeIntInRange(0, 17)), provider.ConsumeInt(2))
    if form == 2:
        return (provider.ConsumeUnicodeNoSurrogates(40), provider.ConsumeInt(2))
    if form == 3:
        bits: int = 32 if provider.ConsumeBool() else 128
        return (provider.ConsumeBytes(bits // 8), provider.ConsumeIntInRange(0, bits))
    return provider.ConsumeBytes(8)  # not a prefix at all


def _key_of(prefix: Any) -> tuple[int, int, int] | None:
    """The model's view of a prefix: (bits, cidr, masked value), or None if invalid."""
    bits: int
    try:
        if isinstance(prefix, str):
            network = ipaddress.ip_network(prefix, strict=False)
            bits, cidr, value = network.max_prefixlen, network.prefixlen, int(network[0])
        else:
            address, cidr = prefix
            if isinstance(address, bytes):
                bits, value = len(address) * 8, int.from_bytes(address, "big")
            else:
                parsed = ipaddress.ip_address(address)
                bits, value = parsed.max_prefixlen, int(parsed)
            if bits not in (32, 128) or not 0 <= cidr <= bits:
                return None
    except (ValueError, TypeError):
        return None
    mask = ((1 << cidr) - 1) << (bits - cidr)
    return bits, cidr, value & mask


def fuzz_allowedips(data: bytes) -> None:
    provider = atheris.FuzzedDataProvider(data)
    table: AllowedIPs[int] = AllowedIPs()
    model: dict[tuple[int, int, int], int] = {}
    for _ in range(provider.ConsumeIntInRange(0, 24)):
        insert = provider.ConsumeBool()
        peer = provider.ConsumeIntInRange(1, 3)
        prefix = _prefix(provider)
        key = _key_of(prefix)
        try:
            if insert:
                table.insert(prefix, peer)
            else:
                removed = table.remove(prefix, peer)
                assert removed == (key is not None and model.get(key) == peer), (prefix, removed)
        except ConfigError:
            assert key is None, f"valid prefix {prefix!r} refused"
            continue
        assert key is not None, f"invalid prefix {prefix!r} accepted"
        if insert:
            model[key] = peer
        elif model.get(key) == peer:
            del model[key]
    for _ in range(8):
        address = provider.ConsumeBytes(16 if provider.ConsumeBool() else 4)
        if len(address) not in (4, 16):
            break
        bits, value = len(address) * 8, int.from_bytes(address, "big")
        best = None
        for (kbits, cidr, masked), owner in model.items():
            mask = ((1 << cidr) - 1) << (kbits - cidr)
            if kbits == bits and value & mask == masked and (best is None or cidr > best[0]):
                best = (cidr, owner)
        assert table.lookup(address) == (best[1] if best else None), address.hex()


def _allowedips_seeds() -> list[bytes]:
    return [b"\x00\x01\x00" + b"10.0.0.0/8".ljust(48, b"\x00"), bytes(range(64))]


# ---------------------------------------------------------------------------------------------

TARGETS: dict[str, tuple[Callable[[bytes], None], Callable[[], list[bytes]]]] = {
    "messages": (fuzz_messages, _message_seeds),
    "uapi": (fuzz_uapi, _uapi_seeds),
    "inner": (fuzz_inner, _inner_seeds),
    "coalesce": (fuzz_coalesce, _coalesce_seeds),
    "allowedips": (fuzz_allowedips, _allowedips_seeds),
}


def write_seeds(target: str, directory: str) -> None:
    """Put the target's seed inputs in `directory` (a libFuzzer corpus directory)."""
    os.makedirs(directory, exist_ok=True)
    for n, seed in enumerate(TARGETS[target][1]()):
        with open(os.path.join(directory, f"seed-{n}"), "wb") as f:
            f.write(seed)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] not in TARGETS:
        sys.exit(f"usage: python -m tests.fuzz.targets {{{'|'.join(TARGETS)}}} [libFuzzer args]")
    target = argv.pop(1)
    if "--seeds" in argv:  # write the seed corpus into the directory that follows
        directory = argv[argv.index("--seeds") + 1]
        write_seeds(target, directory)
        return
    atheris.Setup(argv, TARGETS[target][0])
    atheris.Fuzz()


if __name__ == "__main__":
    main()
