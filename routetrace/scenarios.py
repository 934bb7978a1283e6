"""`routetrace prove --sandbox --scenarios`: the cases where own-address traffic does NOT take lo
(and some where it does although a user might doubt it), each built in throwaway namespaces,
played with real traffic under the normal live session, and judged against what the kernel's
code does (README: "When own-address traffic does not take lo").

The network (names differ on the two sides of every veth, so a misattributed device shows):

    host namespace                                  peer namespace
      eth0  198.51.100.1/24, 198.51.100.3/24  <-->  p0  198.51.100.2/24   (also 2001:db8::1 / ::2)
      eth1  203.0.113.1/24, default via .2    <-->  p1  203.0.113.2/24
      eth2  203.0.113.129/25, set down        <-->  p2
      eth3  198.51.100.65/32, in VRF vrf-blue <-->  p3                    (where the kernel has VRF)
      lo    + local route 203.0.113.64/26 (AnyIP); ip rule fwmark 7 -> table 100 (198.51.100.2 via eth1)

Each scenario is one client socket (its options: bound device, mark, source), what a user might
expect, what `ip route get` predicts for that socket's parameters, and what the kernel's code
does (route type, route device, transmit devices, what the client sees). The VM matrix
(tests/test_vm_matrix.py) and the native BPF tests play these same definitions.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field

from tabulate import tabulate

from . import netns
from .events import Flow
from .experiment import Sandbox, SocketOptions, connect_from, run_ip
from .flows import DestinationSummary, classify
from .render import json_line, losses_line
from .sanitize import text

HOST, PEER = "host", "peer"

OWN_ADDR, SECONDARY_ADDR, PEER_ADDR = "198.51.100.1", "198.51.100.3", "198.51.100.2"
ETH1_ADDR, GATEWAY = "203.0.113.1", "203.0.113.2"
DOWN_ADDR = "203.0.113.129"
ANYIP_PREFIX, ANYIP_ADDR = "203.0.113.64/26", "203.0.113.70"
VRF_DEV, VRF_TABLE, VRF_SLAVE, VRF_ADDR = "vrf-blue", 10, "eth3", "198.51.100.65"
POLICY_MARK, POLICY_TABLE = 7, 100
BOUND_TIMEOUT_S = 1.5          # the bound client's SYNs go to a peer that drops them: 2 SYNs, then give up

NO_VRF = "not available on this kernel: no vrf device"


@dataclass(frozen=True)
class Scenario:
    name: str
    case: str                      # what is tried, in a user's words
    user_expects: str              # what a user might expect
    client_ns: str                 # HOST or PEER: the namespace the client runs in
    daddr: str
    options: SocketOptions = SocketOptions()
    # What the kernel's code does (README cites the code path for each):
    route_type: str = "LOCAL"
    route_dev: str = "lo"
    route_loopback: bool = True    # the route device has IFF_LOOPBACK
    xmit_devs: frozenset[str] = frozenset({"lo"})
    client_sees: str = "ok"        # "ok" or "timeout" (nothing answers where the SYNs go)
    needs: str | None = None       # "vrf": a kernel feature the scenario cannot run without


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("bound-device", f"own address {OWN_ADDR} from a socket bound to eth1 (SO_BINDTODEVICE)",
             "LOCAL on lo: it is an own address", HOST, OWN_ADDR,
             SocketOptions(device="eth1", timeout=BOUND_TIMEOUT_S),
             route_type="UNICAST", route_dev="eth1", route_loopback=False, xmit_devs=frozenset({"eth1"}),
             client_sees="timeout"),
    Scenario("vrf", f"{VRF_ADDR} on {VRF_SLAVE} in VRF {VRF_DEV}, from a socket bound to {VRF_DEV}",
             "LOCAL on lo", HOST, VRF_ADDR, SocketOptions(device=VRF_DEV),
             route_type="LOCAL", route_dev=VRF_DEV, route_loopback=False, xmit_devs=frozenset({VRF_DEV}),
             needs="vrf"),
    Scenario("container", f"the host namespace's {OWN_ADDR} from the peer namespace (a container)",
             "LOCAL on lo: the same machine", PEER, OWN_ADDR,
             route_type="UNICAST", route_dev="p0", route_loopback=False, xmit_devs=frozenset({"p0"})),
    Scenario("anyip", f"{ANYIP_ADDR}: on no interface, in `local {ANYIP_PREFIX} dev lo`",
             "unreachable or via eth1: no interface holds it", HOST, ANYIP_ADDR),
    Scenario("policy-mark", f"peer {PEER_ADDR} with SO_MARK {POLICY_MARK} (rule: fwmark {POLICY_MARK} "
             f"lookup {POLICY_TABLE})", "eth0: 198.51.100.0/24 is eth0's subnet", HOST, PEER_ADDR,
             SocketOptions(mark=POLICY_MARK),
             route_type="UNICAST", route_dev="eth1", route_loopback=False, xmit_devs=frozenset({"eth1"})),
    Scenario("loopback-range", "127.0.0.2: not 127.0.0.1, but in 127.0.0.0/8", "only 127.0.0.1 is loopback",
             HOST, "127.0.0.2"),
    Scenario("secondary", f"secondary address {SECONDARY_ADDR} on eth0, from a socket bound to it",
             "eth0, or lo only for the primary address", HOST, SECONDARY_ADDR, SocketOptions(source=SECONDARY_ADDR)),
    Scenario("down-device", f"{DOWN_ADDR} on eth2, which is down", "unreachable: its device is down",
             HOST, DOWN_ADDR),
)
BY_NAME = {s.name: s for s in SCENARIOS}


# ---- the prediction: `ip route get` for the socket's parameters ------------------------------

@dataclass(frozen=True)
class Prediction:
    """What `ip route get` answers: the kernel's own route lookup, asked from user space."""
    command: str                   # "ip route get 198.51.100.1 oif eth1"
    route_type: str | None         # "UNICAST", "LOCAL", ...; None when the lookup failed
    dev: str | None
    table: str | None = None
    gateway: str | None = None
    error: str | None = None       # e.g. "Network is unreachable"

    def describe(self) -> str:
        if self.error:
            return f"error: {self.error}"
        return (f"{self.route_type} dev {self.dev}" + (f" via {self.gateway}" if self.gateway else "") +
                (f" table {self.table}" if self.table else ""))

    def to_dict(self) -> dict:
        return {"command": self.command, "route_type": self.route_type, "dev": self.dev, "table": self.table,
                "gateway": self.gateway, "error": self.error}


