"""The allowed-IPs table against the kernel's self-test and a naive longest-prefix model."""

from __future__ import annotations

import ipaddress
import json
import random
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wgmp.protocol.allowedips import AllowedIPs
from wgmp.protocol.errors import ConfigError

VECTORS = json.loads(
    (Path(__file__).parent.parent / "vectors" / "allowedips.vectors.json").read_text()
)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _packed(addr: str) -> bytes:
    return ipaddress.ip_address(addr).packed


def test_kernel_selftest_ops() -> None:
    table: AllowedIPs[str] = AllowedIPs()
    model = NaiveTable()
    for n, op in enumerate(VECTORS["ops"]):
        where = f"op {n} ({op['block']}): {op}"
        kind = op["op"]
        if kind == "insert":
            prefix = (_packed(op["addr"]), op["cidr"])
            table.insert(prefix, op["peer"])
            model.insert(ipaddress.ip_network(op["canonical"]), op["peer"])
            assert ipaddress.ip_network(op["canonical"]) in table.entries_for_peer(op["peer"])
        elif kind in ("lookup_eq", "lookup_ne"):
            found = table.lookup(_packed(op["addr"]))
            assert (found == op["peer"]) is (kind == "lookup_eq"), where
        elif kind == "remove":
            prefix = (_packed(op["addr"]), op["cidr"])
            bits = 32 if op["family"] == 4 else 128
            if op["expect_return"] == "-EINVAL":
                assert op["cidr"] > bits
                with pytest.raises(ConfigError):
                    table.remove(prefix, op["peer"])
                continue
            # The kernel returns 0 whether or not anything went; ours says which.
            network = ipaddress.ip_network((op["addr"], op["cidr"]), strict=False)
            expected = model.remove(network, op["peer"])
            assert table.remove(prefix, op["peer"]) is expected, where
        elif kind == "remove_by_peer":
            table.remove_by_peer(op["peer"])
            model.remove_by_peer(op["peer"])
            assert table.entries_for_peer(op["peer"]) == []
        elif kind == "clear":
            table.clear()
            model = NaiveTable()
            assert len(table) == 0
        else:
            raise AssertionError(f"unknown op {kind}")
        assert len(table) == len(model.entries), where


def test_some_kernel_removes_really_remove() -> None:
    # The vectors' removes all "return 0"; make sure the test above saw both outcomes.
    table: AllowedIPs[str] = AllowedIPs()
    table.insert("192.0.0.0/24", "a")
    assert not table.remove("192.0.0.0/32", "a")
    assert not table.remove("192.0.0.0/24", "b")
    assert table.remove("192.0.0.77/24", "a")  # masked like insert
    assert table.lookup(_packed("192.0.0.1")) is None


def test_readback_block6() -> None:
    block = VECTORS["readback_block6"]
    table: AllowedIPs[str] = AllowedIPs()
    for item in block["items"]:
        table.insert(item["insert"], "a")
    expected = [ipaddress.ip_network(item["expect_readback"]) for item in block["items"]]
    assert table.entries_for_peer("a") == expected  # insertion order, canonical (masked)
    assert len(table) == 5


def test_stress_block5_v6_128() -> None:
    prefixes = VECTORS["stress_block5_v6_128"]["prefixes"]
    table: AllowedIPs[str] = AllowedIPs()
    for prefix in prefixes:
        table.insert(prefix, "a")
    assert len(table) == len(prefixes)
    for prefix in prefixes:
        network = ipaddress.ip_network(prefix)
        assert table.lookup(network.network_address.packed) == "a"
        assert table.lookup((int(network.network_address) ^ 1).to_bytes(16, "big")) is None
    table.clear()
    assert len(table) == 0
    assert table.lookup(ipaddress.ip_network(prefixes[0]).network_address.packed) is None


@pytest.mark.parametrize(
    "prefix",
    [
        "10.0.0.1/8",
        ipaddress.ip_network("10.0.0.0/8"),
        (bytes([10, 0, 0, 1]), 8),
        ("10.0.0.1", 8),
        (ipaddress.IPv4Address("10.0.0.1"), 8),
    ],
    ids=["text", "network", "bytes", "text-pair", "address-pair"],
)
def test_prefix_forms(prefix: Any) -> None:
    table: AllowedIPs[str] = AllowedIPs()
    table.insert(prefix, "p")
    assert table.entries_for_peer("p") == [ipaddress.ip_network("10.0.0.0/8")]
    assert table.lookup(bytes([10, 9, 9, 9])) == "p"
    assert table.remove(prefix, "p")
    assert len(table) == 0


