"""Two home networks behind NATs, a public network with STUN/TURN, in Linux namespaces.

Needs root, iproute2, nftables and coturn. Everything lives in namespaces named
``duetnet-<pid>-<token>-<role>``; the root namespace is never changed (each veth is
created directly inside its namespaces). Nothing is routed to the host's interfaces.

Layout (same addresses in every run; each run has its own namespaces)::

    home1 10.200.1.10 -- 10.200.1.1 nat1 198.51.100.11 --+
                                                          |  198.51.100.1  public  (coturn,
    home2 10.200.2.10 -- 10.200.2.1 nat2 203.0.113.22  --+  203.0.113.1           signaling)

Variants:
    "a" / "cone"       both NATs keep source ports (endpoint-independent mapping): direct srflx.
    "b" / "symmetric"  nat1 maps every destination to a random port: only TURN relay works.
    "c" / "symmetric-no-turn"  as "b", coturn is STUN only and no TURN is offered: no path.
    "blocked"          cone NATs, but "public" drops UDP between the two NAT WAN addresses.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PREFIX = "duetnet-"
REPO_ROOT = Path(__file__).resolve().parents[2]

PUBLIC_IP = "198.51.100.1"
PUBLIC_IP2 = "203.0.113.1"
NAT1_WAN = "198.51.100.11"
NAT2_WAN = "203.0.113.22"
NAT1_LAN = "10.200.1.1"
NAT2_LAN = "10.200.2.1"
HOME1_IP = "10.200.1.10"
HOME2_IP = "10.200.2.10"
STUN_PORT = 3478
RELAY_PORTS = (49152, 49199)
REALM = "duet.test"
TURN_LABEL = "duet"


@dataclass(frozen=True)
class VariantSpec:
    """How one topology variant differs from the others."""

    nat1_symmetric: bool
    nat2_symmetric: bool
    turn: bool
    block_direct_udp: bool = False


VARIANTS: dict[str, VariantSpec] = {
    "a": VariantSpec(nat1_symmetric=False, nat2_symmetric=False, turn=True),
    "b": VariantSpec(nat1_symmetric=True, nat2_symmetric=False, turn=True),
    "c": VariantSpec(nat1_symmetric=True, nat2_symmetric=False, turn=False),
    "blocked": VariantSpec(
        nat1_symmetric=False, nat2_symmetric=False, turn=True, block_direct_udp=True
    ),
}
ALIASES = {"cone": "a", "symmetric": "b", "symmetric-no-turn": "c"}

# Runs inside a namespace: one STUN Binding request, prints {"local": [ip, port], "mapped": [ip, port]}.
_STUN_PROBE = r"""
import json, os, socket, struct, sys
server, port, local_port, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", local_port))
s.settimeout(0.25)
txid = os.urandom(12)
request = struct.pack("!HHI", 0x0001, 0, 0x2112A442) + txid
tries = max(1, int(timeout / 0.25))
for _ in range(tries):
    s.sendto(request, (server, port))
    try:
        data, _ = s.recvfrom(2048)
    except socket.timeout:
        continue
    if len(data) < 20 or data[8:20] != txid:
        continue
    pos, mapped = 20, None
    while pos + 4 <= len(data):
        kind, length = struct.unpack("!HH", data[pos:pos + 4])
        value = data[pos + 4:pos + 4 + length]
        if kind in (0x0020, 0x0001) and len(value) >= 8 and value[1] == 1:
            mport = struct.unpack("!H", value[2:4])[0]
            mip = bytes(value[4:8])
            if kind == 0x0020:
                mport ^= 0x2112
                mip = bytes(a ^ b for a, b in zip(mip, struct.pack("!I", 0x2112A442)))
            mapped = [socket.inet_ntoa(mip), mport]
            if kind == 0x0020:
                break
        pos += 4 + length + (-length % 4)
    if mapped:
        print(json.dumps({"local": list(s.getsockname()), "mapped": mapped}))
        sys.exit(0)
