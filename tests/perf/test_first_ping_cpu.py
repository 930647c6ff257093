"""perf/first_ping_cpu.py's reading of a scheduler trace. No root."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "perf"))

from first_ping_cpu import Devices, steps, window  # noqa: E402

CONTROL, WORKER, PING = 101, 102, 300


def _switch(cpu: int, at: float, prev: tuple[str, int, str], nxt: tuple[str, int]) -> str:
    return (
        f"  {prev[0]}-{prev[1]} [00{cpu}] d..2. {at:.6f}: sched_switch: prev_comm={prev[0]} "
        f"prev_pid={prev[1]} prev_prio=120 prev_state={prev[2]} ==> next_comm={nxt[0]} "
        f"next_pid={nxt[1]} next_prio=120"
    )


def _wakeup(cpu: int, at: float, comm: str, pid: int) -> str:
    return (
        f"  <idle>-0 [00{cpu}] dNh4. {at:.6f}: sched_wakeup: comm={comm} pid={pid} prio=120 "
        f"target_cpu=00{cpu}"
    )


def test_what_each_part_ran_between_the_pings_sleep_and_its_wake_up() -> None:
    trace = "\n".join(
        [
            _switch(0, 10.000000, ("wgmp: wla contr", CONTROL, "S"), ("ping", PING)),
            _switch(0, 10.000100, ("ping", PING, "S"), ("wgmp: wla worke", WORKER)),  # start
            _switch(0, 10.000300, ("wgmp: wla worke", WORKER, "S"), ("wgmp: wla contr", CONTROL)),
            _switch(0, 10.000700, ("wgmp: wla contr", CONTROL, "R"), ("swapper/0", 0)),
            _switch(1, 10.000750, ("swapper/1", 0, "R"), ("wgmp: wla contr", CONTROL)),
            _wakeup(0, 10.001000, "ping", PING),  # end: the control on CPU 1 still runs
            _switch(1, 10.001200, ("wgmp: wla contr", CONTROL, "S"), ("swapper/1", 0)),
        ]
    )
    found = window(trace, {CONTROL: "a control", WORKER: "a workers"})
    assert found is not None
    assert round(found.span_us) == 900
    assert round(found.cpu_us["a workers"]) == 200
    assert round(found.cpu_us["a control"]) == 400 + 250  # cut at the window's end
    assert found.switch_ins == {"a workers": 1, "a control": 2}
    assert found.cpu_us["b control"] == found.cpu_us["b workers"] == 0


def test_no_window_without_the_pings_wake_up() -> None:
    trace = _switch(0, 10.0, ("ping", PING, "S"), ("swapper/0", 0))
    assert window(trace, {}) is None


def _device(at: float, event: str, dev: str, size: int) -> str:
    end = " rc=0" if event == "net_dev_xmit" else ""
    return f"  wgmp-1 [000] b..1. {at:.6f}: {event}: dev={dev} skbaddr=0000 len={size}{end}"


def test_the_steps_from_the_devices_events() -> None:
    devices = Devices("wla", "vla", "vlb")
    trace = "\n".join(
        [
            _device(20.000000, "net_dev_xmit", "vla", 190),  # before the request: not ours
            _device(20.000100, "net_dev_xmit", "wla", 84),  # the request into a's TUN
            _device(20.000400, "net_dev_xmit", "vla", 190),  # message 1
            _device(20.000410, "netif_rx", "vlb", 190),  # its arrival: not a step
            _device(20.001000, "net_dev_xmit", "vlb", 134),  # message 2
            _device(20.001200, "net_dev_xmit", "vla", 74),  # a keepalive: not the data
            _device(20.001500, "net_dev_xmit", "vla", 170),  # the data
            _device(20.001800, "net_dev_xmit", "vlb", 170),  # the reply
            _device(20.001950, "netif_rx", "wla", 84),  # the reply into a's TUN
        ]
    )
    found = steps(trace, devices)
    assert found is not None
    assert {step: round(us) for step, us in found.items()} == {
        "ping -> msg1": 300,
        "msg1 -> msg2": 600,
        "msg2 -> data": 500,
        "data -> reply": 300,
        "reply -> tun": 150,
    }
    assert steps("\n".join(trace.splitlines()[:-1]), devices) is None  # no reply in the TUN