def test_text_without_length_is_a_host_route() -> None:
    table: AllowedIPs[str] = AllowedIPs()
    table.insert("fd00::1", "p")
    assert table.entries_for_peer("p") == [ipaddress.ip_network("fd00::1/128")]


@pytest.mark.parametrize(
    "prefix",
    [
        "10.0.0.0/33",
        "fd00::/129",
        "nonsense",
        (b"\x01\x02\x03", 8),
        (b"\x01\x02\x03\x04", 33),
        (b"\x01\x02\x03\x04", -1),
        (b"\x01" * 16, 129),
        ("10.0.0.1", "8"),
        ("not an address", 8),
        42,
    ],
)
def test_bad_prefixes_are_config_errors(prefix: Any) -> None:
    table: AllowedIPs[str] = AllowedIPs()
    with pytest.raises(ConfigError):
        table.insert(prefix, "p")
    with pytest.raises(ConfigError):
        table.remove(prefix, "p")


def test_none_is_not_a_peer() -> None:
    table: AllowedIPs[Any] = AllowedIPs()
    with pytest.raises(ConfigError):
        table.insert("10.0.0.0/8", None)
    assert not table.remove("10.0.0.0/8", None)


def test_identical_prefix_changes_owner() -> None:
    table: AllowedIPs[str] = AllowedIPs()
    table.insert("10.0.0.0/8", "a")
    table.insert("10.1.0.0/16", "a")
    table.insert("10.9.9.9/8", "b")
    assert table.lookup(bytes([10, 0, 0, 1])) == "b"
    assert table.entries_for_peer("a") == [ipaddress.ip_network("10.1.0.0/16")]
    assert table.entries_for_peer("b") == [ipaddress.ip_network("10.0.0.0/8")]
    assert not table.remove("10.0.0.0/8", "a")
    assert len(table) == 2
    table.insert("10.0.0.0/8", "b")  # same owner again: still one entry
    assert len(table) == 2


def test_reinsert_moves_to_the_end_of_the_peers_list() -> None:
    table: AllowedIPs[str] = AllowedIPs()
    for prefix in ("10.0.0.0/8", "fd00::/8", "192.168.0.0/16"):
        table.insert(prefix, "a")
    table.insert("10.1.2.3/8", "a")
    assert [str(n) for n in table.entries_for_peer("a")] == [
        "fd00::/8",
        "192.168.0.0/16",
        "10.0.0.0/8",
    ]


def test_families_do_not_mix() -> None:
    table: AllowedIPs[str] = AllowedIPs()
    table.insert("0.0.0.0/0", "v4")
    assert table.lookup(bytes(16)) is None
    table.insert("::/0", "v6")
    table.insert("0.0.0.0/32", "v4 host")
    table.insert("::/128", "v6 host")
    assert table.lookup(bytes(4)) == "v4 host"
    assert table.lookup(bytes(16)) == "v6 host"
    assert table.lookup(b"\x00\x00\x00\x01") == "v4"
    assert table.lookup(bytes(15) + b"\x01") == "v6"
    assert table.lookup(bytes(5)) is None  # neither family


def test_lookup_accepts_other_buffers() -> None:
    table: AllowedIPs[str] = AllowedIPs()
    table.insert("10.0.0.1/32", "host")
    table.insert("10.0.0.0/8", "net")
    packet = bytearray(b"\x45\x00" + bytes(10) + bytes([10, 0, 0, 1]) + bytes([10, 0, 0, 2]))
    assert table.lookup(packet[12:16]) == "host"
    assert table.lookup(memoryview(packet)[12:16]) == "host"
    assert table.lookup(memoryview(bytes(packet))[16:20]) == "net"


def test_remove_by_peer_leaves_others() -> None:
    table: AllowedIPs[str] = AllowedIPs()
    for i in range(50):
        table.insert((bytes([10, i, 0, 0]), 16), "a" if i % 2 else "b")
        table.insert((bytes([0xFD, i]) + bytes(14), 120 - i), "a" if i % 3 else "b")
    count_a = len(table.entries_for_peer("a"))
    assert table.remove_by_peer("a") == count_a
    assert table.remove_by_peer("a") == 0
    assert table.entries_for_peer("a") == []
    assert all(
        table.lookup(bytes([10, i, 1, 1])) == ("b" if i % 2 == 0 else None) for i in range(50)
    )


# --- against a naive model -------------------------------------------------------------------