print("no STUN response from %s:%d" % (server, port), file=sys.stderr)
sys.exit(1)
"""

# Runs inside a namespace: waits until a TCP port accepts connections.
_WAIT_TCP = r"""
import socket, sys, time
host, port, deadline = sys.argv[1], int(sys.argv[2]), time.monotonic() + float(sys.argv[3])
while time.monotonic() < deadline:
    try:
        socket.create_connection((host, port), timeout=0.5).close()
        sys.exit(0)
    except OSError:
        time.sleep(0.05)
print("nothing listens on %s:%d" % (host, port), file=sys.stderr)
sys.exit(1)
"""


class NetnsError(RuntimeError):
    """A namespace, link, rule or server of the harness could not be set up."""


def _cmd(argv: Sequence[str], *, timeout: float = 10.0, input: str | None = None) -> str:
    """Run a command to completion; raise NetnsError with its stderr when it fails."""
    try:
        done = subprocess.run(
            list(argv), input=input, capture_output=True, text=True, timeout=timeout
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetnsError(f"{' '.join(argv)}: {exc}") from exc
    if done.returncode != 0:
        raise NetnsError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def missing_tools() -> list[str]:
    """Names of required programs not found on PATH."""
    return [tool for tool in ("ip", "nft", "turnserver") if shutil.which(tool) is None]


def netns_unavailable_reason() -> str | None:
    """Why the harness cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "network namespace tests need root (run as root, e.g. sudo make test-network)"
    missing = missing_tools()
    if missing:
        return (
            f"missing programs: {', '.join(missing)} (apt-get install -y iproute2 nftables coturn)"
        )
    probe = f"{PREFIX}{os.getpid()}-probe"
    try:
        _cmd(["ip", "netns", "add", probe])
        _cmd(["ip", "-n", probe, "link", "set", "lo", "up"])
        _cmd(["ip", "netns", "exec", probe, "nft", "list", "ruleset"])
    except NetnsError as exc:
        return f"cannot create a usable network namespace: {exc}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=10)
    return None


def list_namespaces() -> list[str]:
    """Names of all network namespaces known to `ip netns`."""
    return [line.split()[0] for line in _cmd(["ip", "netns", "list"]).splitlines() if line]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner_pid(name: str) -> int | None:
    parts = name[len(PREFIX) :].split("-")
    return int(parts[0]) if parts and parts[0].isdigit() else None


def destroy_namespace(name: str) -> None:
    """Kill what still runs in a namespace (by pid) and delete it with its links."""
    listed = subprocess.run(
        ["ip", "netns", "pids", name], capture_output=True, text=True, timeout=10
    )
    for token in listed.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(token), signal.SIGKILL)
    gone = subprocess.run(["ip", "netns", "del", name], capture_output=True, text=True, timeout=10)
    if gone.returncode != 0 and name in list_namespaces():
        logger.warning("could not delete namespace %s: %s", name, gone.stderr.strip())


def cleanup_leftovers(include_live: bool = False) -> list[str]:
    """Delete namespaces and temp dirs of runs whose process is gone (all if include_live)."""
    removed = []
    for name in list_namespaces():
        if not name.startswith(PREFIX):
            continue
        pid = _owner_pid(name)
        if pid is not None and _pid_alive(pid) and not include_live:
            continue
        logger.info("removing leftover namespace %s", name)
        destroy_namespace(name)
        removed.append(name)
    for workdir in Path(tempfile.gettempdir()).glob(f"{PREFIX}*"):
        pid = _owner_pid(workdir.name)
        if workdir.is_dir() and pid is not None and (include_live or not _pid_alive(pid)):
            shutil.rmtree(workdir, ignore_errors=True)
    return removed


def turn_rest_credentials(
    secret: str, ttl: int = 3600, label: str = TURN_LABEL, now: float | None = None
) -> tuple[str, str]:
    """TURN REST (coturn use-auth-secret) username and credential valid for ttl seconds."""
    username = f"{int(now if now is not None else time.time()) + ttl}:{label}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode("ascii")


def _stop(proc: subprocess.Popen[Any], grace: float = 3.0) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)


