"""Shared fixtures for root tests: namespaces, veth links, reference daemons.

A pytest plugin that the conftest.py of every directory of root tests imports (tests/integration,
tests/net): every test in those directories gets the `root` marker and the `root_required`
check, which fails (never skips) when root or a required tool is missing. Namespaces and processes
made through these fixtures are removed after each test, whatever its outcome, and once more
at the end of the session for anything left behind.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

__all__ = [
    "ROOT_DIRS",
    "_namespace_safety_net",
    "netns",
    "netns_factory",
    "pair",
    "pytest_collection_modifyitems",
    "pytest_runtest_makereport",
    "root_required",
    "userspace_wireguard",
    "veth_link",
    "wireguard_go",
]

from tests.integration.netns import (
    WIREGUARD_GO,
    Netns,
    UserspaceWireGuard,
    VethLink,
    WireGuardGo,
    cleanup_all,
    interface_name,
    missing_requirements,
    remove_stale,
    veth_pair,
)

# The directories whose tests need root (each has a conftest.py importing this module).
ROOT_DIRS = tuple(Path(__file__).resolve().parent / name for name in ("integration", "net"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        parents = Path(item.path).resolve().parents
        if any(root in parents for root in ROOT_DIRS) and not item.get_closest_marker("root"):
            item.add_marker(pytest.mark.root)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    # Keep each phase's report on the item so fixtures can tell whether the test failed.
    report = yield
    setattr(item, f"_wgmp_report_{report.when}", report)
    return report


def _failed(request: pytest.FixtureRequest) -> bool:
    report = getattr(request.node, "_wgmp_report_call", None)
    return report is None or report.failed


@pytest.fixture(scope="session", autouse=True)
def _namespace_safety_net() -> Iterator[None]:
    if missing_requirements():
        yield  # root_required fails each test with the reason
        return
    remove_stale()
    # Ended by SIGTERM (tools/test.sh ending its background run, a time limit), pytest stops as
    # on Ctrl-C: every fixture's teardown and the cleanup below still run.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        cleanup_all()


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


@pytest.fixture(autouse=True)
def root_required() -> None:
    """Fail (never skip) when the machine cannot run root integration tests."""
    missing = missing_requirements()
    if missing:
        pytest.fail("root tests need " + ", ".join(missing), pytrace=False)


@pytest.fixture
def netns_factory() -> Iterator[Callable[..., Netns]]:
    """Make namespaces on demand: `ns = netns_factory("hint")`; all removed after the test."""
    made: list[Netns] = []

    def make(hint: str = "") -> Netns:
        ns = Netns(hint)
        made.append(ns)
        return ns

    try:
        yield make
    finally:
        for ns in reversed(made):
            ns.close()


@pytest.fixture
def netns(netns_factory: Callable[..., Netns]) -> Netns:
    """One namespace with `lo` up."""
    return netns_factory()


@pytest.fixture
def veth_link(netns_factory: Callable[..., Netns]) -> VethLink:
    """Two namespaces joined by a veth pair with IPv4 and IPv6 addresses on both ends."""
    return veth_pair(netns_factory("a"), netns_factory("b"))


@pytest.fixture
def userspace_wireguard(
    request: pytest.FixtureRequest,
) -> Iterator[Callable[..., UserspaceWireGuard]]:
    """Start a userspace WireGuard daemon in a namespace and wait for its UAPI socket:

        daemon = userspace_wireguard(ns, [sys.executable, "-m", "wgmp", "-f"])

    `command` is the argv without the interface name. Daemons are stopped after the test;
    on failure their logs (LOG_LEVEL=verbose) are printed.
    """
    daemons: list[UserspaceWireGuard] = []

    def start(
        ns: Netns,
        command: Sequence[str] = WIREGUARD_GO,
        ifname: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> UserspaceWireGuard:
        environment = {"LOG_LEVEL": "verbose", **(env or {})}
        if tuple(command) == WIREGUARD_GO:
            daemon: UserspaceWireGuard = WireGuardGo(ns, ifname, env=environment)
        else:
            daemon = UserspaceWireGuard(
                ns, tuple(command), ifname or interface_name(), env=environment
            )
        daemons.append(daemon)
        daemon.start()
        return daemon

    try:
        yield start
    finally:
        _stop_daemons(daemons, _failed(request))


@pytest.fixture
def wireguard_go(
    userspace_wireguard: Callable[..., UserspaceWireGuard],
) -> Callable[..., WireGuardGo]:
    """Start Debian's `wireguard-go -f IFACE` in a namespace: `peer = wireguard_go(ns)`."""

    def start(ns: Netns, ifname: str | None = None) -> WireGuardGo:
        return userspace_wireguard(ns, WIREGUARD_GO, ifname)  # type: ignore[return-value]

    return start


def _stop_daemons(daemons: list[UserspaceWireGuard], failed: bool) -> None:
    for daemon in daemons:
        try:
            daemon.stop()
        finally:
            if failed:
                print(f"--- {' '.join(daemon.command)} {daemon.ifname} in {daemon.ns.name} ---")
                print(daemon.log())
            daemon.close()


@pytest.fixture
def pair(
    netns_factory: Callable[..., Netns],
    userspace_wireguard: Callable[..., UserspaceWireGuard],
    wireguard_go: Callable[..., WireGuardGo],
) -> Callable[..., Any]:
    """`pair(workers=1, mtu=None)`: a fresh wgmp / wireguard-go pair on its own veth link
    (tests/integration/livepair.py), for the tests of the protocol's behaviour over time."""
    from tests.integration.livepair import pair_factory

    return pair_factory(netns_factory, userspace_wireguard, wireguard_go)