class NaiveTable:
    """A list of (network, peer): the obvious longest-prefix match."""

    def __init__(self) -> None:
        self.entries: list[tuple[Network, str]] = []

    def insert(self, network: Network, peer: str) -> None:
        self.entries = [(n, p) for n, p in self.entries if n != network] + [(network, peer)]

    def remove(self, network: Network, peer: str | None) -> bool:
        if (network, peer) not in self.entries:
            return False
        self.entries.remove((network, peer))  # type: ignore[arg-type]
        return True

    def remove_by_peer(self, peer: str) -> None:
        self.entries = [(n, p) for n, p in self.entries if p != peer]

    def lookup(self, addr: bytes) -> str | None:
        address = ipaddress.ip_address(addr)
        best: tuple[int, str] | None = None
        for network, peer in self.entries:
            if network.version == address.version and address in network:
                if best is None or network.prefixlen > best[0]:
                    best = (network.prefixlen, peer)
        return best[1] if best else None

    def entries_for_peer(self, peer: str) -> set[Network]:
        return {n for n, p in self.entries if p == peer}


PEERS = ["a", "b", "c", "d"]
# Addresses drawn from a few stems so that prefixes overlap and nest often.
V4_STEMS = [0x0A000000, 0xC0A80400, 0xFFFFFFFF, 0x00000000]
V6_STEMS = [0x20010DB8 << 96, 0xFD000000 << 96 | 0xDEADBEEF, (1 << 128) - 1, 0]


def _address(draw: Any, bits: int) -> int:
    stems = V4_STEMS if bits == 32 else V6_STEMS
    stem: int = draw(st.sampled_from(stems))
    flip = draw(st.integers(0, bits - 1))
    noise: int = draw(st.integers(0, (1 << (bits - flip)) - 1)) if draw(st.booleans()) else 0
    return (stem ^ noise) & ((1 << bits) - 1)