@dataclass
class Topology:
    """A running topology: namespace names, server addresses, helpers to run programs."""

    variant: str
    spec: VariantSpec
    prefix: str
    workdir: Path
    turn_secret: str
    public_ip: str = PUBLIC_IP
    home_ips: dict[str, str] = field(default_factory=dict)
    nat_wan_ips: dict[str, str] = field(default_factory=dict)
    _procs: list[subprocess.Popen[Any]] = field(default_factory=list, repr=False)
    _created: list[str] = field(default_factory=list, repr=False)

    @property
    def public(self) -> str:
        return self.prefix + "public"

    @property
    def nat1(self) -> str:
        return self.prefix + "nat1"

    @property
    def nat2(self) -> str:
        return self.prefix + "nat2"

    @property
    def home1(self) -> str:
        return self.prefix + "home1"

    @property
    def home2(self) -> str:
        return self.prefix + "home2"

    @property
    def namespaces(self) -> tuple[str, ...]:
        return (self.public, self.nat1, self.nat2, self.home1, self.home2)

    @property
    def stun_url(self) -> str:
        return f"stun:{self.public_ip}:{STUN_PORT}"

    @property
    def turn_url(self) -> str | None:
        """TURN URL, or None in variants that offer no TURN ("c")."""
        if not self.spec.turn:
            return None
        return f"turn:{self.public_ip}:{STUN_PORT}?transport=udp"

    def run(self, ns: str, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Start argv inside namespace ns; it is stopped when the topology closes."""
        if ns not in self.namespaces:
            raise ValueError(f"{ns!r} is not a namespace of this topology")
        popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], **popen_kwargs)
        self._procs.append(proc)
        return proc

    def check_output(self, ns: str, argv: Sequence[str], timeout: float = 10.0) -> str:
        """Run argv inside ns to completion and return its stdout (NetnsError on failure)."""
        if ns not in self.namespaces:
            raise ValueError(f"{ns!r} is not a namespace of this topology")
        return _cmd(["ip", "netns", "exec", ns, *argv], timeout=timeout)

    def ice_servers(self, with_turn: bool = True, ttl: int = 3600) -> list[dict[str, Any]]:
        """RTCIceServer-like dicts: coturn as STUN, plus TURN REST credentials if offered."""
        servers: list[dict[str, Any]] = [{"urls": [self.stun_url]}]
        if with_turn and self.turn_url is not None:
            username, credential = turn_rest_credentials(self.turn_secret, ttl)
            servers.append(
                {"urls": [self.turn_url], "username": username, "credential": credential}
            )
        return servers

    def stun_probe(self, ns: str, local_port: int = 0, timeout: float = 3.0) -> dict[str, Any]:
        """Send one STUN Binding from ns to coturn; returns {"local": [..], "mapped": [ip, port]}."""
        out = self.check_output(
            ns,
            [
                sys.executable,
                "-c",
                _STUN_PROBE,
                self.public_ip,
                str(STUN_PORT),
                str(local_port),
                str(timeout),
            ],
            timeout=timeout + 5,
        )
        return json.loads(out)

    def wait_tcp(self, ns: str, host: str, port: int, timeout: float = 10.0) -> None:
        """Block until host:port accepts TCP connections from inside ns."""
        self.check_output(
            ns, [sys.executable, "-c", _WAIT_TCP, host, str(port), str(timeout)], timeout + 5
        )

    def start_signaling(self, port: int = 8765, extra_args: Sequence[str] = ()) -> str:
        """Start the signaling server in "public"; returns its base URL once it listens."""
        argv = [
            sys.executable,
            "-m",
            "signaling_server",
            "--host",
            self.public_ip,
            "--port",
            str(port),
            "--ice-servers",
            json.dumps([{"urls": [self.stun_url]}]),
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("DUET_")}
        if self.turn_url is not None:
            # The secret goes through the environment, out of the process list.
            env["DUET_TURN_SECRET"] = self.turn_secret
            argv += ["--turn-urls", self.turn_url]
        log = open(self.workdir / f"signaling-{port}.log", "wb")  # noqa: SIM115
        try:
            proc = self.run(
                self.public, [*argv, *extra_args], cwd=REPO_ROOT, env=env, stdout=log, stderr=log
            )
        finally:
            log.close()
        try:
            self.wait_tcp(self.public, self.public_ip, port, timeout=10.0)
        except NetnsError as exc:
            _stop(proc)
            text = (self.workdir / f"signaling-{port}.log").read_text(errors="replace")
            raise NetnsError(f"signaling server did not start: {exc}\n{text[-2000:]}") from exc
        return f"http://{self.public_ip}:{port}"

    def log(self, name: str) -> str:
        """Text of a log file in the work directory (e.g. "turnserver.log")."""
        path = self.workdir / name
        return path.read_text(errors="replace") if path.exists() else ""

    def close(self) -> None:
        """Stop every process started here and delete every namespace created."""
        for proc in reversed(self._procs):
            with contextlib.suppress(Exception):
                _stop(proc)
        for name in reversed(self._created):
            with contextlib.suppress(Exception):
                destroy_namespace(name)
        self._created.clear()


def _ns_sh(ns: str, script: str) -> None:
    _cmd(["ip", "netns", "exec", ns, "sh", "-ec", script])


def _ip(ns: str, *args: str) -> None:
    _cmd(["ip", "-n", ns, *args])


def _nat_rules(symmetric: bool) -> str:
    mapping = "masquerade random,fully-random" if symmetric else "masquerade"
    return f"""
table ip duetnat {{
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname "wan" {mapping}
  }}
  chain input {{
    type filter hook input priority filter; policy accept;
    iifname "wan" ct state established,related accept
    iifname "wan" drop
  }}
  chain forward {{
    type filter hook forward priority filter; policy drop;
    iifname "lan" oifname "wan" accept
    iifname "wan" oifname "lan" ct state established,related accept
  }}
}}
"""


def _public_rules(block_direct_udp: bool) -> str:
    rules = ""
    if block_direct_udp:
        rules = (
            f"    ip saddr {NAT1_WAN} ip daddr {NAT2_WAN} meta l4proto udp drop\n"
            f"    ip saddr {NAT2_WAN} ip daddr {NAT1_WAN} meta l4proto udp drop\n"
        )
    return f"""
