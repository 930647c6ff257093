"""`GetReply` writes, in slices, exactly what `format_get` writes in one go."""

from __future__ import annotations

from types import SimpleNamespace

from wgmp.control.get_reply import CHUNK, GetReply, SteadyLines
from wgmp.uapi import protocol as uapi


def _peer(n: int) -> uapi.PeerSnapshot:
    return uapi.PeerSnapshot(
        public_key=bytes([n % 256]) * 32,
        preshared_key=bytes([7]) * 32 if n % 3 else None,
        endpoint=(f"192.0.2.{n % 250 + 1}", 51820) if n % 2 else None,
        last_handshake_time_sec=n,
        tx_bytes=n * 1000,
        rx_bytes=n * 3,
        persistent_keepalive_interval=n % 60,
        allowed_ips=[f"10.{n >> 8 & 255}.{n & 255}.0/24"] * (n % 3),
    )


_text = uapi.format_snapshot_peer


def test_sliced_reply_is_format_get() -> None:
    for count in (0, 1, CHUNK, 5 * CHUNK + 3):
        snapshots = [_peer(n) for n in range(count)]
        peers = [SimpleNamespace(index=n) for n in range(count)]
        for device in (
            uapi.DeviceSnapshot(),
            uapi.DeviceSnapshot(private_key=bytes([9]) * 32, listen_port=51820, fwmark=1 << 31),
        ):
            reply = GetReply(device, peers, lambda p, s=snapshots: _text(s[p.index]))  # type: ignore[arg-type,misc]
            slices = 1
            while not reply.run(0.0):  # as little as possible per call: one chunk
                slices += 1
            expected = uapi.format_get(
                uapi.DeviceSnapshot(
                    device.private_key, device.listen_port, device.fwmark, snapshots
                )
            )
            assert reply.text() == expected
            assert slices == max(1, -(-count // CHUNK))


def test_a_reply_handed_out_as_it_is_written_is_the_same_reply() -> None:
    snapshots = [_peer(n) for n in range(3 * CHUNK + 1)]
    peers = [SimpleNamespace(index=n) for n in range(len(snapshots))]
    device = uapi.DeviceSnapshot(private_key=bytes([9]) * 32, listen_port=51820)
    reply = GetReply(device, peers, lambda p: _text(snapshots[p.index]))  # type: ignore[arg-type,attr-defined]
    streamed = []
    while not reply.run(0.0):
        streamed.append(reply.fresh())
    assert len(streamed) == 3 and all(streamed)
    assert b"".join(streamed) + reply.rest() == reply.text()
    assert reply.text() == uapi.format_get(
        uapi.DeviceSnapshot(device.private_key, 51820, 0, snapshots)
    )


def test_steady_lines_follow_every_change_and_forget_peers_gone() -> None:
    lines = SteadyLines()
    key, psk = bytes([1]) * 32, bytes([2]) * 32
    host = [bytes([10, 0, 0, 1])]

    def expected(psk: bytes | None, endpoint: tuple[str, int] | None, compacts: list[bytes]):
        texts = uapi.format_compact_prefixes(compacts)
        return (
            uapi.format_peer_head(key, psk, endpoint),
            uapi.format_allowed_lines(texts),
        )

    states = [
        (None, None, []),
        (None, None, host),
        (psk, None, host),
        (psk, ("192.0.2.1", 1), host),
        (psk, ("192.0.2.1", 2), host),
        (psk, ("192.0.2.1", 2), [*host, bytes([10, 0, 0, 0, 8])]),
        (psk, ("192.0.2.1", 2), host),
    ]
    for psk_now, endpoint, compacts in states:
        lines.begin()
        for _ in range(2):  # made once, then reused: the same either way
            got = lines.lines(7, key, psk_now, endpoint, list(compacts))
            assert got == expected(psk_now, endpoint, compacts)
    lines.begin()
    lines.lines(8, key, None, None, [])
    lines.begin()
    assert set(lines._kept) == {8}  # peer 7 was not in the last get
