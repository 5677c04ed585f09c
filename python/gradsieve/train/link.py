"""The emulated slow link of ``gradsieve-train --link RATE``: local workers in a private network
namespace whose loopback device the kernel rate-limits.

The launching process re-runs the same command under ``unshare --net`` (as root, or inside a new
user namespace where the kernel allows unprivileged ones). In that namespace it brings ``lo`` up
with a 9000-byte MTU and puts a token-bucket filter on it (``tc qdisc add dev lo root tbf rate
RATE``), then starts the workers there. gloo's TCP connections between the workers then cross that
one shaped queue: every byte a collective moves is paced by the kernel, nothing is simulated above
it. The namespace has no other process and no other interface; it disappears with the last process
in it, so a run that ends, is interrupted or crashes leaves nothing behind (the workers die with
their launcher, see :func:`die_with_parent`).

What a rate means: all ranks share the one device and every transfer crosses it once, so
``--link 100mbit`` is 100 Mbit/s for the sum of all the workers' traffic, one direction. Two
workers exchanging S bytes each (an all-reduce moves about S per rank with 2 ranks) need 2 S / rate
seconds; that is what two machines with 50 Mbit/s of upload each would see. With N workers the
per-worker share is rate / N.

Delay: ``--link 100mbit,delay=5ms`` adds a one-way delay with the ``netem`` qdisc under the token
bucket. Kernels without netem (this project's development machines) get a clear error; the cost
model in ``benchmarks/`` adds latency analytically instead.

Example::

    spec = LinkSpec.parse("100mbit")
    spec.rate_bits      # 100_000_000
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
from typing import List, Optional, Sequence

__all__ = ["LinkError", "LinkSpec", "INSIDE_ENV", "enter_prefix", "configure", "inside",
           "run_inside", "tx_bytes", "die_with_parent"]

# Set in the re-run command: the inode of the launching process's network namespace. The re-run
# process checks that its own namespace differs before shaping (so it never shapes the host's lo).
INSIDE_ENV = "GRADSIEVE_LINK_PARENT_NETNS"
MTU = 9000
_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12}
_RATE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(bit|kbit|mbit|gbit|tbit)\s*$", re.IGNORECASE)
_DELAY = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(us|ms|s)\s*$", re.IGNORECASE)
_DELAY_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
USAGE = ("--link must be RATE[,delay=D] with RATE like 10mbit, 100mbit or 1gbit (or 'unlimited': "
         "a private loopback with no rate limit) and D like 5ms")


class LinkError(RuntimeError):
    """The link cannot be emulated here; the message says why and what to do."""


@dataclasses.dataclass(frozen=True)
class LinkSpec:
    """A parsed ``--link`` value. ``rate_bits`` None means no rate limit (``unlimited``)."""

    text: str
    rate_bits: Optional[int]
    delay_s: float = 0.0

    @classmethod
    def parse(cls, text: str) -> "LinkSpec":
        parts = [p.strip() for p in str(text).split(",")]
        head, rest = parts[0].lower(), parts[1:]
        if head == "unlimited":
            rate = None
        else:
            match = _RATE.match(head)
            if not match:
                raise ValueError(f"{USAGE}, got {text!r}")
            rate = int(round(float(match.group(1)) * _UNITS[match.group(2).lower()]))
            if rate < 10_000:
                raise ValueError(f"--link rate must be at least 10kbit, got {text!r}")
        delay = 0.0
        for item in rest:
            key, sep, value = item.partition("=")
            match = _DELAY.match(value) if sep and key.strip().lower() == "delay" else None
            if not match:
                raise ValueError(f"{USAGE}, got {text!r}")
            delay = float(match.group(1)) * _DELAY_UNITS[match.group(2).lower()]
        if delay and rate is None:
            raise ValueError(f"--link delay needs a rate (e.g. 100mbit,delay=5ms), got {text!r}")
        return cls(str(text).strip(), rate, delay)

    @property
    def rate_bytes(self) -> Optional[float]:
        return None if self.rate_bits is None else self.rate_bits / 8

    def describe(self) -> str:
        if self.rate_bits is None:
            return "unlimited private loopback"
        rate = _format_rate(self.rate_bits)
        return f"{rate} shared loopback" + (f", {self.delay_s * 1e3:g} ms delay" if self.delay_s else "")

    def describe_nic(self) -> str:
        """The rate as a node's NIC has it (``--nodes``): each direction, unshared."""
        if self.rate_bits is None:
            return "unlimited"
        return f"{_format_rate(self.rate_bits)} each way"

    def tbf_command(self, device: str) -> List[str]:
        """The ``tc`` command that limits what ``device`` sends to the rate."""
        rate = self.rate_bits / 8
        # A burst of at least a few packets (smaller ones drop every MTU-sized packet and TCP
        # stalls) and about 1 ms of traffic; a queue deep enough for every socket's TCP window.
        burst = max(32 * 1024, int(rate * 1e-3))
        limit = max(8 << 20, int(rate * 0.5))
        return ["tc", "qdisc", "add", "dev", device, "root", "handle", "1:", "tbf",
                "rate", f"{self.rate_bits}bit", "burst", str(burst), "limit", str(limit)]

    def tc_commands(self) -> List[List[str]]:
        """The ``ip``/``tc`` commands that shape the namespace's loopback."""
        cmds = [["ip", "link", "set", "lo", "mtu", str(MTU), "up"]]
        if self.rate_bits is None:
            return cmds
        cmds.append(self.tbf_command("lo"))
        if self.delay_s:
            cmds.append(["tc", "qdisc", "add", "dev", "lo", "parent", "1:1", "handle", "10:", "netem",
                         "delay", f"{self.delay_s * 1e6:.0f}us", "limit", "100000"])
        return cmds


