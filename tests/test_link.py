"""The emulated link of ``gradsieve-train --link``: parsing, the tc commands, and, where this machine
allows private network namespaces, the shaped path itself: its rate, a dense step's lower bound,
and a teardown that leaves nothing behind (normal end, Ctrl-C, a killed worker).

The timed checks here are lower bounds that the kernel's token bucket enforces, which a busy
machine can only make easier to meet; how close to the rate a transfer gets is
``benchmarks/check_timing.py``'s, on a quiet machine."""

import glob
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from gradsieve.train import link
from launching import SEND_RECV

PYTHON = sys.executable


def _namespace_prefix():
    try:
        return link.enter_prefix()
    except link.LinkError as err:
        return str(err)


PREFIX = _namespace_prefix()
requires_netns = pytest.mark.skipif(isinstance(PREFIX, str),
                                    reason=f"no private network namespace here: {PREFIX}")


# ------------------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("text,rate,delay", [
    ("100mbit", 100_000_000, 0.0),
    ("1gbit", 1_000_000_000, 0.0),
    ("10MBIT", 10_000_000, 0.0),
    ("2.5mbit", 2_500_000, 0.0),
    ("500kbit", 500_000, 0.0),
    ("100mbit,delay=5ms", 100_000_000, 0.005),
    ("100mbit, delay=250us", 100_000_000, 0.00025),
    ("unlimited", None, 0.0),
])
def test_parse(text, rate, delay):
    spec = link.LinkSpec.parse(text)
    assert spec.rate_bits == rate and spec.delay_s == pytest.approx(delay)


@pytest.mark.parametrize("text", ["100", "100mbps", "fast", "100mbit,delay=5", "100mbit,jitter=1ms",
                                  "unlimited,delay=1ms", "1bit", ""])
def test_parse_rejects(text):
    with pytest.raises(ValueError, match="--link"):
        link.LinkSpec.parse(text)


def test_tc_commands_shape_lo_with_a_burst_above_one_packet():
    cmds = link.LinkSpec.parse("100mbit").tc_commands()
    assert cmds[0] == ["ip", "link", "set", "lo", "mtu", "9000", "up"]
    tbf = cmds[1]
    assert tbf[:6] == ["tc", "qdisc", "add", "dev", "lo", "root"] and "tbf" in tbf
    assert tbf[tbf.index("rate") + 1] == "100000000bit"
    assert int(tbf[tbf.index("burst") + 1]) > link.MTU
    assert len(cmds) == 2  # no delay: no netem
    assert "netem" in link.LinkSpec.parse("1gbit,delay=2ms").tc_commands()[-1]
    assert link.LinkSpec.parse("unlimited").tc_commands() == [cmds[0]]


def test_no_tools_or_no_permission_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(link.shutil, "which", lambda tool: None if tool == "tc" else "/usr/bin/" + tool)
    with pytest.raises(link.LinkError, match="needs tc"):
        link.enter_prefix()
    monkeypatch.setattr(link.shutil, "which", lambda tool: "/usr/bin/" + tool)
    monkeypatch.setattr(link, "_probe", lambda prefix: "unshare: unshare failed: Operation not permitted")
    with pytest.raises(link.LinkError, match="CAP_NET_ADMIN.*run as root"):
        link.enter_prefix()


def test_configure_refuses_the_namespace_it_was_started_in(monkeypatch):
    # The marker names this process's own namespace: not a private one, so nothing is shaped.
    monkeypatch.setenv(link.INSIDE_ENV, str(os.stat("/proc/self/ns/net").st_ino))
    assert not link.inside()
    with pytest.raises(link.LinkError, match="refusing"):
        link.configure(link.LinkSpec.parse("10mbit"))


