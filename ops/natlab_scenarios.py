"""The NAT lab's scenarios and the exact commands that build them, as data (no processes run here).

Kept apart from the shell in `ops.natlab` so the topology, the addresses and every firewall rule can
be read and unit-tested without root. A `Plan` is everything `Lab.up()` feeds to `ip -b` and `nft -f`.

Addresses come from documentation ranges (198.51.100.0/24, 2001:db8::/32) plus 10.0.X.0/24 on the
LANs; all of them live only inside the namespaces the lab creates, nothing is linked to the root
namespace, so no packet can leave the machine.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# One lab = one prefix; every namespace is "<prefix>-<node>". Prefixes contain no dash, so
# "<prefix>-" never matches another lab's namespaces.
PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{0,11}$")
NODE_NAMES = ("wan", "ra", "rb", "ha", "hb", "ha2")

SERVER_V4 = ("198.51.100.1", "198.51.100.2")
WAN_LINK_V4 = "198.51.100.250"
"""The server host's own address on the bridge (the servers' addresses are on its lo)."""
SERVER_V6 = ("2001:db8:100::1", "2001:db8:100::2")

NAT_VARIANTS: dict[str, str] = {
    "cone": "endpoint-independent mapping (masquerade keeps the port), replies only (port-restricted cone)",
    "symmetric": "masquerade fully-random: a new random port per destination, replies only",
    "sequential": "snat to the next port of a counter per new flow (numgen inc): symmetric, predictable, replies only",
    "fullcone": "1:1 port-preserving SNAT + DNAT of all inbound TCP/UDP to the first host (full cone)",
    "udp-blocked": "all forwarded UDP dropped both ways; TCP NATed as cone",
    "reject": "cone, but unsolicited inbound gets TCP RST / ICMP port-unreachable instead of silence",
    "lossy": "cone plus 5 % random loss on forwarded UDP in each direction (nft numgen)",
    "public": "no router: the host sits on the wan bridge with a public address",
}


SEQUENTIAL_FIRST_PORT = 20000
SEQUENTIAL_PORTS = 1000
"""The `sequential` NAT hands out ports 20000..20999 in turn, then starts over."""


class PlanError(ValueError):
    """A scenario or prefix that cannot be built; the message is one line for the user."""


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    path: str  # the connection path an agent pair should end up on
    a: str  # NAT variant of side A
    b: str | None  # NAT variant of side B, None = no side B
    ha2: bool = False  # a second host on A's LAN
    ipv6: bool = False  # global v6 on hosts, routed, stateful firewall on routers
    roams: bool = False  # hb also has a spare link to wan (eth1, down): `Lab.roam("hb")` moves it there


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("both-cone", "A and B behind port-restricted cone NATs", "udp_punch or tcp_punch (direct)",
                 "cone", "cone"),
        Scenario("cone-symmetric", "A behind cone, B behind a random-port symmetric NAT",
                 "relay (no punch unless birthday probing finds the random port)", "cone", "symmetric"),
        Scenario("sequential-cone", "A behind a sequential-port symmetric NAT, B behind cone",
                 "relay until port prediction meets B (A's next ports follow a counter)", "sequential", "cone"),
        Scenario("both-symmetric", "A and B behind random-port symmetric NATs", "relay", "symmetric", "symmetric"),
        Scenario("udp-blocked", "both routers drop all UDP (TCP NATed as cone): both agents register over TCP",
                 "tcp_punch (else relay over TCP); no UDP/KCP path", "udp-blocked", "udp-blocked"),
        Scenario("one-public", "A has a public address on wan, B behind cone",
                 "direct (B connects to A's public address) or a punch", "public", "cone"),
        Scenario("same-lan", "ha and ha2 on one LAN behind one cone NAT (no side B)",
                 "lan (rendezvous sees one public address for both)", "cone", None, ha2=True),
        Scenario("ipv6", "v6 routed without NAT behind stateful firewalls; v4 cone on both sides",
                 "ipv6 (v4 udp_punch works too)", "cone", "cone", ipv6=True),
        Scenario("ipv6-v4symmetric", "like ipv6, but v4 is symmetric on both sides so only v6 goes direct",
                 "ipv6 (v4 would need the relay)", "symmetric", "symmetric", ipv6=True),
        Scenario("lossy-cone", "A behind cone with 5 % UDP loss each way, B behind cone",
                 "udp_punch + KCP (retransmits hide the loss)", "lossy", "cone"),
        Scenario("fullcone-symmetric", "A behind a full cone, B behind a random-port symmetric NAT",
                 "udp_punch (B's packets reach A's mapping from any port)", "fullcone", "symmetric"),
        Scenario("reject", "A and B behind cone NATs that answer unsolicited packets with RST/ICMP",
                 "udp_punch or tcp_punch after retries (early SYNs are refused)", "reject", "reject"),
        Scenario("roaming", "both behind symmetric NATs; then hb moves to a public address on wan (Lab.roam)",
                 "relay, then a direct punch once B has noticed the move", "symmetric", "symmetric", roams=True),
    )
}


@dataclass
class Node:
    """One namespace: what it is and the addresses it holds (own interface, and as seen from wan)."""

    name: str
    role: str
    v4: str
    v6: str | None = None
    public_v4: str = ""
    public_v6: str | None = None
    gateway: str | None = None
    lan: str | None = None  # routers: LAN side address
    lan_v6: str | None = None
    nat: str | None = None  # routers and hosts: NAT variant of their side
    roam_v4: str | None = None  # hosts that can roam: their public address on wan after the move


@dataclass
class Plan:
    """Everything needed to build one scenario under one prefix, in the order it must run."""

    prefix: str
    scenario: Scenario
    nodes: dict[str, Node]
    netns_batch: list[str]  # `ip -b -` in the root namespace: create the namespaces
    link_batch: list[str]  # then (after the sysctls) the veth pairs, born inside the namespaces
    sysctls: dict[str, list[str]] = field(default_factory=dict)  # node -> ["key=value", ...]
    ip_batch: dict[str, list[str]] = field(default_factory=dict)  # node -> `ip -n NS -b -` lines
    nft: dict[str, str] = field(default_factory=dict)  # node -> ruleset for `nft -f -`

    def ns(self, node: str) -> str:
        return f"{self.prefix}-{node}"


def check_prefix(prefix: str) -> str:
    if not PREFIX_RE.match(prefix):
        raise PlanError(f"bad prefix {prefix!r}: want a lowercase letter then up to 11 of [a-z0-9] (no dash)")
    return prefix


def get_scenario(name: str) -> Scenario:
    try:
        return SCENARIOS[name]
    except KeyError:
        raise PlanError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}") from None


def side_index(side: str) -> int:
    return {"a": 1, "b": 2}[side]


def router_ruleset_v4(nat: str, host_v4: str, router_v4: str) -> str:
    """The v4 nftables ruleset of a router; one `nft -f` call per router keeps setup fast.

    Mapping: Linux NAT keeps the source port unless that would clash, which gives endpoint-independent
    mapping; `fully-random` picks a fresh random port per conntrack entry (endpoint-dependent).
    Filtering: conntrack admits only packets of flows the LAN opened (same remote ip:port), which is
    port-restricted; the full cone instead DNATs every new inbound TCP/UDP packet to the host.

    Limits, on purpose: `cone` stays endpoint-independent only while ports do not clash (a second
    LAN host using the same source port towards the same destination gets another port). `fullcone`
    is really a 1:1 "DMZ host" NAT: every inbound TCP/UDP port reaches the first host, mapped or not,
    which includes full-cone filtering; a second host on that LAN gets no unsolicited inbound.
    Unsolicited packets to the router itself are dropped in `input` (the kernel would otherwise
    answer with RST / port-unreachable, which is what `reject` asks for explicitly).
    """
    if nat not in NAT_VARIANTS or nat == "public":
        raise PlanError(f"no router ruleset for NAT variant {nat!r}")
    pre: list[str] = []
    if nat == "fullcone":
        pre.append(f'iifname "wan" meta l4proto {{ tcp, udp }} dnat to {host_v4}')
    if nat == "symmetric":
        post = ['oifname "wan" masquerade fully-random']
    elif nat == "sequential":
        # one counter for every new flow of the LAN, as a busy carrier-grade NAT hands ports out. The
        # counter goes through a map: a bare `numgen` lands in the port in host byte order (20000,
        # 20001 become 8270, 8526: a step of 256 where a real allocator steps by one).
        ports = ", ".join(f"{i} : {SEQUENTIAL_FIRST_PORT + i}" for i in range(SEQUENTIAL_PORTS))
        post = [
            f'oifname "wan" meta l4proto {{ tcp, udp }} snat to {router_v4} : numgen inc mod {SEQUENTIAL_PORTS} '
            f"map {{ {ports} }}",
            'oifname "wan" masquerade',
        ]
    elif nat == "fullcone":
        post = [f'oifname "wan" snat to {router_v4}']
    else:
        post = ['oifname "wan" masquerade']
    fwd: list[str] = []
    if nat == "udp-blocked":
        fwd.append("meta l4proto udp drop")
    if nat == "lossy":
        fwd.append("meta l4proto udp numgen random mod 1000 < 50 drop")
    fwd += ["ct state established,related accept", 'iifname "lan" oifname "wan" accept']
    if nat == "fullcone":
        fwd.append('iifname "wan" oifname "lan" ct status dnat accept')
    inp = ['iifname != "wan" accept', "ct state established,related accept", "icmp type echo-request accept"]
    if nat == "udp-blocked":
        inp.insert(0, 'iifname "wan" meta l4proto udp drop')
    if nat == "reject":
        inp += ["meta l4proto tcp reject with tcp reset", "meta l4proto udp reject with icmp type port-unreachable"]
    inp.append("drop")
    return _table(
        "ip natlab",
        [
            ("prerouting", "type nat hook prerouting priority dstnat; policy accept;", pre),
            ("postrouting", "type nat hook postrouting priority srcnat; policy accept;", post),
            ("forward", "type filter hook forward priority filter; policy drop;", fwd),
            ("input", "type filter hook input priority filter; policy accept;", inp),
        ],
    )


def router_ruleset_v6() -> str:
    """No NAT66: hosts keep their global addresses; the router only lets replies and LAN-opened flows in."""
    nd = "nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit, nd-router-advert, echo-request"
    return _table(
        "ip6 natlab6",
        [
            (
                "forward",
                "type filter hook forward priority filter; policy drop;",
                ["ct state established,related accept", 'iifname "lan" oifname "wan" accept'],
            ),
            (
                "input",
                "type filter hook input priority filter; policy accept;",
                ['iifname != "wan" accept', "ct state established,related accept", f"icmpv6 type {{ {nd} }} accept",
                 "drop"],
            ),
        ],
    )


def _table(name: str, chains: list[tuple[str, str, list[str]]]) -> str:
    lines = [f"table {name} {{"]
    for chain, head, rules in chains:
        lines.append(f"  chain {chain} {{")
        lines.append(f"    {head}")
        lines += [f"    {r}" for r in rules]
        lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


# Every namespace: no reverse-path filtering, and bridged frames kept out of the IP firewall
# (br_netfilter, when loaded, would otherwise run LAN-to-LAN frames through FORWARD). These are set
# before any link exists so the `default` values apply to every interface: no IPv6 at all in v4
# scenarios, and no duplicate address detection in v6 ones (DAD would hold link-local addresses
# tentative for a second, and a router cannot send neighbour solicitations without one).
_COMMON_SYSCTLS = [
    "net.ipv4.conf.all.rp_filter=0",
    "net.ipv4.conf.default.rp_filter=0",
    "net.bridge.bridge-nf-call-iptables=0",
    "net.bridge.bridge-nf-call-ip6tables=0",
    "net.bridge.bridge-nf-call-arptables=0",
]
_NO_V6 = ["net.ipv6.conf.default.disable_ipv6=1"]  # links get no IPv6; lo keeps ::1
_V6 = ["net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0",
       "net.ipv6.conf.all.accept_ra=0", "net.ipv6.conf.default.accept_ra=0"]


def _veth(plan: Plan, node: str, ifname: str, peer_node: str, peer_ifname: str) -> None:
    """A veth pair created inside both namespaces at once, so it never exists in the root namespace.

    Each end gets an ifindex unique in the lab: the kernel treats a veth's carrier change as urgent
    only when the device's ifindex differs from its peer's, and both ends would otherwise be number 2
    in their fresh namespaces, delaying the change (and so IPv6 link-local addresses) by up to 1 s.
    """
    first = 10 + 2 * len(plan.link_batch)
    plan.link_batch.append(f"link add {ifname} netns {plan.ns(node)} index {first} type veth "
                           f"peer name {peer_ifname} netns {plan.ns(peer_node)} index {first + 1}")


def build_plan(scenario: Scenario, prefix: str) -> Plan:
    """Turn a scenario into namespaces, veth pairs, addresses, routes, sysctls and rulesets."""
    check_prefix(prefix)
    v6 = scenario.ipv6
    sides: list[tuple[str, str]] = [("a", scenario.a)]
    if scenario.b is not None:
        sides.append(("b", scenario.b))
    for _, nat in sides:
        if nat not in NAT_VARIANTS:
            raise PlanError(f"unknown NAT variant {nat!r}; known: {', '.join(NAT_VARIANTS)}")
    if scenario.ha2 and scenario.a == "public":
        raise PlanError("ha2 needs a router on side A")

    plan = Plan(prefix=prefix, scenario=scenario, nodes={}, netns_batch=[], link_batch=[])
    ns = plan.ns
    wan_v6 = SERVER_V6[0] if v6 else None
    plan.nodes["wan"] = Node("wan", "internet: bridge br0, servers (their v4 addresses on lo)", SERVER_V4[0], wan_v6,
                             SERVER_V4[0], wan_v6)
    wan_lines = ["link set lo up", "link add br0 type bridge stp_state 0 forward_delay 0", "link set br0 up"]
    # A multi-homed service host, as deployed: the servers' addresses live on lo and br0 has a link
    # address of its own, so whatever leaves with the kernel's choice of source (a UDP answer from a
    # socket bound to 0.0.0.0) comes from WAN_LINK_V4, not the address the client sent to.
    wan_lines += [f"addr add {WAN_LINK_V4}/24 dev br0"]
    wan_lines += [f"addr add {a}/32 dev lo" for a in SERVER_V4]
    if v6:
        wan_lines += [f"addr add {a}/64 dev br0 nodad" for a in SERVER_V6]
    order = ["wan"]
    v6_routes: list[tuple[str, str]] = []  # (LAN prefix, router's wan v6) for everything on the bridge
    on_wan: list[str] = ["wan"]

    for side, nat in sides:
        n = side_index(side)
        hosts = [f"h{side}"] + (["ha2"] if side == "a" and scenario.ha2 else [])
        if nat == "public":
            host = hosts[0]
            pub4 = f"198.51.100.2{n}"
            pub6 = f"2001:db8:100::2{n}" if v6 else None
            plan.nodes[host] = Node(host, f"host {side.upper()} (public)", pub4, pub6, pub4, pub6, nat=nat)
            _veth(plan, host, "eth0", "wan", host)
            wan_lines += [f"link set {host} master br0", f"link set {host} up"]
            lines = ["link set lo up", f"addr add {pub4}/24 dev eth0"]
            if pub6:
                lines.append(f"addr add {pub6}/64 dev eth0 nodad")
            plan.ip_batch[host] = [*lines, "link set eth0 up"]
            order.append(host)
            on_wan.append(host)
            continue
        router = f"r{side}"
        r4, r6 = f"198.51.100.1{n}", (f"2001:db8:100::1{n}" if v6 else None)
        lan4, lan6 = f"10.0.{n}.1", (f"2001:db8:{n}::1" if v6 else None)
        plan.nodes[router] = Node(router, f"router {side.upper()} ({nat})", r4, r6, r4, r6, lan=lan4, lan_v6=lan6,
                                  nat=nat)
        _veth(plan, router, "wan", "wan", router)
        wan_lines += [f"link set {router} master br0", f"link set {router} up"]
        rl = ["link set lo up", f"addr add {r4}/24 dev wan",
              "link add lan type bridge stp_state 0 forward_delay 0", f"addr add {lan4}/24 dev lan"]
        if v6:
            rl += [f"addr add {r6}/64 dev wan nodad", f"addr add {lan6}/64 dev lan nodad"]
            v6_routes.append((f"2001:db8:{n}::/64", str(r6)))
        order.append(router)
        on_wan.append(router)
        first_host_v4 = f"10.0.{n}.2"
        for i, host in enumerate(hosts):
            h4 = f"10.0.{n}.{2 + i}"
            h6 = f"2001:db8:{n}::{2 + i}" if v6 else None
            plan.nodes[host] = Node(host, f"host {side.upper()}" + (" (second)" if i else ""), h4, h6, r4, h6,
                                    gateway=lan4, nat=nat)
            _veth(plan, host, "eth0", router, host)
            rl += [f"link set {host} master lan", f"link set {host} up"]
            hl = ["link set lo up", f"addr add {h4}/24 dev eth0", "link set eth0 up", f"route add default via {lan4}"]
            if h6:
                hl[2:2] = [f"addr add {h6}/64 dev eth0 nodad"]
                hl.append(f"route add ::/0 via {lan6}")
            if scenario.roams and host == "hb":
                # The spare link: both ends exist from the start (the wan end bridged and up), the
                # host's end stays down without an address until Lab.roam() moves the host onto it.
                plan.nodes[host].roam_v4 = f"198.51.100.2{n}"
                _veth(plan, host, "eth1", "wan", f"{host}x")
                wan_lines += [f"link set {host}x master br0", f"link set {host}x up"]
            plan.ip_batch[host] = hl
            order.append(host)
        rl += ["link set lan up", "link set wan up"]
        plan.ip_batch[router] = rl
        plan.nft[router] = router_ruleset_v4(nat, first_host_v4, r4) + (router_ruleset_v6() if v6 else "")
        plan.sysctls[router] = ["net.ipv4.ip_forward=1"] + (["net.ipv6.conf.all.forwarding=1"] if v6 else [])

    wan_lines += ["link set br0 up"]
    plan.ip_batch["wan"] = wan_lines
    if v6:
        for node in on_wan:
            own = plan.nodes[node].v6
            plan.ip_batch[node] += [f"route add {pfx} via {gw}" for pfx, gw in v6_routes if gw != own]
    plan.netns_batch = [f"netns add {ns(node)}" for node in order]
    for node in order:
        plan.sysctls[node] = _COMMON_SYSCTLS + (_V6 if v6 else _NO_V6) + plan.sysctls.get(node, [])
    plan.nodes = {node: plan.nodes[node] for node in order}
    return plan