def _format_rate(bits: float) -> str:
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bits >= scale:
            return f"{bits / scale:g} {unit}"
    return f"{bits:g} bit/s"


def _netns_inode() -> int:
    return os.stat("/proc/self/ns/net").st_ino


def inside() -> bool:
    """True in the re-run process, inside the private namespace made for it."""
    parent = os.environ.get(INSIDE_ENV)
    return bool(parent) and parent != str(_netns_inode())


def _probe(prefix: Sequence[str]) -> Optional[str]:
    """None when ``prefix true`` runs and may shape its loopback, else the reason it cannot."""
    try:
        done = subprocess.run([*prefix, "ip", "link", "set", "lo", "up"], capture_output=True,
                              text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as err:
        return str(err)
    if done.returncode == 0:
        return None
    return (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]


def enter_prefix() -> List[str]:
    """The command prefix that runs a program in a new, private network namespace where it may
    configure its own loopback: ``unshare --net`` with CAP_NET_ADMIN (root), else an unprivileged
    user namespace. Raises LinkError with what to do when neither works."""
    missing = [tool for tool in ("unshare", "ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise LinkError(f"--link needs {', '.join(missing)} (util-linux and iproute2; e.g. "
                        f"apt-get install util-linux iproute2), not found on PATH")
    tries = [["unshare", "--net", "--"], ["unshare", "--user", "--map-root-user", "--net", "--"]]
    reasons = []
    for prefix in tries:
        reason = _probe(prefix)
        if reason is None:
            return prefix
        reasons.append(f"{' '.join(prefix[:-1])}: {reason}")
    raise LinkError("--link needs CAP_NET_ADMIN in a private network namespace and got neither "
                    f"({'; '.join(reasons)}): run as root, or allow unprivileged user namespaces "
                    "(sysctl kernel.unprivileged_userns_clone=1, user.max_user_namespaces > 0), or "
                    "leave out --link")


def configure(spec: LinkSpec) -> None:
    """Shapes this process's loopback (call only when :func:`inside`)."""
    if not inside():
        raise LinkError("refusing to shape the loopback of a namespace that is not private to this run")
    for cmd in spec.tc_commands():
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            message = done.stderr.strip() or f"exit {done.returncode}"
            if "netem" in cmd and "unknown" in message.lower():
                raise LinkError("--link delay= needs the kernel's netem qdisc, which this kernel lacks "
                                f"({message}); leave out delay= (benchmarks/cost_model.py adds "
                                "latency analytically)")
            raise LinkError(f"--link: `{' '.join(cmd)}` failed: {message}")
    if spec.rate_bits is not None:
        shown = subprocess.run(["tc", "qdisc", "show", "dev", "lo"], capture_output=True, text=True).stdout
        if "tbf" not in shown:
            raise LinkError(f"--link: the token bucket is not on lo after setting it up: {shown.strip()}")


def run_inside(argv: Sequence[str], prefix: Sequence[str], module: str = "gradsieve.train") -> int:
    """Runs ``python -m module argv`` in a new private namespace and waits for it. Ctrl-C
    reaches the child too (same process group); the child's workers die with it."""
    env = dict(os.environ, **{INSIDE_ENV: str(_netns_inode())})
    # The namespace has no name server: c10d's reverse lookup of 127.0.0.1 fails and warns once
    # per connection. Quiet c10d's C++ warnings unless the user asked for a log level.
    env.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    cmd = [*prefix, sys.executable, "-m", module, *argv]
    # The re-run process dies with this one (and its workers with it), even on SIGKILL.
    proc = subprocess.Popen(cmd, env=env, preexec_fn=die_with_parent)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        try:
            return proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def tx_bytes(device: str = "lo") -> Optional[int]:
    """Bytes sent by ``device`` of this process's network namespace so far (None where unreadable).
    Read from /proc/net/dev, which follows the reading process's namespace (/sys/class/net shows
    the namespace that mounted /sys, the host's)."""
    try:
        with open("/proc/net/dev") as f:
            for line in f:
                name, sep, counters = line.partition(":")
                if sep and name.strip() == device:
                    return int(counters.split()[8])
    except (OSError, ValueError, IndexError):
        return None
    return None


def die_with_parent(parent: Optional[int] = None) -> None:
    """Asks the kernel to kill this process when its parent dies (Linux), so that a worker never
    outlives a launcher that was killed, and the namespace goes with them. ``parent``: the pid the
    parent had; when it is no longer this process's parent, the parent died before the request
    was made (a worker starts slowly: it imports torch first), and this process exits at once."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if parent is not None and os.getppid() != parent:
        os._exit(1)