# ------------------------------------------------------------------------------ the real path
# (slow tier: each starts processes in a private namespace; the tests above run in this process)
def _netns_of(pid):
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def _foreign_netns_processes():
    """Processes of ours (this interpreter's, or gradsieve's) in a network namespace other than
    this one's: a run's private namespace while it lives. Other software's namespaces on the
    machine do not count."""
    mine = _netns_of("self")
    ours = (os.fsencode(PYTHON), b"gradsieve")
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            ns = _netns_of(entry)
            if ns is not None and ns != mine and any(tag in _cmdline(entry) for tag in ours):
                found.append(int(entry))
    return found


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _host_lo_qdisc():
    return subprocess.run(["tc", "qdisc", "show", "dev", "lo"], capture_output=True, text=True).stdout


def _run_in_namespace(code, timeout=120):
    env = dict(os.environ, **{link.INSIDE_ENV: str(_netns_of("self"))})
    return subprocess.run([*PREFIX, PYTHON, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=env)




def _burst(rate_bits):
    tbf = link.LinkSpec.parse(f"{rate_bits}bit").tc_commands()[1]
    return int(tbf[tbf.index("burst") + 1])


@pytest.mark.slow
@requires_netns
def test_shaped_link_moves_a_payload_no_faster_than_the_set_rate(tmp_path):
    script = tmp_path / "send_recv.py"
    script.write_text(textwrap.dedent(SEND_RECV))
    out = tmp_path / "result.json"
    rate_bits, nbytes = 40_000_000, 6_000_000  # 1.2 s at the set rate
    env = dict(os.environ, **{link.INSIDE_ENV: str(_netns_of("self"))})
    done = subprocess.run([*PREFIX, PYTHON, str(script), f"{rate_bits}bit", str(nbytes), str(out)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    measured = json.loads(out.read_text())
    # Rank 0's window holds the whole transfer: the payload crossed the namespace's lo in it.
    assert measured["lo_bytes"] >= nbytes
    # The token bucket passes at most a burst at once, then the rate: whatever the machine's
    # load (which only slows the transfer), it cannot take less than this (1% for the kernel's
    # rate arithmetic). The upper side, "at the rate within 15%", is check_timing's link_rate.
    least = (nbytes - _burst(rate_bits)) * 8 / rate_bits
    assert measured["seconds"] >= 0.99 * least, f"{nbytes * 8 / measured['seconds'] / 1e6:.1f} Mbit/s on 40 Mbit/s"


@pytest.mark.slow
@requires_netns
def test_dense_step_takes_at_least_bytes_over_rate_and_teardown_is_clean(tmp_path):
    before_qdisc = _host_lo_qdisc()
    before_ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    rate_bits = 8_000_000
    out = tmp_path / "out"
    done = subprocess.run([PYTHON, "-m", "gradsieve.train", "--link", "8mbit", "--compare", "none",
                           "--steps", "6", "--no-progress", "--out", str(out)],
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "8 Mbit/s shared loopback" in done.stdout
    run = json.loads((out / "metrics.json").read_text())["runs"][0]
    dense = run["wire_bytes_per_step"]  # each rank's fp32 gradient (digits CNN, about 150 KB)
    # Two ranks all-reducing S bytes each must each receive at least S bytes over the one queue.
    assert run["link_bytes_per_step"] >= 2 * dense
    # Every timed step of rank 0 holds, from its first to its last instant, its half of gloo's ring
    # all-reduce going out (dense/2 bytes, computed in the step) and rank 1's reduced half
    # coming back (dense/2 bytes, which need them): at least `dense` bytes through the one queue
    # after at most a burst. A bound that load cannot break (it only lengthens steps; the other
    # rank's own half may cross while rank 0 is not yet timing, so not 2 x dense); 1% for the
    # kernel's rate arithmetic.
    assert run["time_per_step_s"] >= 0.99 * (dense - _burst(rate_bits)) * 8 / rate_bits
    # Nothing left behind: no process in another namespace, the host's lo untouched.
    assert _host_lo_qdisc() == before_qdisc
    assert subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout == before_ns
    assert _foreign_netns_processes() == []


def _wait_for(predicate, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    return predicate()


def _interruptible():
    # A shell that starts its jobs in the background (CI may) ignores SIGINT for them, and the
    # ignored disposition is inherited: give the run the default one, as a terminal would.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _saved_a_step(checkpoints, rank):
    return bool(glob.glob(os.path.join(checkpoints, "*", f"step-*-rank{rank}.pt")))


@pytest.fixture
def long_run(tmp_path):
    """A gradsieve-train run over a slow link that would take minutes, in its own session, with
    both workers in the training loop; killed with its whole process group at the end of the
    test whatever happened."""
    assert _foreign_netns_processes() == [], "processes of an earlier run are still alive"
    checkpoints = tmp_path / "ck"
    proc = subprocess.Popen([PYTHON, "-m", "gradsieve.train", "--link", "2mbit", "--compare", "none",
                             "--steps", "500", "--no-progress", "--out", str(tmp_path / "out"),
                             "--checkpoint-dir", str(checkpoints), "--checkpoint-every", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=_interruptible)
    try:
        # Both workers are training once each has saved a checkpoint (after the first step): past
        # their start-up, where a worker asks to die with its parent. An event, not a fixed sleep:
        # on a loaded machine a worker still importing torch 2 s after it appeared outlived a
        # killed launcher. The deadline only guards against a hang.
        started = _wait_for(lambda: proc.poll() is not None or all(_saved_a_step(checkpoints, r) for r in (0, 1)),
                            300)
        assert started and proc.poll() is None, "the run did not start training"
        assert len(_foreign_netns_processes()) >= 3  # the re-run launcher and its two workers
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        for pid in _foreign_netns_processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        _wait_for(lambda: _foreign_netns_processes() == [], 20)


@pytest.mark.slow
@requires_netns
def test_ctrl_c_tears_everything_down(long_run):
    proc = long_run
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert _wait_for(lambda: _foreign_netns_processes() == [], 20)


@pytest.mark.slow
@requires_netns
def test_a_killed_worker_ends_the_run_and_the_namespace(long_run):
    proc = long_run
    workers = [pid for pid in _foreign_netns_processes() if b"spawn_main" in _cmdline(pid)]
    assert len(workers) == 2
    worker = workers[-1]
    os.kill(worker, signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "worker" in err
    assert _wait_for(lambda: _foreign_netns_processes() == [], 20)


@pytest.mark.slow
@requires_netns
def test_delay_runs_with_netem_or_stops_with_one_line(tmp_path):
    done = subprocess.run([PYTHON, "-m", "gradsieve.train", "--link", "50mbit,delay=1ms", "--compare", "topk",
                           "--steps", "3", "--no-progress", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=240)
    if done.returncode == 2:  # a kernel without netem (this project's development machines)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "netem" in lines[0] and "Traceback" not in done.stderr
    else:
        assert done.returncode == 0, done.stderr[-3000:]
        assert "1 ms delay" in done.stdout
    assert _foreign_netns_processes() == []


@pytest.mark.slow
@requires_netns
def test_a_killed_launcher_takes_the_namespace_with_it(long_run):
    proc = long_run
    proc.kill()  # SIGKILL: no handler runs; the kernel's parent-death signals do the teardown
    proc.communicate(timeout=30)
    assert _wait_for(lambda: _foreign_netns_processes() == [], 20)


def test_a_worker_whose_launcher_died_before_it_asked_to_die_with_it_exits():
    """A worker asks the kernel to kill it with its launcher only after importing torch; had the
    launcher died in between, the worker (reparented) exits at once instead of running on."""
    code = ("import os, sys; from gradsieve.train import link; "
            "link.die_with_parent(int(sys.argv[1])); print('alive', flush=True)")
    orphan = subprocess.run([PYTHON, "-c", code, "1"], capture_output=True, text=True, timeout=120)
    assert orphan.returncode == 1 and "alive" not in orphan.stdout, orphan
    child = subprocess.run([PYTHON, "-c", code, str(os.getpid())], capture_output=True, text=True, timeout=120)
    assert child.returncode == 0 and "alive" in child.stdout, child
