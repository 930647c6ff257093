"""control/endpoint_routes.py without a network: answers are kept until routing changes.
(What the answers are, against real routes, is tests/integration/test_routes_live.py's.)"""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterator
from typing import Any

import pytest

from wgmp.control.endpoint_routes import VERDICTS_MAX, EndpointRoutes
from wgmp.net.routes import Route

ENDPOINT = ("192.0.2.7", 51820)
STICKY = ("192.0.2.1", 3, 4)  # (address, ifindex, family-specific): see net/udp.py
RTM_NEWROUTE = 24
RTM_NEWADDR = 20  # not a routing change of its own (its routes come as RTM_NEWROUTE)


def _notification(kind: int) -> bytes:
    return struct.pack("=LHHLL", 16, kind, 0, 0, 0)


class _Requests:
    """RouteSocket's `get`, answering that everything leaves through interface 5."""

    def __init__(self) -> None:
        self.asked = 0

    def get(self, destination: bytes, **_: Any) -> Route:
        self.asked += 1
        return Route(oif=5)

    def close(self) -> None:
        pass


class _Notifications:
    """The subscribed socket: hands out queued batches, then would block."""

    def __init__(self) -> None:
        self.queued: list[bytes | OSError] = []

    def recv(self, _size: int) -> bytes:
        if not self.queued:
            raise BlockingIOError
        item = self.queued.pop(0)
        if isinstance(item, OSError):
            raise item
        return item

    def close(self) -> None:
        pass


@pytest.fixture
def routes() -> Iterator[tuple[EndpointRoutes, _Requests, _Notifications]]:
    routes = EndpointRoutes()
    routes.close()  # the real sockets: replaced by the fakes below
    requests, notifications = _Requests(), _Notifications()
    routes._requests = requests  # type: ignore[assignment]
    routes._sock = notifications  # type: ignore[assignment]
    yield routes, requests, notifications


def _check(routes: EndpointRoutes, own_index: int | None = 5, sticky: Any = None) -> bool:
    return routes.check(ENDPOINT, sticky, fwmark=0, port=51821, own_index=own_index).looping


def test_an_endpoint_asked_about_again_costs_no_query(routes: Any) -> None:
    endpoint_routes, requests, _ = routes
    assert _check(endpoint_routes) and _check(endpoint_routes)
    assert requests.asked == 1
    assert not _check(endpoint_routes, own_index=6)  # another question: asked
    assert requests.asked == 2


@pytest.mark.parametrize(
    "batch",
    [_notification(RTM_NEWROUTE), OSError(errno.ENOBUFS, "lost notifications")],
    ids=["a route changed", "notifications were lost"],
)
def test_a_routing_change_makes_every_answer_asked_afresh(
    routes: Any, batch: bytes | OSError
) -> None:
    endpoint_routes, requests, notifications = routes
    _check(endpoint_routes)
    notifications.queued.append(batch)
    assert endpoint_routes.read()
    _check(endpoint_routes)
    assert requests.asked == 2


def test_a_notification_that_changes_no_route_keeps_the_answers(routes: Any) -> None:
    endpoint_routes, requests, notifications = routes
    _check(endpoint_routes)
    notifications.queued.append(_notification(RTM_NEWADDR))
    assert not endpoint_routes.read()
    _check(endpoint_routes)
    assert requests.asked == 1


def test_the_answers_kept_are_bounded(routes: Any) -> None:
    endpoint_routes, requests, _ = routes
    for index in range(VERDICTS_MAX + 1):
        _check(endpoint_routes, own_index=index)
    _check(endpoint_routes, own_index=0)  # forgotten with the others when the bound was hit
    assert requests.asked == VERDICTS_MAX + 2
    assert len(endpoint_routes._verdicts) <= VERDICTS_MAX