@st.composite
def _network(draw: Any) -> Network:
    bits = draw(st.sampled_from([32, 128]))
    cidr = draw(st.integers(0, bits))
    value = _address(draw, bits)
    cls = ipaddress.IPv4Network if bits == 32 else ipaddress.IPv6Network
    return cls((value, cidr), strict=False)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_matches_naive_model(data: st.DataObject) -> None:
    table: AllowedIPs[str] = AllowedIPs()
    model = NaiveTable()
    for _ in range(data.draw(st.integers(1, 40))):
        op = data.draw(st.sampled_from(["insert", "insert", "remove", "remove_by_peer", "lookup"]))
        if op == "insert":
            network, peer = data.draw(_network()), data.draw(st.sampled_from(PEERS))
            # Give it unmasked sometimes: the table must mask.
            host = int(network.network_address) | data.draw(
                st.integers(0, network.num_addresses - 1)
            )
            packed = host.to_bytes(network.max_prefixlen // 8, "big")
            table.insert((packed, network.prefixlen), peer)
            model.insert(network, peer)
        elif op == "remove":
            if data.draw(st.booleans()) and model.entries:
                network = data.draw(st.sampled_from([n for n, _ in model.entries]))
            else:
                network = data.draw(_network())
            peer = data.draw(st.sampled_from(PEERS))
            assert table.remove(network, peer) is model.remove(network, peer)
        elif op == "remove_by_peer":
            peer = data.draw(st.sampled_from(PEERS))
            table.remove_by_peer(peer)
            model.remove_by_peer(peer)
        for _ in range(2):
            bits = data.draw(st.sampled_from([32, 128]))
            if data.draw(st.booleans()) and model.entries:
                # inside (or at the edge of) a present network
                network = data.draw(st.sampled_from([n for n, _ in model.entries]))
                bits = network.max_prefixlen
                offset = data.draw(st.integers(0, network.num_addresses - 1))
                value = int(network.network_address) + offset
            else:
                value = _address(data.draw, bits)
            addr = value.to_bytes(bits // 8, "big")
            assert table.lookup(addr) == model.lookup(addr), ipaddress.ip_address(addr)
        assert len(table) == len(model.entries)
    for peer in PEERS:
        assert set(table.entries_for_peer(peer)) == model.entries_for_peer(peer)


def test_100k_prefixes() -> None:
    rng = random.Random(7)
    table: AllowedIPs[int] = AllowedIPs()
    expected: dict[tuple[int, int, int], int] = {}
    start = time.process_time()
    for i in range(100_000):
        bits = 32 if i % 2 else 128
        cidr = rng.randint(bits // 2, bits)
        value = rng.getrandbits(bits) & (((1 << cidr) - 1) << (bits - cidr))
        table.insert((value.to_bytes(bits // 8, "big"), cidr), i % 5000)
        expected[(bits, cidr, value)] = i % 5000
    elapsed = time.process_time() - start
    assert len(table) == len(expected)
    # CPU time with wide slack: this guards against quadratic work, not for speed (perf/).
    assert elapsed < 10.0, f"100k inserts took {elapsed:.2f} s of CPU"
    # A prefix's first and last address resolve to the longest prefix holding them, found
    # here by walking down from the full length in `expected`.
    for (bits, cidr, value), _ in list(expected.items())[:5_000]:
        for probe in (value, value | ((1 << (bits - cidr)) - 1)):
            want = next(
                expected[key]
                for length in range(bits, cidr - 1, -1)
                if (key := (bits, length, probe >> (bits - length) << (bits - length))) in expected
            )
            assert table.lookup(probe.to_bytes(bits // 8, "big")) == want
    for peer in range(0, 5000, 2):
        table.remove_by_peer(peer)
    assert len(table) == sum(1 for peer in expected.values() if peer % 2)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([4, 16]),
            st.integers(min_value=0, max_value=(1 << 128) - 1),
            st.integers(min_value=0, max_value=128),
            st.sampled_from(["a", "b", "c"]),
        ),
        max_size=40,
    )
)
def test_insert_packed_is_insert_of_a_packed_pair(
    ops: list[tuple[int, int, int, str]],
) -> None:
    """The bulk path (configurations, in control and every worker) builds the same table."""
    slow: AllowedIPs[str] = AllowedIPs()
    fast: AllowedIPs[str] = AllowedIPs()
    probes = []
    for size, value, cidr, peer in ops:
        address = (value >> (128 - size * 8)).to_bytes(size, "big")
        cidr = min(cidr, size * 8)
        slow.insert((address, cidr), peer)
        fast.insert_packed(address, cidr, peer)
        probes.append(address)
    for peer in "abc":
        assert fast.packed_lists_for_peer(peer) == slow.packed_lists_for_peer(peer)
        assert [[n.network_address.packed, n.prefixlen] for n in slow.entries_for_peer(peer)] == (
            slow.packed_lists_for_peer(peer)
        )
    for address in probes:
        assert fast.lookup(address) == slow.lookup(address)


def test_insert_packed_refuses_what_insert_refuses() -> None:
    table: AllowedIPs[str] = AllowedIPs()
    for address, cidr in ((b"\x01\x02\x03", 8), (b"\x01\x02\x03\x04", 33), (bytes(16), -1)):
        with pytest.raises(ConfigError):
            table.insert_packed(address, cidr, "a")
    assert len(table) == 0


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(_network(), st.sampled_from(PEERS)), max_size=30))
def test_every_form_of_a_peers_prefixes_agrees(inserts: list[tuple[Network, str]]) -> None:
    """entries, [packed, length] lists and the compact keys are the same prefixes in the
    same order."""
    table: AllowedIPs[str] = AllowedIPs()
    for network, peer in inserts:
        table.insert(network, peer)
    for peer in PEERS:
        networks = table.entries_for_peer(peer)
        packed = [(n.network_address.packed, n.prefixlen) for n in networks]
        assert table.packed_lists_for_peer(peer) == [list(p) for p in packed]
        assert table.compact_entries_for_peer(peer) == [
            a if c == len(a) * 8 else a + bytes([c]) for a, c in packed
        ]


def test_a_host_route_is_one_object_in_both_of_its_places() -> None:
    """The host table and the peer's list share the key (what keeps memory per peer below
    wireguard-go's with every worker's copy counted, perf/RESULTS.md)."""
    table: AllowedIPs[int] = AllowedIPs()
    address = bytes([10, 0, 0, 1])
    table.insert_packed(address, 32, 1)
    table.insert_packed(bytes([10, 0, 0, 1]), 32, 2)  # moves, with its new key object
    (key,) = table._hosts
    (listed,) = table.compact_entries_for_peer(2)
    assert key is listed and table.compact_entries_for_peer(1) == []


def test_memory_per_prefix() -> None:
    """10,000 peers x 10 prefixes (9 host routes and a /24 each): the table holds ~1 KB a
    peer (it held 2.2 KB with a tuple and an int per prefix). Generous bound."""
    import tracemalloc

    tracemalloc.start()
    try:
        table: AllowedIPs[int] = AllowedIPs()
        for i in range(10_000):  # the addresses made here count, as a worker's decoded ones
            for j in range(9):
                table.insert_packed(bytes([10, (i >> 8) & 255, i & 255, j]), 32, i)
            table.insert_packed(bytes([100, (i >> 8) & 255, i & 255, 0]), 24, i)
        used, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert used / 10_000 < 1500, f"{used / 10_000:.0f} bytes a peer"