def route_get_args(daddr: str, options: SocketOptions | None = None) -> list[str]:
    """`ip route get`'s arguments for a socket: its bound device is the lookup's oif, its mark
    the fwmark, its bound address the source."""
    options = options or SocketOptions()
    return ["route", "get", daddr, *(["oif", options.device] if options.device else []),
            *(["mark", str(options.mark)] if options.mark is not None else []),
            *(["from", options.source] if options.source else [])]


def parse_route_get(command: str, stdout: str, returncode: int = 0, stderr: str = "") -> Prediction:
    """`ip -j route get`'s answer. iproute2 leaves out "type" for unicast routes."""
    if returncode != 0:
        return Prediction(command, None, None, error=(stderr.strip().splitlines() or ["failed"])[-1])
    try:
        (route,) = json.loads(stdout)
    except ValueError:
        return Prediction(command, None, None, error=f"unreadable answer: {stdout[:60]!r}")
    return Prediction(command, str(route.get("type", "unicast")).upper(), route.get("dev"),
                      str(route["table"]) if "table" in route else None, route.get("gateway"))


def predict(ns: str | None, daddr: str, options: SocketOptions | None = None) -> Prediction:
    """Ask the kernel, in namespace ns, which route a socket with these options would get."""
    args = route_get_args(daddr, options)
    out = subprocess.run(["ip", "-j", *(["-n", ns] if ns else []), *args], capture_output=True, text=True,
                         check=False, timeout=10)
    return parse_route_get("ip " + " ".join(args), out.stdout, out.returncode, out.stderr)


# ---- the network ---------------------------------------------------------------------------

