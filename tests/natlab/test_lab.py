"""The NAT lab does what it says, checked with plain sockets against the real kernel.

Negative checks ("this packet was dropped") never wait for a timeout to prove absence: the
unwanted packet is sent first, then a wanted one along the same path; if the first had passed it
would be read first. Receives that must succeed have a generous timeout only as a safety net.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ops.natlab import SCENARIOS, SERVER_V4, SERVER_V6, Lab, LabError, lab_namespaces, list_namespaces
from ops.natlab_scenarios import NAT_VARIANTS, PlanError, build_plan, get_scenario, router_ruleset_v4

pytestmark = pytest.mark.natlab

NETPROBE = str(Path(__file__).with_name("netprobe.py"))
REPO = Path(__file__).resolve().parents[2]
SAFETY = 5.0  # seconds a datagram that must arrive may take before the test fails
STUN_PORTS = (3478, 3479)


# ---- helpers ------------------------------------------------------------------------------------
def start_stun(lab: Lab) -> subprocess.Popen[str]:
    """netprobe in wan on both server addresses and two ports each (v6 too when the lab has it)."""
    binds = [f"{a}:{p}" for a in SERVER_V4 for p in STUN_PORTS]
    if lab.scenario.ipv6:
        binds += [f"[{a}]:{p}" for a in SERVER_V6 for p in STUN_PORTS]
    proc = lab.popen("wan", [sys.executable, NETPROBE, *binds], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


def udp(lab: Lab, host: str, v6: bool = False, port: int = 0, bind: str | None = None) -> socket.socket:
    s = lab.socket(host, socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((bind if bind is not None else ("::" if v6 else "0.0.0.0"), port))
    s.settimeout(SAFETY)
    return s


def stun(sock: socket.socket, server: tuple[str, int]) -> tuple[str, int]:
    sock.sendto(b"?", server)
    data, src = sock.recvfrom(2048)
    assert src[:2] == server
    ip, port = json.loads(data)["seen"]
    return ip, int(port)


def recv_text(sock: socket.socket) -> tuple[str, tuple[str, int]]:
    data, src = sock.recvfrom(2048)
    return data.decode(), (src[0], src[1])


def force_rcvbuf(sock: socket.socket, size: int = 8 << 20) -> None:
    sock.setsockopt(socket.SOL_SOCKET, 33, size)  # SO_RCVBUFFORCE (root): keep bursts out of the loss count


# ---- the plan, without root -----------------------------------------------------------------------
def test_every_scenario_plans_namespaces_routers_and_rules() -> None:
    wanted = {"both-cone", "cone-symmetric", "both-symmetric", "udp-blocked", "one-public", "same-lan", "ipv6",
              "lossy-cone", "fullcone-symmetric", "reject"}
    assert wanted <= set(SCENARIOS)
    for name, sc in SCENARIOS.items():
        plan = build_plan(sc, "ptlplan")
        assert plan.netns_batch == [f"netns add ptlplan-{n}" for n in plan.nodes]
        assert all(plan.ns(n).startswith("ptlplan-") for n in plan.nodes)
        routers = [n for n in plan.nodes if n.startswith("r")]
        assert sorted(plan.nft) == sorted(routers), name
        for node in plan.nodes:
            assert plan.ip_batch[node][0] == "link set lo up"
            assert "net.ipv4.conf.all.rp_filter=0" in plan.sysctls[node]
        for r in routers:
            assert "net.ipv4.ip_forward=1" in plan.sysctls[r]
            assert ("table ip6 natlab6" in plan.nft[r]) == sc.ipv6
        # no link is ever created in the root namespace: both ends name a lab namespace
        for line in plan.link_batch:
            assert line.count(" netns ptlplan-") == 2, line
    assert set(build_plan(get_scenario("same-lan"), "x").nodes) == {"wan", "ra", "ha", "ha2"}
    one_public = build_plan(get_scenario("one-public"), "x").nodes
    assert one_public["ha"].public_v4 == one_public["ha"].v4 == "198.51.100.21" and "ra" not in one_public


def test_rulesets_are_what_the_variants_claim() -> None:
    rules = {nat: router_ruleset_v4(nat, "10.0.1.2", "198.51.100.11") for nat in NAT_VARIANTS if nat != "public"}
    assert 'oifname "wan" masquerade\n' in rules["cone"]
    assert "masquerade fully-random" in rules["symmetric"]
    assert "snat to 198.51.100.11" in rules["fullcone"] and "dnat to 10.0.1.2" in rules["fullcone"]
    assert "meta l4proto udp drop" in rules["udp-blocked"]
    assert "reject with tcp reset" in rules["reject"] and "port-unreachable" in rules["reject"]
    assert "numgen random mod 1000 < 50 drop" in rules["lossy"]
    for nat, text in rules.items():
        assert "policy drop" in text and "ct state established,related accept" in text, nat


def test_plan_rejects_bad_input() -> None:
    for prefix in ("", "Bad", "a-b", "1abc", "a" * 13, "x;rm"):
        with pytest.raises(PlanError, match="bad prefix"):
            build_plan(get_scenario("both-cone"), prefix)
    with pytest.raises(PlanError, match="unknown scenario"):
        get_scenario("nope")
    with pytest.raises(PlanError, match="unknown NAT variant"):
        build_plan(get_scenario("both-cone").__class__("x", "", "", "cone", "bogus"), "ok")


def test_cli_list_names_every_scenario_and_its_path() -> None:
    out = subprocess.run([sys.executable, "-m", "ops.natlab", "list"], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    for name, sc in SCENARIOS.items():
        assert name in out and sc.path in out


def test_cli_bad_arguments_give_one_line() -> None:
    proc = subprocess.run([sys.executable, "-m", "ops.natlab", "up", "no-such"], cwd=REPO, capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith("natlab: ") and proc.stderr.count("\n") == 1


# ---- mapping --------------------------------------------------------------------------------------
def test_cone_maps_independently_of_endpoint_and_symmetric_does_not(natlab) -> None:
    lab = natlab("cone-symmetric")
    start_stun(lab)
    servers = [(a, p) for a in SERVER_V4 for p in STUN_PORTS]

    ha = udp(lab, "ha")
    seen_a = {stun(ha, s) for s in servers}
    assert seen_a == {("198.51.100.11", ha.getsockname()[1])}  # one mapping, source port kept

    hb = udp(lab, "hb")
    seen_b = [stun(hb, s) for s in servers]
    assert {ip for ip, _ in seen_b} == {"198.51.100.12"}
    assert len({port for _, port in seen_b}) > 1  # a new mapping per destination (random ports)
    assert stun(hb, servers[0]) == seen_b[0]  # but stable for the same destination


# ---- filtering --------------------------------------------------------------------------------------
def test_cone_drops_unsolicited_and_passes_after_the_host_sent(natlab) -> None:
    lab = natlab("both-cone")
    start_stun(lab)
    ha = udp(lab, "ha")
    pub = stun(ha, (SERVER_V4[0], 3478))
    peer = udp(lab, "wan", port=5000, bind=SERVER_V4[1])
    peer.connect(pub)  # a connected socket would report an ICMP error: the cone must stay silent
    other_port = udp(lab, "wan", port=5001, bind=SERVER_V4[1])

    peer.send(b"unsolicited")
    ha.sendto(b"hello", (SERVER_V4[1], 5000))
    assert peer.recv(2048) == b"hello"  # no ConnectionRefusedError: dropped, not rejected
    other_port.sendto(b"wrong port", pub)  # port-restricted: same ip, another port stays out
    peer.send(b"solicited")
    assert recv_text(ha) == ("solicited", (SERVER_V4[1], 5000))

    tcp = lab.socket("wan", socket.AF_INET, socket.SOCK_STREAM)
    tcp.settimeout(0.3)
    with pytest.raises(TimeoutError):  # an unsolicited SYN is dropped (no RST)
        tcp.connect(("198.51.100.11", 4444))
    tcp.close()


def test_fullcone_admits_any_wan_source_to_the_mapping(natlab) -> None:
    lab = natlab("fullcone-symmetric")
    start_stun(lab)
    ha = udp(lab, "ha")
    pub = stun(ha, (SERVER_V4[0], 3478))
    assert pub == ("198.51.100.11", ha.getsockname()[1])  # 1:1, port kept

    stranger = udp(lab, "wan", port=5002, bind=SERVER_V4[1])
    stranger.sendto(b"from a stranger", pub)
    assert recv_text(ha) == ("from a stranger", (SERVER_V4[1], 5002))

    hb = udp(lab, "hb")  # behind the symmetric NAT: its mapping towards ha is random, ha still gets it
    hb.sendto(b"punch", pub)
    text, src = recv_text(ha)
    assert text == "punch" and src[0] == "198.51.100.12"
    ha.sendto(b"back", src)
    assert recv_text(hb) == ("back", pub)


def test_reject_answers_with_rst_and_port_unreachable(natlab) -> None:
    lab = natlab("reject")
    tcp = lab.socket("wan", socket.AF_INET, socket.SOCK_STREAM)
    tcp.settimeout(SAFETY)
    with pytest.raises(ConnectionRefusedError):
        tcp.connect(("198.51.100.11", 4444))
    tcp.close()
    peer = udp(lab, "wan")
    peer.connect(("198.51.100.12", 4444))
    peer.send(b"unsolicited")
    with pytest.raises(ConnectionRefusedError):
        peer.recv(2048)


def test_udp_blocked_drops_udp_but_not_tcp(natlab) -> None:
    lab = natlab("udp-blocked")
    sink = udp(lab, "wan", port=6000, bind=SERVER_V4[0])
    listener = lab.socket("wan", socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((SERVER_V4[0], 6001))
    listener.listen()
    listener.settimeout(SAFETY)

    ha_udp = udp(lab, "ha")
    ha_udp.sendto(b"udp from ha", (SERVER_V4[0], 6000))
    ha_tcp = lab.socket("ha", socket.AF_INET, socket.SOCK_STREAM)
    ha_tcp.settimeout(SAFETY)
    ha_tcp.connect((SERVER_V4[0], 6001))  # the TCP round trip went after the UDP datagram
    conn, src = listener.accept()
    assert src[0] == "198.51.100.11"
    ha_tcp.sendall(b"tcp from ha")
    assert conn.recv(100) == b"tcp from ha"
    sink.setblocking(False)
    with pytest.raises(BlockingIOError):
        sink.recv(2048)
    hb_tcp = lab.socket("hb", socket.AF_INET, socket.SOCK_STREAM)  # B's router drops UDP too (both sides)
    hb_tcp.settimeout(SAFETY)
    udp(lab, "hb").sendto(b"udp from hb", (SERVER_V4[0], 6000))
    hb_tcp.connect((SERVER_V4[0], 6001))
    conn_b, src_b = listener.accept()
    assert src_b[0] == "198.51.100.12"
    with pytest.raises(BlockingIOError):
        sink.recv(2048)
    for s in (conn, conn_b, ha_tcp, hb_tcp, listener):
        s.close()


# ---- loss -------------------------------------------------------------------------------------------
def _count_through(sender: socket.socket, receiver: socket.socket, dest: tuple[str, int], n: int) -> int:
    """Send n numbered datagrams then end markers (20 copies: all lost with p = 0.05**20).

    Each round has its own tag so spare end markers of an earlier round are ignored.
    """
    tag = os.urandom(4).hex().encode()
    for i in range(n):
        sender.sendto(b"%s d%d" % (tag, i), dest)
        if i % 25 == 24:
            time.sleep(0.0005)  # let the per-CPU backlog drain; loss must come from the rule only
    for _ in range(20):
        sender.sendto(tag + b" end", dest)
    got: set[bytes] = set()
    while True:
        data = receiver.recv(64)
        if data == tag + b" end":
            return len(got)
        if data.startswith(tag + b" d"):
            got.add(data)


def test_lossy_drops_about_five_percent_each_way(natlab) -> None:
    # N = 1000 rather than 400: with p = 0.05 the expected 50 losses sit > 5 sd from both bounds
    # (10 and 150), so a flake needs a ~1e-9 event; N = 400 would leave the lower bound 3.6 sd away.
    n = 1000
    lab = natlab("lossy-cone")
    server = udp(lab, "wan", port=7000, bind=SERVER_V4[0])
    ha = udp(lab, "ha")
    force_rcvbuf(server)
    force_rcvbuf(ha)
    out = n - _count_through(ha, server, (SERVER_V4[0], 7000), n)
    back = n - _count_through(server, ha, ("198.51.100.11", ha.getsockname()[1]), n)
    assert 0.01 * n < out < 0.15 * n, out
    assert 0.01 * n < back < 0.15 * n, back
    hb = udp(lab, "hb")  # the cone on side B loses nothing
    force_rcvbuf(server)
    assert _count_through(hb, server, (SERVER_V4[0], 7000), 200) == 200


# ---- same LAN ---------------------------------------------------------------------------------------
def test_same_lan_hosts_talk_directly_and_share_one_public_address(natlab) -> None:
    lab = natlab("same-lan")
    start_stun(lab)
    a, a2 = udp(lab, "ha", port=8000), udp(lab, "ha2", port=8001)
    a.sendto(b"hi ha2", (lab.addr("ha2"), 8001))
    assert recv_text(a2) == ("hi ha2", ("10.0.1.2", 8000))  # not NATed: straight over the LAN
    a2.sendto(b"hi ha", (lab.addr("ha"), 8000))
    assert recv_text(a) == ("hi ha", ("10.0.1.3", 8001))
    assert stun(a, (SERVER_V4[0], 3478))[0] == stun(a2, (SERVER_V4[0], 3478))[0] == "198.51.100.11"
    assert lab.public_addr("ha") == lab.public_addr("ha2") == "198.51.100.11"


# ---- one side public ---------------------------------------------------------------------------------
def test_one_public_host_is_reachable_from_anywhere(natlab) -> None:
    lab = natlab("one-public")
    ha = udp(lab, "ha", port=9000)
    assert lab.public_addr("ha") == lab.addr("ha") == "198.51.100.21"
    hb = udp(lab, "hb")
    hb.sendto(b"from behind a nat", ("198.51.100.21", 9000))
    text, src = recv_text(ha)
    assert text == "from behind a nat" and src[0] == "198.51.100.12"
    ha.sendto(b"reply", src)
    assert recv_text(hb)[0] == "reply"
    udp(lab, "wan", bind=SERVER_V4[1]).sendto(b"unsolicited is fine", ("198.51.100.21", 9000))
    assert recv_text(ha)[0] == "unsolicited is fine"


# ---- IPv6 -------------------------------------------------------------------------------------------
def test_ipv6_routed_without_nat_behind_a_stateful_firewall(natlab) -> None:
    lab = natlab("ipv6")
    start_stun(lab)
    ha = udp(lab, "ha", v6=True)
    port = ha.getsockname()[1]
    assert stun(ha, (SERVER_V6[0], 3478)) == ("2001:db8:1::2", port)  # no NAT66
    assert stun(udp(lab, "ha"), (SERVER_V4[0], 3478))[0] == "198.51.100.11"  # v4 still NATed

    peer = udp(lab, "wan", v6=True, port=5000, bind=SERVER_V6[1])
    peer.sendto(b"unsolicited", ("2001:db8:1::2", port))
    ha.sendto(b"out", (SERVER_V6[1], 5000))
    assert recv_text(peer)[0] == "out"
    peer.sendto(b"reply", ("2001:db8:1::2", port))
    text, src = recv_text(ha)
    assert (text, src[0]) == ("reply", SERVER_V6[1])

    # a v6 punch between the two firewalled hosts: the first packet opens ha's router only
    hb = udp(lab, "hb", v6=True)
    hb_addr = (lab.addr("hb", v6=True), hb.getsockname()[1])
    ha.sendto(b"opens ra", hb_addr)
    hb.sendto(b"through ra", (lab.addr("ha", v6=True), port))
    assert recv_text(ha)[0] == "through ra"
    ha.sendto(b"through rb", hb_addr)
    assert recv_text(hb)[0] == "through rb"  # "opens ra" never got past rb

    tcp = lab.socket("wan", socket.AF_INET6, socket.SOCK_STREAM)
    tcp.settimeout(0.3)
    with pytest.raises(TimeoutError):  # a new inbound connection is dropped
        tcp.connect(("2001:db8:1::2", 22))
    tcp.close()


# ---- the shell: run/popen, teardown, failures, CLI ---------------------------------------------------
def _root_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip() for line in out.splitlines()}


def test_down_removes_namespaces_and_processes_and_touches_no_root_link(natlab_ready) -> None:
    before = _root_links()
    lab = Lab("one-public")
    try:
        lab.up()
        assert lab.build_seconds is not None
        assert len(lab_namespaces(lab.prefix)) == 4
        assert _root_links() == before  # veth pairs are born inside the lab namespaces
        out = lab.run("ha", ["ip", "-4", "-o", "addr", "show", "eth0"], capture_output=True, text=True, check=True)
        assert "198.51.100.21/24" in out.stdout
        tracked = lab.popen("hb", ["sleep", "60"])
        untracked = subprocess.Popen(lab.argv("hb", ["sleep", "60"]))  # started outside the lab's books
    finally:
        lab.down()
    assert tracked.wait(timeout=SAFETY) is not None
    assert untracked.wait(timeout=SAFETY) is not None
    assert [n for n in list_namespaces() if n.startswith(lab.prefix + "-")] == []
    assert _root_links() == before
    assert not Path(f"/run/punchthrough-natlab/{lab.prefix}").exists()
    lab.down()  # idempotent


def test_a_failing_setup_command_is_named_in_one_line_and_nothing_remains(natlab_ready) -> None:
    lab = Lab("both-cone")
    lab.plan.ip_batch["hb"].append("route add 203.0.113.0/24 via 192.0.2.99")
    with pytest.raises(LabError) as err:
        lab.up()
    msg = str(err.value)
    assert "\n" not in msg
    assert f"ip -n {lab.prefix}-hb -b -" in msg and "route add 203.0.113.0/24 via 192.0.2.99" in msg
    assert "Nexthop has invalid gateway" in msg or "Network is unreachable" in msg
    assert lab_namespaces(lab.prefix) == []

    lab = Lab("both-cone")
    lab.plan.nft["rb"] += "table ip broken { chain c { bogus } }\n"
    with pytest.raises(LabError, match=r"nft -f -.*Error") as err:
        lab.up()
    assert "\n" not in str(err.value)
    assert lab_namespaces(lab.prefix) == []


def test_cli_up_down_and_crash_leftovers(natlab_ready) -> None:
    prefix = "ptlcli" + os.urandom(2).hex()
    cli = [sys.executable, "-m", "ops.natlab"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*cli, *args], cwd=REPO, capture_output=True, text=True, check=False, timeout=60)

    try:
        up = run("up", "same-lan", "--prefix", prefix, "--json")
        assert up.returncode == 0, up.stderr
        info = json.loads(up.stdout)
        assert info["nodes"]["ha2"]["namespace"] == f"{prefix}-ha2" and info["nodes"]["ha2"]["v4"] == "10.0.1.3"
        assert sorted(lab_namespaces(prefix)) == sorted(f"{prefix}-{n}" for n in ("wan", "ra", "ha", "ha2"))
        again = run("up", "both-cone", "--prefix", prefix)
        assert again.returncode == 1 and "in use" in again.stderr and again.stderr.count("\n") == 1
        text = run("up", "both-cone", "--prefix", prefix + "b")
        assert text.returncode == 0 and f"ip netns exec {prefix}b-ha" in text.stdout and f"{prefix}b-wan" in text.stdout
        # a crashed run leaves a half-built lab; `down --prefix` removes whatever has the prefix
        subprocess.run(["ip", "netns", "del", f"{prefix}-ra"], check=True)
        down = run("down", "--prefix", prefix)
        assert down.returncode == 0 and "removed 3 namespace(s)" in down.stdout
        assert lab_namespaces(prefix) == [] and lab_namespaces(prefix + "b") != []
    finally:
        run("down", "--prefix", prefix)
        run("down", "--prefix", prefix + "b")
    assert lab_namespaces(prefix) == lab_namespaces(prefix + "b") == []


def test_down_stale_removes_labs_whose_owner_died(natlab_ready) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    orphan = Lab("both-symmetric", owner_pid=dead.pid).up()
    mine = Lab("both-symmetric").up()
    try:
        down = subprocess.run([sys.executable, "-m", "ops.natlab", "down", "--stale"], cwd=REPO, capture_output=True,
                              text=True, check=False, timeout=60)
        assert down.returncode == 0, down.stderr
        assert lab_namespaces(orphan.prefix) == []
        assert len(lab_namespaces(mine.prefix)) == 5  # its owner (this process) is alive
    finally:
        orphan.down()
        mine.down()