table ip duetpublic {{
  chain forward {{
    type filter hook forward priority filter; policy accept;
{rules}  }}
}}
"""


def _build_network(topo: Topology) -> None:
    spec = topo.spec
    for ns in topo.namespaces:
        _cmd(["ip", "netns", "add", ns])
        topo._created.append(ns)
        _ip(ns, "link", "set", "lo", "up")
        forward = 1 if ns in (topo.public, topo.nat1, topo.nat2) else 0
        _ns_sh(
            ns,
            "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6; "
            "echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6; "
            f"echo {forward} > /proc/sys/net/ipv4/ip_forward",
        )

    # Each veth is created with both ends already inside their namespaces.
    links = [
        (topo.public, "wan1", f"{PUBLIC_IP}/24", topo.nat1, "wan", f"{NAT1_WAN}/24"),
        (topo.public, "wan2", f"{PUBLIC_IP2}/24", topo.nat2, "wan", f"{NAT2_WAN}/24"),
        (topo.nat1, "lan", f"{NAT1_LAN}/24", topo.home1, "lan", f"{HOME1_IP}/24"),
        (topo.nat2, "lan", f"{NAT2_LAN}/24", topo.home2, "lan", f"{HOME2_IP}/24"),
    ]
    for ns_a, if_a, addr_a, ns_b, if_b, addr_b in links:
        _cmd(
            ["ip", "link", "add", if_a, "netns", ns_a, "type", "veth"]
            + ["peer", "name", if_b, "netns", ns_b]
        )
        for ns, ifname, addr in ((ns_a, if_a, addr_a), (ns_b, if_b, addr_b)):
            _ip(ns, "addr", "add", addr, "dev", ifname)
            _ip(ns, "link", "set", ifname, "up")

    _ip(topo.nat1, "route", "add", "default", "via", PUBLIC_IP)
    _ip(topo.nat2, "route", "add", "default", "via", PUBLIC_IP2)
    _ip(topo.home1, "route", "add", "default", "via", NAT1_LAN)
    _ip(topo.home2, "route", "add", "default", "via", NAT2_LAN)

    _cmd(
        ["ip", "netns", "exec", topo.nat1, "nft", "-f", "-"], input=_nat_rules(spec.nat1_symmetric)
    )
    _cmd(
        ["ip", "netns", "exec", topo.nat2, "nft", "-f", "-"], input=_nat_rules(spec.nat2_symmetric)
    )
    _cmd(
        ["ip", "netns", "exec", topo.public, "nft", "-f", "-"],
        input=_public_rules(spec.block_direct_udp),
    )


def _coturn_config(topo: Topology) -> str:
    low, high = RELAY_PORTS
    lines = [
        f"listening-ip={topo.public_ip}",
        f"relay-ip={topo.public_ip}",
        f"listening-port={STUN_PORT}",
        f"min-port={low}",
        f"max-port={high}",
        f"realm={REALM}",
        "use-auth-secret",
        f"static-auth-secret={topo.turn_secret}",
        "fingerprint",
        "no-tls",
        "no-dtls",
        "no-cli",
        "no-rfc5780",
        "no-software-attribute",
        "no-multicast-peers",
        # The relay may only reach the two documentation ranges of this topology.
        "denied-peer-ip=0.0.0.0-255.255.255.255",
        "allowed-peer-ip=198.51.100.0-198.51.100.255",
        "allowed-peer-ip=203.0.113.0-203.0.113.255",
        "denied-peer-ip=::-ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
        f"userdb={topo.workdir / 'turndb'}",
        f"pidfile={topo.workdir / 'turnserver.pid'}",
        f"log-file={topo.workdir / 'turnserver.log'}",
        "simple-log",
        "no-stdout-log",
        "verbose",  # one line per allocation, permission and session in the log
    ]
    if not topo.spec.turn:
        lines.append("stun-only")
    return "\n".join(lines) + "\n"


def _start_coturn(topo: Topology) -> None:
    conf = topo.workdir / "turnserver.conf"
    conf.touch(mode=0o600)
    conf.write_text(_coturn_config(topo))
    # The secret stays in the 0600 file, out of the process list.
    argv = ["turnserver", "-c", str(conf)]
    out = open(topo.workdir / "turnserver.out", "wb")  # noqa: SIM115
    try:
        proc = topo.run(topo.public, argv, stdout=out, stderr=subprocess.STDOUT)
    finally:
        out.close()
    deadline = time.monotonic() + 10.0
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise NetnsError(
                f"turnserver exited with {proc.returncode}:\n"
                f"{topo.log('turnserver.out')[-2000:]}{topo.log('turnserver.log')[-2000:]}"
            )
        try:
            topo.stun_probe(topo.public, timeout=1.0)
            return
        except NetnsError as exc:
            last = str(exc)
    raise NetnsError(f"coturn does not answer STUN: {last}\n{topo.log('turnserver.log')[-2000:]}")


@contextlib.contextmanager
def topology(variant: str = "a") -> Iterator[Topology]:
    """Build the namespaces, NATs and coturn for variant; tear all of it down on exit."""
    key = ALIASES.get(variant, variant)
    if key not in VARIANTS:
        raise ValueError(
            f"unknown variant {variant!r}; known: {sorted(VARIANTS) + sorted(ALIASES)}"
        )
    cleanup_leftovers()
    workdir = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-"))
    topo = Topology(
        variant=key,
        spec=VARIANTS[key],
        prefix=f"{PREFIX}{os.getpid()}-{secrets.token_hex(3)}-",
        workdir=workdir,
        turn_secret=secrets.token_urlsafe(24),
        home_ips={"home1": HOME1_IP, "home2": HOME2_IP},
        nat_wan_ips={"nat1": NAT1_WAN, "nat2": NAT2_WAN},
    )
    failed = False
    try:
        _build_network(topo)
        _start_coturn(topo)
        logger.info("topology %s ready in %s", key, topo.prefix)
        yield topo
    except BaseException:
        failed = True
        raise
    finally:
        topo.close()
        if failed and os.environ.get("DUETNET_KEEP_LOGS"):
            logger.warning("logs of the failed run kept in %s", workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