def _veth(tag: str, host: str, host_dev: str, peer: str, peer_dev: str) -> None:
    # veth names are global until moved: unique ones first, renamed inside the namespaces.
    a, b = f"rt{tag}{host_dev[-1]}h", f"rt{tag}{host_dev[-1]}p"
    run_ip("link", "add", a, "type", "veth", "peer", "name", b)
    run_ip("link", "set", a, "netns", host)
    run_ip("link", "set", b, "netns", peer)
    run_ip("-n", host, "link", "set", a, "name", host_dev)
    run_ip("-n", peer, "link", "set", b, "name", peer_dev)
    run_ip("-n", peer, "link", "set", peer_dev, "up")


def vrf_driver_present(release: str | None = None) -> bool:
    """Whether the kernel has the vrf driver loaded, built in, or as a module it can load: a
    test holds the 'not available' statement against this, so it is never a silent skip."""
    import os
    from pathlib import Path
    release = release or os.uname().release
    if Path("/sys/module/vrf").exists():
        return True
    for index in ("modules.dep", "modules.builtin"):
        path = Path("/lib/modules") / release / index
        if path.exists() and "/vrf.ko" in path.read_text(errors="replace"):
            return True
    return False


def _try_vrf(host: str) -> str | None:
    """Make the VRF; None when done, else why it cannot be (this host has no vrf module)."""
    out = subprocess.run(["ip", "-n", host, "link", "add", VRF_DEV, "type", "vrf", "table", str(VRF_TABLE)],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return f"{NO_VRF} ({(out.stderr.strip().splitlines() or ['?'])[-1]})"
    return None


@dataclass
class ScenarioNet:
    """The scenarios' network, built on an experiment.Sandbox (whose peer end is renamed p0),
    with every listener the scenarios need. Owned by the sandbox: removed with it."""
    sandbox: Sandbox
    unavailable: dict[str, str] = field(default_factory=dict)   # feature -> why it is missing

    @property
    def host(self) -> str:
        return self.sandbox.host

    @property
    def peer(self) -> str:
        return self.sandbox.peer

    def ns(self, role: str) -> str:
        return self.host if role == HOST else self.peer

    def available(self, scenario: Scenario) -> str | None:
        """None, or the statement that the scenario cannot run on this kernel."""
        return self.unavailable.get(scenario.needs) if scenario.needs else None

    @classmethod
    def build(cls, sb: Sandbox, port: int) -> "ScenarioNet":
        host, peer = sb.host, sb.peer
        tag = host.split("-")[1]
        # The sandbox calls both veth ends eth0; here the peer's is p0, so a device can never be
        # credited to the wrong side because the names match.
        run_ip("-n", peer, "link", "set", "eth0", "down")
        run_ip("-n", peer, "link", "set", "eth0", "name", "p0")
        run_ip("-n", peer, "link", "set", "p0", "up")
        run_ip("-n", host, "addr", "add", f"{SECONDARY_ADDR}/24", "dev", "eth0")
        _veth(tag, host, "eth1", peer, "p1")
        run_ip("-n", host, "addr", "add", f"{ETH1_ADDR}/24", "dev", "eth1")
        run_ip("-n", peer, "addr", "add", f"{GATEWAY}/24", "dev", "p1")
        run_ip("-n", host, "link", "set", "eth1", "up")
        run_ip("-n", host, "route", "add", "default", "via", GATEWAY, "dev", "eth1")
        # An address on a device that goes down: up first, so NETDEV_DOWN runs as in real life.
        _veth(tag, host, "eth2", peer, "p2")
        run_ip("-n", host, "link", "set", "eth2", "up")
        run_ip("-n", host, "addr", "add", f"{DOWN_ADDR}/25", "dev", "eth2")
        run_ip("-n", host, "link", "set", "eth2", "down")
        run_ip("-n", host, "route", "add", "local", ANYIP_PREFIX, "dev", "lo")
        run_ip("-n", host, "rule", "add", "fwmark", str(POLICY_MARK), "lookup", str(POLICY_TABLE))
        run_ip("-n", host, "route", "add", PEER_ADDR, "via", GATEWAY, "dev", "eth1", "table", str(POLICY_TABLE))
        net = cls(sb)
        why = _try_vrf(host)
        if why:
            net.unavailable["vrf"] = why
        else:
            _veth(tag, host, VRF_SLAVE, peer, "p3")
            run_ip("-n", host, "link", "set", VRF_SLAVE, "master", VRF_DEV)
            run_ip("-n", host, "link", "set", VRF_DEV, "up")
            run_ip("-n", host, "link", "set", VRF_SLAVE, "up")
            run_ip("-n", host, "addr", "add", f"{VRF_ADDR}/32", "dev", VRF_SLAVE)
            sb.serve(host, port, addresses=[VRF_ADDR], device=VRF_DEV)
        # Every listener binds its address itself (never the wildcard): the kernel lets a socket
        # bind any address its local routes cover, the AnyIP one and the down device's too.
        sb.serve(host, port, addresses=["127.0.0.2", OWN_ADDR, SECONDARY_ADDR, ANYIP_ADDR, DOWN_ADDR])
        sb.serve(peer, port, addresses=[PEER_ADDR])
        return net

    def play(self, scenario: Scenario, port: int) -> str:
        """The scenario's client: what it saw ("ok", "timeout", ...)."""
        return connect_from(self.ns(scenario.client_ns), scenario.daddr, port, "tcp", scenario.options)

    def play_all(self, port: int, between=lambda: None) -> dict[str, str]:
        """Every scenario this kernel can run, one client each; `between` runs after each."""
        outcomes = {}
        for scenario in SCENARIOS:
            if not self.available(scenario):
                outcomes[scenario.name] = self.play(scenario, port)
                between()
        return outcomes

    def predict_all(self) -> dict[str, Prediction]:
        return {s.name: predict(self.ns(s.client_ns), s.daddr, s.options) for s in SCENARIOS if not self.available(s)}


def describe(sb: Sandbox) -> str:
    return (f"sandbox: namespaces {sb.host} (eth0 {OWN_ADDR}/24 +{SECONDARY_ADDR}, eth1 {ETH1_ADDR}/24, "
            f"eth2 {DOWN_ADDR}/25 down, {VRF_SLAVE} {VRF_ADDR} in VRF {VRF_DEV} where the kernel has it) and "
            f"{sb.peer} (p0 {PEER_ADDR}, p1 {GATEWAY}), removed on exit")


# ---- judging one scenario from the trace ---------------------------------------------------

@dataclass
class ScenarioRow:
    scenario: Scenario
    unavailable: str | None = None          # the statement when the kernel cannot run it
    prediction: Prediction | None = None
    client: str = ""
    route_types: list[str] = field(default_factory=list)
    route_devs: list[str] = field(default_factory=list)
    route_loopback: list[bool] = field(default_factory=list)
    route_srcs: list[str] = field(default_factory=list)
    fib_devs: list[str] = field(default_factory=list)
    fib_tables: list[int] = field(default_factory=list)
    xmit_devs: dict[str, int] = field(default_factory=dict)
    agrees: bool | None = None              # the prediction matches the kernel's route
    problems: list[str] = field(default_factory=list)   # where the kernel's documented behaviour was not seen
    explanation: str = ""

    @property
    def status(self) -> str:
        if self.unavailable:
            return "not available"
        return "ok" if not self.problems else "FAILED"

    def to_dict(self) -> dict:
        s = self.scenario
        return {"scenario": s.name, "case": s.case, "user_expects": s.user_expects,
                "client_netns": s.client_ns, "daddr": s.daddr,
                "options": {"device": s.options.device, "mark": s.options.mark, "source": s.options.source},
                "documented": {"route_type": s.route_type, "route_dev": s.route_dev,
                               "route_loopback": s.route_loopback, "xmit_devs": sorted(s.xmit_devs),
                               "client": s.client_sees},
                "status": self.status, "unavailable": self.unavailable,
                "prediction": self.prediction.to_dict() if self.prediction else None,
                "client": self.client or None, "route_types": self.route_types, "route_devs": self.route_devs,
                "route_loopback": self.route_loopback, "route_src": self.route_srcs, "fib_devs": self.fib_devs,
                "fib_tables": self.fib_tables, "xmit_devs": self.xmit_devs, "prediction_agrees": self.agrees,
                "problems": self.problems, "explanation": self.explanation}


def client_flows(flows: list[Flow], scenario: Scenario, netns_inode: int, port: int) -> list[Flow]:
    """The scenario client's own direction: its namespace, its destination, the port."""
    return [f for f in flows if f.netns == netns_inode and f.daddr == scenario.daddr and f.dport == port
            and f.proto == "tcp"]


def judge(scenario: Scenario, flows: list[Flow], *, kind: str, prediction: Prediction | None,
          client: str) -> ScenarioRow:
    """One row: the kernel's route per packet (from the flows) against the documented behaviour
    and against the prediction; the verdict engine explains it."""
    seen = DestinationSummary(scenario.daddr, kind)
    for f in flows:
        seen.add(f)
    row = ScenarioRow(scenario, prediction=prediction, client=client)
    row.route_types = sorted(seen.route_types)
    row.route_devs = sorted(seen.route_devs)
    row.route_loopback = sorted({f.route_loopback for f in flows if f.route_loopback is not None})
    row.route_srcs = sorted({f.route_src for f in flows if f.route_src})
    row.fib_devs = sorted(seen.fib_devs)
    row.fib_tables = sorted({t for r in seen.routes.values() for t in r.fib_tables})
    row.xmit_devs = {dev: n for dev, n in sorted(seen.xmit_devs.items()) if n}
    row.explanation = seen.explanation
    want = f"{scenario.route_type} on {scenario.route_dev}"
    if not flows or not row.xmit_devs:
        row.problems.append("no packets were seen for this scenario's client")
    else:
        if row.route_types != [scenario.route_type] or row.route_devs != [scenario.route_dev]:
            row.problems.append(f"route {'/'.join(row.route_types) or '?'} on {'/'.join(row.route_devs) or '?'}, "
                                f"documented: {want}")
        if row.route_loopback and row.route_loopback != [scenario.route_loopback]:
            row.problems.append(f"route device loopback flag {row.route_loopback}, documented "
                                f"{scenario.route_loopback}")
        if set(row.xmit_devs) != set(scenario.xmit_devs):
            row.problems.append(f"sent on {'/'.join(sorted(row.xmit_devs))}, documented: "
                                f"{'/'.join(sorted(scenario.xmit_devs))}")
    if client != scenario.client_sees:
        row.problems.append(f"the client got {client!r}, documented: {scenario.client_sees!r}")
    if prediction is not None:
        row.agrees = (prediction.route_type, prediction.dev) == (scenario.route_type, scenario.route_dev) and \
            row.route_types == [prediction.route_type] and row.route_devs == [prediction.dev]
        if not row.agrees:
            row.problems.append(f"ip route get predicted {prediction.describe()}, the kernel used "
                                f"{'/'.join(row.route_types) or '?'} on {'/'.join(row.route_devs) or '?'}")
    return row


def row_for(net: ScenarioNet, scenario: Scenario, flows: list[Flow], port: int, outcome: str,
            prediction: Prediction | None, own_addresses=netns.addresses) -> ScenarioRow:
    """The scenario's row from a trace's flows (every namespace's): the live run, the VM matrix
    and the BPF tests all judge through here."""
    why = net.available(scenario)
    if why:
        return unavailable_row(scenario, why)
    inode = netns.inode_of(net.ns(scenario.client_ns))
    kind = classify(scenario.daddr, own_addresses(inode))
    return judge(scenario, client_flows(flows, scenario, inode, port), kind=kind, prediction=prediction,
                 client=outcome)


def unavailable_row(scenario: Scenario, why: str) -> ScenarioRow:
    return ScenarioRow(scenario, unavailable=why, explanation=why)


def verdict(rows: list[ScenarioRow]) -> tuple[int, str]:
    ran = [r for r in rows if not r.unavailable]
    bad = [r for r in ran if r.problems]
    missing = [r for r in rows if r.unavailable]
    tail = "".join(f"; {r.scenario.name}: {r.unavailable}" for r in missing)
    if bad:
        return 1, ("the kernel did NOT do what its code documents in " + "; ".join(
            f"{r.scenario.name} ({', '.join(r.problems)})" for r in bad) + tail)
    if not ran:
        return 1, "no scenario could run" + tail
    return 0, (f"all {len(ran)} scenarios that ran did what the kernel's code documents, and ip route get "
               f"predicted each route" + tail)


def _kernel_did(r: ScenarioRow) -> str:
    if r.unavailable:
        return "-"
    route = f"{'/'.join(r.route_types) or '?'} on {'/'.join(r.route_devs) or '?'}"
    sent = " ".join(f"{d}:{n}" for d, n in r.xmit_devs.items()) or "nothing"
    return text(f"{route}, sent on {sent}")


def render(rows: list[ScenarioRow], code: int, verdict_text: str, losses) -> str:
    table = [(r.scenario.name, r.scenario.user_expects,
              text(r.prediction.describe()) if r.prediction else "-", _kernel_did(r),
              "-" if r.agrees is None else ("yes" if r.agrees else "NO"), r.client or "-",
              r.unavailable or (r.status if not r.problems else "FAILED: " + "; ".join(r.problems))) for r in rows]
    body = tabulate(table, headers=("SCENARIO", "A USER MIGHT EXPECT", "IP ROUTE GET PREDICTS", "KERNEL DID",
                                    "AGREE", "CLIENT", "RESULT"), disable_numparse=True)
    cases = "\n".join(f"  {r.scenario.name}: {r.scenario.case}" + (f"\n      ip: {r.prediction.command}"
                                                                    if r.prediction else "") for r in rows)
    why = "\n".join(f"  {r.scenario.name}: {text(r.explanation)}" for r in rows)
    return (f"{body}\n\ncases:\n{cases}\n\nwhy (the verdict engine):\n{why}\n\n"
            f"verdict: {text(verdict_text)}\n{losses_line(losses)}")


# ---- the run -------------------------------------------------------------------------------

def run(plan, headers_path, net: ScenarioNet, *, port: int, as_json: bool = False, record: str | None = None,
        force: bool = False, out=None, err=None) -> int:
    """Trace (the normal live session) while every scenario's client runs; one row each."""
    from .record import TraceWriter
    from .session import Session
    out, err = out or sys.stdout, err or sys.stderr
    predictions = net.predict_all()
    recorder = TraceWriter(record, force=force) if record else None
    with Session(plan, headers_path, recorder) as session:
        print(f"Tracing ({plan.backend} plan) while {len(predictions)} scenario clients connect on port {port}...",
              file=err, flush=True)
        outcomes = net.play_all(port, between=lambda: session.pump(20))
        time.sleep(0.2)                  # the last ACKs of each close
        result = session.finish()
    rows = [row_for(net, scenario, result.flows, port, outcomes.get(scenario.name, ""),
                    predictions.get(scenario.name), result.own) for scenario in SCENARIOS]
    code, verdict_text = verdict(rows)
    if as_json:
        print(json_line({"type": "scenarios", "port": port, "rows": [r.to_dict() for r in rows],
                         "verdict": {"exit": code, "text": verdict_text}, "lost": result.losses.to_dict()}),
              file=out)
    else:
        print(render(rows, code, verdict_text, result.losses), file=out)
    if code == 0 and result.recording_error:
        return 3
    return code


def experiment(prepare, *, port: int, as_json: bool, record: str | None = None, force: bool = False) -> int:
    """Build the network, then run(). prepare(filters) -> (plan, headers)."""
    import contextlib
    from .probes import Filters
    with contextlib.ExitStack() as stack:
        sb = stack.enter_context(Sandbox())
        print(describe(sb), file=sys.stderr, flush=True)
        net = ScenarioNet.build(sb, port)
        # Two namespaces: the filter is the port, the rows pick each client's namespace.
        plan, headers = prepare(Filters(port=port))
        return run(plan, headers, net, port=port, as_json=as_json, record=record, force=force)

