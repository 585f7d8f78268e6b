#!/usr/bin/env python3
"""bench.py - load benchmark for chat_server.py; Python standard library only.

Run:    python bench/bench.py                 # every scenario, full sizes (under 3 minutes on 2 cores)
        python bench/bench.py --quick         # smallest sizes, a few seconds (used by a unit test)
        python bench/bench.py --only wake,fanout --fanout-sizes 10000 --recovery-runs 10

Starts ../chat_server.py (relative to this file) as a separate process for each scenario size
(`--port 0 --quiet --db :memory:`, or a database file in a temporary directory for the durable
posting rows), reads the port from its first stdout line, pins it to one CPU and this process to
another (taskset / os.sched_setaffinity, where available), and drives it from a single-threaded
load generator over raw non-blocking sockets (selectors), loopback only.

Scenarios
    wake    W waiters parked on a room, one POST: latency from just before the POST is written until
            each waiter has its complete response (p50/p99/max), median over several rounds.
    fanout  N parked waiters, one POST: time until all N are answered, the POST's own response time,
            server CPU per woken waiter, RSS per parked waiter; then all N re-park and leave at once
            (abortive close) and we time a new GET /healthz and the return of /stats
            `connections`/`threads_busy` to their starting values.
    idle    N waiters parked with nothing posted: server CPU over the window.
    post    1/16/64 keep-alive clients posting as fast as answered: req/s and latency, in memory and
            with a database file.
    order   4 posters and 4 long-polling followers at once: every follower must see every message
            exactly once, in id order.

Output: one JSON line per scenario size as it finishes (stdout), then one aligned table with
PASS/MISS against the targets. Progress goes to stderr.
Exit status: 0; 1 if ordering found a lost/duplicated/reordered message or any scenario could not
run correctly (exception, wrong status, a waiter never answered). Missed targets do not change it.
"""

import argparse
import json
import math
import os
import re
import selectors
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time

now = time.perf_counter

HOST = "127.0.0.1"                      # loopback only, always
PORT_RE = re.compile(r"http://(\[[^\]]+\]|[^/:\s]+):(\d+)/")
SERVER_START_TIMEOUT_S = 15.0
SERVER_STOP_TIMEOUT_S = 5.0             # after SIGTERM, then SIGKILL
CTL_TIMEOUT_S = 10.0                    # control requests (/stats, /healthz, single posts)
PARK_BATCH = 500                        # connections opened between two /stats checks (listen backlog)
PARK_BATCH_TIMEOUT_S = 30.0             # one batch must show up as parked within this
LONG_POLL_S = 120                       # ?timeout= for fan-out/idle waiters (server gets --max-timeout 300)
LINGER_ABORT = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST, leaves no TIME_WAIT

SCENARIOS = ("wake", "fanout", "idle", "post", "order")


def log(msg):
    """Progress line on stderr (stdout carries JSON lines and the table)."""
    sys.stderr.write("bench: %s\n" % msg)
    sys.stderr.flush()


def percentile(sorted_values, p):
    """Nearest-rank percentile of an already sorted list (None if empty)."""
    n = len(sorted_values)
    if not n:
        return None
    k = max(0, min(n - 1, int(math.ceil(p / 100.0 * n)) - 1))
    return sorted_values[k]


def median(values):
    """Median of the non-None values (None if none)."""
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def rnd(x, nd=3):
    """Round for JSON output, keeping None."""
    return None if x is None else round(x, nd)


def ms(x):
    """Seconds to milliseconds, rounded, keeping None."""
    return None if x is None else round(x * 1000.0, 3)


# ---------------------------------------------------------------------------------------------------
# HTTP bytes


def build_request(method, path, body=b"", ctype="application/json"):
    """One complete HTTP/1.1 keep-alive request as bytes."""
    head = "%s %s HTTP/1.1\r\nHost: %s\r\n" % (method, path, HOST)
    if method in ("POST", "PUT") or body:
        head += "Content-Type: %s\r\nContent-Length: %d\r\n" % (ctype, len(body))
    return (head + "\r\n").encode("ascii") + body


def post_request(room, text, author="bench"):
    """A JSON POST of one message to `room`."""
    body = json.dumps({"body": text, "author": author}).encode("utf-8")
    return build_request("POST", "/rooms/%s/messages" % room, body)


def poll_request(room, after, timeout, limit=None):
    """A long-poll GET on `room` after cursor `after`."""
    path = "/rooms/%s/messages?after=%s&timeout=%s" % (room, after, timeout)
    if limit:
        path += "&limit=%d" % limit
    return build_request("GET", path)


class ProtocolError(Exception):
    """The server's bytes are not a response we can frame."""


def parse_response(buf):
    """(status, head, body, consumed) for the first complete response in buf, or None if incomplete."""
    i = buf.find(b"\r\n\r\n")
    if i < 0:
        return None
    head = buf[:i]
    try:
        status = int(head[9:12])
    except ValueError:
        raise ProtocolError("bad status line %r" % head[:40])
    j = head.find(b"Content-Length:")
    if j < 0:
        j = head.lower().find(b"content-length:")
        if j < 0:
            raise ProtocolError("response without Content-Length: %r" % head[:200])
    k = head.find(b"\r\n", j)
    length = int(head[j + 15:k if k >= 0 else len(head)])
    end = i + 4 + length
    if len(buf) < end:
        return None
    return status, head, buf[i + 4:end], end


# ---------------------------------------------------------------------------------------------------
# The server process


class ServerStartError(Exception):
    """The server exited or printed no address line in time."""


def proc_cpu_seconds(pid):
    """utime+stime of the whole process (all threads) in seconds, or None where /proc is missing."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data.rsplit(b")", 1)[1].split()   # fields[0] is field 3 (state)
    return (int(fields[11]) + int(fields[12])) / float(CLK_TCK)


def self_cpu():
    """CPU seconds used by this process (the load generator)."""
    t = os.times()
    return t[0] + t[1]


def proc_rss_kib(pid):
    """VmRSS in KiB, or None where /proc is missing."""
    try:
        with open("/proc/%d/status" % pid, "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


try:
    CLK_TCK = os.sysconf("SC_CLK_TCK")
except (AttributeError, ValueError, OSError):
    CLK_TCK = 100


LIVE_SERVERS = {}   # port -> Server, for on_stall


def on_stall(what):
    """A control request went unanswered: run $CHAT_BENCH_STALL_CMD (e.g. 'py-spy dump --pid {pid}') once."""
    cmd = os.environ.get("CHAT_BENCH_STALL_CMD")
    log("stall: %s" % what)
    if not cmd:
        return
    for srv in list(LIVE_SERVERS.values()):
        if srv.proc.poll() is None and not getattr(srv, "dumped", False):
            srv.dumped = True
            try:
                out = subprocess.run(cmd.format(pid=srv.pid), shell=True, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, timeout=60).stdout
                path = os.path.join(tempfile.gettempdir(), "chat-bench-stall-%d.txt" % srv.pid)
                with open(path, "wb") as f:
                    f.write(out)
                log("stall: %s -> %s" % (cmd.format(pid=srv.pid), path))
            except (OSError, subprocess.SubprocessError) as e:
                log("stall command failed: %s" % e)


class Server:
    """One chat_server.py child process; stopped only by its own PID."""

    count = 0

    def __init__(self, ctx, db=":memory:"):
        self.ctx = ctx
        self.db = db
        self.proc = None
        self.port = None
        self.first_line = ""
        self.stop_rc = None

    def start(self):
        """Start the process and read the port from its first stdout line."""
        ctx = self.ctx
        Server.count += 1
        base = os.path.join(ctx.tmpdir, "server-%d" % Server.count)
        self.out_path, self.err_path = base + ".out", base + ".err"
        cmd = [sys.executable, ctx.server_path, "--host", HOST, "--port", "0", "--quiet",
               "--db", self.db, "--max-waiters", str(ctx.max_waiters),
               "--max-connections", str(ctx.max_connections), "--max-timeout", "300",
               "--allow-host", HOST]    # the load generator's requests say "Host: 127.0.0.1", without the port
        if ctx.server_cpu is not None:
            cmd = ["taskset", "-c", str(ctx.server_cpu)] + cmd   # exec: same PID, threads inherit
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                         cwd=ctx.tmpdir)
        deadline = now() + SERVER_START_TIMEOUT_S
        while now() < deadline:
            with open(self.out_path, "rb") as f:
                data = f.read()
            if b"\n" in data:
                self.first_line = data.split(b"\n", 1)[0].decode("utf-8", "replace").strip()
                m = PORT_RE.search(self.first_line)
                if not m:
                    self.stop()
                    raise ServerStartError("no address in first line %r" % self.first_line)
                self.port = int(m.group(2))
                LIVE_SERVERS[self.port] = self
                return self
            if self.proc.poll() is not None:
                raise ServerStartError("exited with status %s: %s" % (self.proc.returncode, self.stderr_tail()))
            time.sleep(0.01)
        self.stop()
        raise ServerStartError("no address line within %.0f s" % SERVER_START_TIMEOUT_S)

    def stderr_tail(self, n=400):
        """Last bytes of the server's stderr, one line."""
        try:
            with open(self.err_path, "rb") as f:
                data = f.read()
        except OSError:
            return ""
        return data[-n:].decode("utf-8", "replace").strip().replace("\n", " | ")

    @property
    def pid(self):
        return self.proc.pid

    def cpu(self):
        return proc_cpu_seconds(self.proc.pid)

    def rss(self):
        return proc_rss_kib(self.proc.pid)

    def stop(self):
        """SIGTERM, then SIGKILL after a timeout; returns the exit status."""
        p = self.proc
        if p is None:
            return None
        if p.poll() is None:
            try:
                p.terminate()
                p.wait(SERVER_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log("server pid %d ignored SIGTERM for %.0f s: killing it" % (p.pid, SERVER_STOP_TIMEOUT_S))
                p.kill()
                p.wait(5)
        self.stop_rc = p.returncode
        LIVE_SERVERS.pop(self.port, None)
        tail = self.stderr_tail(1500)
        if tail:
            self.ctx.server_stderr.append(tail)
            log("server pid %d wrote to stderr: %s" % (p.pid, tail[-600:]))
        return self.stop_rc


# ---------------------------------------------------------------------------------------------------
# Blocking client for control requests


class Ctl:
    """A keep-alive blocking connection for /stats, /healthz and single requests."""

    def __init__(self, port, timeout=CTL_TIMEOUT_S):
        self.port = port
        self.timeout = timeout
        self.sock = None
        self.buf = b""

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.buf = b""

    def request(self, data, timeout=None):
        """Send request bytes, return (status, body); reconnects once if a reused connection died."""
        timeout = self.timeout if timeout is None else timeout
        for attempt in (0, 1):
            reused = self.sock is not None
            if not reused:
                self.sock = socket.create_connection((HOST, self.port), timeout=timeout)
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.buf = b""
            self.sock.settimeout(timeout)
            try:
                self.sock.sendall(data)
                return self._read(now() + timeout)
            except (ConnectionError, EOFError):
                self.close()
                if not reused or attempt:
                    raise
            except Exception:
                self.close()
                raise

    def _read(self, deadline):
        while True:
            r = parse_response(self.buf)
            if r is not None:
                status, head, body, end = r
                self.buf = self.buf[end:]
                if b"onnection: close" in head or b"onnection: Close" in head:
                    self.close()
                return status, body
            left = deadline - now()
            if left <= 0:
                on_stall("no answer on port %d within %.1f s" % (self.port, self.timeout))
                raise socket.timeout("no complete response")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                on_stall("no answer on port %d within %.1f s" % (self.port, self.timeout))
                raise
            if not data:
                raise EOFError("server closed the connection")
            self.buf += data

    def get_json(self, path, timeout=None):
        status, body = self.request(build_request("GET", path), timeout)
        return status, json.loads(body.decode("utf-8")) if body else None

    def stats(self):
        status, obj = self.get_json("/stats")
        if status != 200 or not isinstance(obj, dict):
            raise ProtocolError("GET /stats answered %s" % status)
        return obj

    def post(self, room, text):
        """POST one message, return its id."""
        status, body = self.request(post_request(room, text))
        if status != 201:
            raise ProtocolError("POST answered %s: %r" % (status, body[:200]))
        return json.loads(body.decode("utf-8"))["id"]


# ---------------------------------------------------------------------------------------------------
# Non-blocking load generator: one selector, many connections, no threads


class Conn:
    """A non-blocking keep-alive client connection; calls on_resp(conn, status, body, t) per response.

    status is None when the connection failed or the server closed it with a request outstanding.
    """

    __slots__ = ("sock", "buf", "out", "on_resp", "t_sent", "pending", "dead", "loop", "tag")

    def __init__(self, sock, loop, on_resp, tag=None):
        self.sock = sock
        self.buf = b""
        self.out = b""
        self.on_resp = on_resp
        self.t_sent = 0.0
        self.pending = 0
        self.dead = False
        self.loop = loop
        self.tag = tag
        loop.sel.register(sock, selectors.EVENT_READ, self)

    def send(self, data):
        """Write one request (small requests go out whole; the rest waits for writability)."""
        if self.dead:
            return False
        self.t_sent = now()
        self.pending += 1
        if self.out:
            self.out += data
            return True
        try:
            n = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:
            self.fail()
            return False
        if n < len(data):
            self.out = data[n:]
            self.loop.sel.modify(self.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, self)
        return True

    def on_write(self):
        try:
            n = self.sock.send(self.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.fail()
            return
        self.out = self.out[n:]
        if not self.out:
            self.loop.sel.modify(self.sock, selectors.EVENT_READ, self)

    def on_read(self):
        try:
            data = self.sock.recv(262144)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.fail()
            return
        buf = self.buf + data if self.buf else data
        while buf:
            try:
                r = parse_response(buf)
            except (ProtocolError, ValueError):
                self.buf = b""
                self.fail()
                return
            if r is None:
                break
            status, head, body, end = r
            buf = buf[end:]
            self.pending -= 1
            self.on_resp(self, status, body, now())
            if self.dead:
                return
        self.buf = buf

    def fail(self):
        """Drop the connection; report each outstanding request as failed (status None)."""
        if self.dead:
            return
        self.dead = True
        if self.pending > 0:
            self.loop.dropped += 1
        self.loop.forget(self)
        try:
            self.sock.close()
        except OSError:
            pass
        t = now()
        while self.pending > 0:
            self.pending -= 1
            self.on_resp(self, None, b"", t)

    def close(self):
        """Close quietly (abortively: RST, no TIME_WAIT)."""
        if not self.dead:
            self.dead = True
            self.pending = 0
            self.loop.forget(self)
            try:
                self.sock.close()
            except OSError:
                pass


class Loop:
    """A selector and the loop that drives every Conn registered on it."""

    def __init__(self):
        self.sel = selectors.DefaultSelector()
        self.dropped = 0        # connections the server closed with a request outstanding

    def connect(self, port, on_resp, tag=None, timeout=5.0, cls=None):
        """A new connected Conn, or `cls` (StreamConn), (blocking connect with a timeout, then non-blocking)."""
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.settimeout(timeout)
            s.connect((HOST, port))
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ABORT)
            s.setblocking(False)
        except OSError:
            s.close()
            raise
        return (cls or Conn)(s, self, on_resp, tag)

    def forget(self, conn):
        try:
            self.sel.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass

    def run(self, until=None, timeout=1.0):
        """Serve events until until() is true (True) or timeout seconds pass (False; True if no until)."""
        deadline = now() + timeout
        sel = self.sel
        while until is None or not until():
            left = deadline - now()
            if left <= 0:
                return until is None
            if not sel.get_map():
                time.sleep(min(left, 0.05))
                continue
            for key, mask in sel.select(min(left, 0.5)):
                c = key.data
                if mask & selectors.EVENT_WRITE:
                    c.on_write()
                if mask & selectors.EVENT_READ:
                    c.on_read()
        return True

    def close_all(self, keep=()):
        """Close every connection at once (abortive), except `keep`; returns the seconds it took."""
        conns = [k.data for k in self.sel.get_map().values()]
        self.sel.close()
        self.sel = selectors.DefaultSelector()
        t0 = now()
        for c in conns:
            if c in keep:
                continue
            c.dead = True
            c.pending = 0
            c.sock.close()
        t1 = now()
        for c in keep:
            if not c.dead:
                self.sel.register(c.sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if c.out else 0), c)
        return t1 - t0


# ---------------------------------------------------------------------------------------------------
# Helpers shared by scenarios


class Ctx:
    """Run-wide settings: server path, CPUs, temp dir, limits."""


def outstanding(conns):
    """How many of conns are alive with a request outstanding (parked, if all went well)."""
    return sum(1 for c in conns if c.pending > 0 and not c.dead)


def wait_parked(ctl, loop, target, timeout, key="waiters"):
    """Serve `loop` and poll /stats until `key` (waiters, or streams) >= target(); returns (ok, last stats)."""
    deadline = now() + timeout
    pause = 0.002
    st = {}
    while True:
        try:
            st = ctl.stats()
        except (OSError, EOFError) as e:                    # unanswered: keep asking until the deadline
            if now() >= deadline:
                raise
            ctl.stalls = getattr(ctl, "stalls", 0) + 1
            log("/stats unanswered (%s); still waiting for %d %s" % (type(e).__name__, target(), key))
            st = {}
        if st.get(key, 0) >= target():
            return True, st
        left = deadline - now()
        if left <= 0:
            return False, st
        loop.run(None, min(pause, left))
        pause = min(pause * 2, 0.02)


def park(ctx, port, ctl, loop, n, request, on_resp, state, timeout, key="waiters", cls=None):
    """Open n keep-alive clients in batches, each sending `request`; wait until /stats shows them parked.

    state.early counts responses that arrived before they should (errors: 503, a timeout, ...).
    With key="streams" and cls=StreamConn it opens event streams instead. Each conn's tag is its
    index in the returned list. Returns (conns, connect_errors, ok).
    """
    conns = []
    connect_errors = 0
    base = ctl.stats().get(key, 0)
    deadline = now() + timeout
    ok = True
    while len(conns) < n:
        if now() >= deadline:
            ok = False
            break
        for _ in range(min(ctx.batch, n - len(conns))):
            try:
                c = loop.connect(port, on_resp, tag=len(conns), cls=cls)
            except OSError as e:
                connect_errors += 1
                if connect_errors in (1, 10, 100):
                    log("connect failed (%d so far): %s" % (connect_errors, e))
                if connect_errors > 100:
                    break
                continue
            c.send(request)
            conns.append(c)
        if connect_errors > 100:
            ok = False
            break
        ok, st = wait_parked(ctl, loop, lambda: base + outstanding(conns),
                             min(PARK_BATCH_TIMEOUT_S, max(0.1, deadline - now())), key)
        if not ok:
            log("parking stalled: /stats %s=%s, expected %d" % (key, st.get(key), base + outstanding(conns)))
            break
    return conns, connect_errors, ok


class State:
    """A mutable bag of counters for callbacks."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def fanout_callbacks():
    """State and callbacks for one POST answering parked waiters: latency from st.t0 to each answer.

    An answer that arrives while st.t0 is None (before the POST) counts as early and bad.
    """
    st = State(early=0, t0=None, got=0, lat=[], bad=0, post_t=None, post_body=None, post_status=None)

    def on_wait(c, status, body, t):
        if st.t0 is None:
            st.early += 1
            st.bad += 1
            if st.early <= 3:
                log("waiter answered early: %s %r" % (status, body[:120]))
            return
        st.got += 1
        if status == 200 and body.startswith(b"[{"):
            st.lat.append(t - st.t0)
        else:
            st.bad += 1

    def on_post(c, status, body, t):
        st.post_t, st.post_status, st.post_body = t, status, body

    return st, on_wait, on_post


def safe_stats(ctl, keys=("waiters", "connections", "threads", "threads_busy")):
    """A few /stats fields for a diagnostic, or the error met asking for them."""
    try:
        st = ctl.stats()
        return {k: st.get(k) for k in keys}
    except Exception as e:
        return "unavailable (%s: %s)" % (type(e).__name__, e)


def settle_cpu(server, limit=3.0, step=0.05):
    """Server CPU seconds once it stops rising (two equal readings), bounded."""
    deadline = now() + limit
    last = server.cpu()
    while now() < deadline:
        time.sleep(step)
        cur = server.cpu()
        if cur == last:
            time.sleep(step)
            cur2 = server.cpu()
            if cur2 == cur:
                return cur
            cur = cur2
        last = cur
    return last


def start_server(ctx, db=":memory:"):
    srv = Server(ctx, db).start()
    ctx.server_lines.add(srv.first_line)
    return srv


# ---------------------------------------------------------------------------------------------------
# Scenarios


def scenario_wake(ctx, w):
    """W parked waiters, one POST per round: latency to each waiter's complete response."""
    srv = start_server(ctx)
    ctl = Ctl(srv.port)
    loop = Loop()
    res = {"scenario": "wake", "waiters": w, "rounds": ctx.rounds}
    errors = 0
    try:
        room = "bench"
        cursor = ctl.post(room, "start")
        st, on_wait, on_post = fanout_callbacks()
        poster = loop.connect(srv.port, on_post)
        conns, cerr, ok = park(ctx, srv.port, ctl, loop, w, poll_request(room, cursor, 30), on_wait, st,
                               timeout=60)
        errors += cerr
        if not ok or not outstanding(conns):
            raise ProtocolError("only %d of %d waiters parked" % (outstanding(conns), w))
        rounds = []
        for r in range(ctx.rounds):
            if r:
                st.t0 = None
                req = poll_request(room, cursor, 30)
                for c in conns:
                    c.send(req)
                ok, _ = wait_parked(ctl, loop, lambda: outstanding(conns), 30)
                if not ok:
                    raise ProtocolError("round %d: waiters did not re-park" % r)
            expect = outstanding(conns)
            st.got, st.lat, st.post_t = 0, [], None
            st.t0 = now()
            poster.send(post_request(room, "round %d" % r))
            if not loop.run(lambda: st.got >= expect and st.post_t is not None, 30):
                raise ProtocolError("round %d: after 30 s %d of %d waiters answered, POST %s; /stats %s"
                                    % (r, st.got, expect, "answered %s" % st.post_status if st.post_t else
                                       "unanswered", safe_stats(ctl)))
            if st.post_status != 201:
                raise ProtocolError("POST answered %s" % st.post_status)
            cursor = json.loads(st.post_body.decode("utf-8"))["id"]
            lat = sorted(st.lat)
            missing = expect - len(lat)         # dropped connections are counted in st.bad once
            errors += missing
            rounds.append({"p50": percentile(lat, 50), "p99": percentile(lat, 99),
                           "max": lat[-1] if lat else None, "all": lat[-1] if not missing and lat else None,
                           "first": lat[0] if lat else None, "post": st.post_t - st.t0})
        for key in ("p50", "p99", "max", "all", "first", "post"):
            res[key + "_ms"] = ms(median([x[key] for x in rounds]))
        res["p99_ms_rounds"] = [ms(x["p99"]) for x in rounds]
        res["dropped_by_server"] = loop.dropped
        errors += st.bad
    finally:
        loop.close_all()
        ctl.close()
        res["server_exit"] = srv.stop()
    res["errors"] = errors
    return res


def mass_leave(ctx, srv, ctl, loop, keep, base):
    """Close every parked client at once; time a new /healthz and the return of /stats to `base`."""
    out = {}
    t_leave = now()
    out["leave_ms"] = ms(loop.close_all(keep=keep))
    t0 = now()
    h = Ctl(srv.port, timeout=ctx.recovery_bound)
    try:
        status, _ = h.request(build_request("GET", "/healthz"))
        out["healthz_ms"] = ms(now() - t0) if status == 200 else None
        if status != 200:
            out["healthz_status"] = status
    except (OSError, EOFError, ProtocolError) as e:
        out["healthz_ms"] = None
        out["healthz_error"] = "%s after %.1f s" % (type(e).__name__, now() - t0)
    finally:
        h.close()
    deadline = t0 + ctx.recovery_bound
    back = None
    st = {}
    while now() < deadline:
        ctl.timeout = max(0.5, min(CTL_TIMEOUT_S, deadline - now()))
        try:
            st = ctl.stats()
        except (OSError, EOFError, ProtocolError, ValueError):
            st = {}
        finally:
            ctl.timeout = CTL_TIMEOUT_S
        if st and st.get("connections", 0) <= base.get("connections", 0) + 2 \
                and st.get("threads_busy", 0) <= base.get("threads_busy", 0) + 2:
            back = now() - t0
            break
        time.sleep(0.05)
    out["sockets_back_s"] = rnd(back)
    out["after"] = {k: st.get(k) for k in ("connections", "threads", "threads_busy", "waiters")}
    out["rss_after_kib"] = srv.rss()
    out["total_s"] = rnd(now() - t_leave)
    return out


def scenario_fanout(ctx, n):
    """N parked waiters, one POST: all answered, POST time, CPU and RSS per waiter; then mass leave."""
    srv = start_server(ctx)
    ctl = Ctl(srv.port)
    loop = Loop()
    res = {"scenario": "fanout", "waiters": n}
    errors = 0
    try:
        room = "fanout"
        cursor = ctl.post(room, "start")
        st, on_wait, on_post = fanout_callbacks()
        poster = loop.connect(srv.port, on_post)
        base = ctl.stats()
        rss0 = srv.rss()
        t_park = now()
        conns, cerr, ok = park(ctx, srv.port, ctl, loop, n, poll_request(room, cursor, LONG_POLL_S), on_wait, st,
                               timeout=ctx.park_timeout)
        res["park_s"] = rnd(now() - t_park)
        sp = ctl.stats()
        rss1 = srv.rss()
        res["parked"] = sp.get("waiters")
        res["park_errors"] = cerr + st.early
        errors += cerr
        if rss0 is not None and rss1 is not None:
            res["rss_before_kib"], res["rss_parked_kib"] = rss0, rss1
            res["rss_kib_per_waiter"] = rnd((rss1 - rss0) / float(max(1, n)), 2)
        live = [c for c in conns if not c.dead and c.pending > 0]
        cpu0, me0 = srv.cpu(), self_cpu()
        st.t0 = now()
        poster.send(post_request(room, "fan-out"))
        loop.run(lambda: st.got >= len(live) and st.post_t is not None, ctx.fanout_bound)
        t_end = now()
        cpu_answered = srv.cpu()
        res["bench_cpu_s"] = rnd(self_cpu() - me0)
        cpu1 = settle_cpu(srv)
        st.settled_at = now()
        lat = sorted(st.lat)
        res["answered"] = len(lat)
        res["all_ms"] = ms(lat[-1]) if lat and len(lat) == n else None
        res["first_ms"] = ms(lat[0]) if lat else None
        res["p50_ms"] = ms(percentile(lat, 50))
        res["post_ms"] = ms(st.post_t - st.t0) if st.post_t else None
        if not lat or len(lat) < n:
            log("fan-out: only %d of %d answered within %.1f s" % (len(lat), n, t_end - st.t0))
        errors += len(live) - len(lat)
        if cpu0 is not None:
            res["cpu_s"] = rnd(cpu1 - cpu0)
            # Until the last answer, and once the server's CPU stops rising (woken threads included).
            res["cpu_us_per_waiter_answered"] = rnd((cpu_answered - cpu0) / float(max(1, len(lat))) * 1e6, 1)
            res["cpu_us_per_waiter"] = rnd((cpu1 - cpu0) / float(max(1, len(lat))) * 1e6, 1)
            res["cpu_settle_s"] = rnd(st.settled_at - t_end)
        if st.post_status != 201:
            raise ProtocolError("POST answered %s" % st.post_status)
        cursor = json.loads(st.post_body.decode("utf-8"))["id"]

        # Mass leave: re-park the same clients (a chat client re-polls at once), then all vanish.
        recs = []
        for r in range(ctx.recovery_runs):
            st.t0 = None
            st.early = 0
            if r == 0:
                req = poll_request(room, cursor, LONG_POLL_S)
                t_repark = now()
                live = [c for c in live if not c.dead]
                for c in live:
                    c.send(req)
                try:
                    ok, _ = wait_parked(ctl, loop, lambda: outstanding(live), ctx.repark_bound)
                except (OSError, EOFError):
                    ok = False
                # Every answered client re-polls at once, as a chat page does.
                res["repark_s"] = rnd(now() - t_repark) if ok else None
                res["repark_stats_unanswered"] = getattr(ctl, "stalls", 0)
            else:
                conns, cerr, ok = park(ctx, srv.port, ctl, loop, n, poll_request(room, cursor, LONG_POLL_S),
                                       on_wait, st, timeout=ctx.park_timeout)
                errors += cerr
            if not ok:
                log("recovery run %d: clients did not all park; leaving anyway" % (r + 1))
                errors += 1
            rec = mass_leave(ctx, srv, ctl, loop, (poster,), base)
            rec["dropped_by_server"] = loop.dropped
            loop.dropped = 0
            log("fanout %d recovery %d/%d: healthz %s ms, sockets back %s s" %
                (n, r + 1, ctx.recovery_runs, rec["healthz_ms"], rec["sockets_back_s"]))
            recs.append(rec)
            if rec["healthz_ms"] is None and rec["sockets_back_s"] is None:
                break                                       # wedged: more runs only wait out bounds
        res["recovery"] = recs
        hz = [x["healthz_ms"] for x in recs]
        sb = [x["sockets_back_s"] for x in recs]
        res["healthz_ms_max"] = None if None in hz else max(hz)
        res["sockets_back_s_max"] = None if None in sb else max(sb)
        res["recovery_runs"] = len(recs)
        res["dropped_by_server"] = loop.dropped + sum(x["dropped_by_server"] for x in recs)
        errors += st.bad
    finally:
        loop.close_all()
        ctl.close()
        res["server_exit"] = srv.stop()
    res["errors"] = errors
    return res


def scenario_idle(ctx, n, seconds):
    """N waiters parked, nothing posted: server CPU over the window, RSS."""
    srv = start_server(ctx)
    ctl = Ctl(srv.port)
    loop = Loop()
    res = {"scenario": "idle", "waiters": n, "seconds": seconds}
    errors = 0
    try:
        room = "idle"
        cursor = ctl.post(room, "start")
        st = State(early=0)

        def on_wait(c, status, body, t):
            st.early += 1
            if st.early <= 3:
                log("idle waiter answered: %s %r" % (status, body[:120]))

        rss0 = srv.rss()
        conns, cerr, ok = park(ctx, srv.port, ctl, loop, n, poll_request(room, cursor, LONG_POLL_S), on_wait, st,
                               timeout=ctx.park_timeout)
        errors += cerr
        res["parked"] = ctl.stats().get("waiters")
        loop.run(None, 0.2)                                 # let the parking burst settle
        cpu0, t0 = srv.cpu(), now()
        loop.run(None, seconds)
        cpu1, t1 = srv.cpu(), now()
        rss1 = srv.rss()
        res["parked_after"] = ctl.stats().get("waiters")
        res["dropped_by_server"] = loop.dropped
        ctl.close()
        # The API: on SIGTERM every parked waiter gets a complete 200 [] and the process exits 0.
        bye = State(ok=0, other=0)

        def on_bye(c, status, body, t):
            if status == 200 and body.strip() == b"[]":
                bye.ok += 1
            else:
                bye.other += 1

        live = [c for c in conns if not c.dead and c.pending > 0]
        for c in live:
            c.on_resp = on_bye
        t_term = now()
        srv.proc.terminate()
        loop.run(lambda: bye.ok + bye.other >= len(live), ctx.sigterm_bound)
        res["sigterm_answered"] = bye.ok
        res["sigterm_answer_s"] = rnd(now() - t_term)
        try:
            srv.proc.wait(max(0.1, ctx.sigterm_bound - (now() - t_term)))
            res["sigterm_exit_s"] = rnd(now() - t_term)
        except subprocess.TimeoutExpired:
            res["sigterm_exit_s"] = None
        if cpu0 is not None:
            res["cpu_s"] = rnd(max(0.0, cpu1 - cpu0), 3)
            res["cpu_pct"] = rnd(max(0.0, cpu1 - cpu0) / (t1 - t0) * 100.0, 3)
        if rss0 is not None and rss1 is not None:
            res["rss_parked_kib"] = rss1
            res["rss_kib_per_waiter"] = rnd((rss1 - rss0) / float(max(1, n)), 2)
        errors += st.early
        if not ok:
            errors += 1
    finally:
        loop.close_all()
        ctl.close()
        res["server_exit"] = srv.stop()
    res["errors"] = errors
    return res


def post_run(port, clients, seconds, warmup):
    """Closed-loop posting from `clients` keep-alive connections; returns a result dict."""
    loop = Loop()
    req = post_request("post", "benchmark message")
    st = State(t_start=0.0, t_end=0.0, lat=[], bad=0, done=0)

    def on_resp(c, status, body, t):
        if status != 201:
            st.bad += 1
            if st.bad <= 3:
                log("POST answered %s %r" % (status, body[:120]))
        elif st.t_start <= t <= st.t_end:
            st.lat.append(t - c.t_sent)
        if t < st.t_end and not c.dead:
            c.send(req)
        else:
            st.done += 1

    conns = [loop.connect(port, on_resp) for _ in range(clients)]
    st.t_start = now() + warmup
    st.t_end = st.t_start + seconds
    for c in conns:
        c.send(req)
    loop.run(lambda: st.done >= clients, warmup + seconds + 10)
    loop.close_all()
    lat = sorted(st.lat)
    return {"requests": len(lat), "rps": round(len(lat) / seconds, 1),
            "p50_ms": ms(percentile(lat, 50)), "p99_ms": ms(percentile(lat, 99)),
            "max_ms": ms(lat[-1]) if lat else None, "errors": st.bad + (clients - st.done)}


def scenario_post(ctx, db_kind):
    """Posting throughput for each client count, on one server; yields one result per count."""
    db = ":memory:" if db_kind == "memory" else os.path.join(ctx.tmpdir, "bench-%d.db" % (Server.count + 1))
    try:
        srv = start_server(ctx, db)
    except ServerStartError as e:
        for c in ctx.post_clients:
            yield {"scenario": "post", "db": db_kind, "clients": c, "skipped": "server did not start: %s" % e}
        return
    try:
        ctl = Ctl(srv.port)
        ctl.post("post", "start")
        ctl.close()
        for c in ctx.post_clients:
            cpu0, t0, me0 = srv.cpu(), now(), self_cpu()
            r = post_run(srv.port, c, ctx.post_seconds, ctx.post_warmup)
            cpu1, t1, me1 = srv.cpu(), now(), self_cpu()
            res = {"scenario": "post", "db": db_kind, "clients": c, "seconds": ctx.post_seconds}
            res.update(r)
            if cpu0 is not None and r["requests"]:
                res["server_cpu_pct"] = rnd((cpu1 - cpu0) / (t1 - t0) * 100.0, 1)
            res["bench_cpu_pct"] = rnd((me1 - me0) / (t1 - t0) * 100.0, 1)
            yield res
    finally:
        rc = srv.stop()
        if rc not in (0, None):
            log("post server (%s) exited with status %s" % (db_kind, rc))


def scenario_order(ctx):
    """Posters and long-polling followers at once; every follower must see every message once, in order."""
    srv = start_server(ctx)
    ctl = Ctl(srv.port)
    loop = Loop()
    P, F, M = ctx.order_posters, ctx.order_followers, ctx.order_messages
    res = {"scenario": "order", "posters": P, "followers": F, "messages": P * M}
    errors = 0
    try:
        room = "order"
        cursor0 = ctl.post(room, "start")
        st = State(posted={}, poster_ids=[[] for _ in range(P)], left=[M] * P, posting=P,
                   seen=[[] for _ in range(F)], bodies=[[] for _ in range(F)], cursor=[cursor0] * F,
                   bad=0, gone=0, dropped=0, max_id=None, stop=False)

        def on_post(c, status, body, t):
            i = c.tag
            if status != 201:
                st.bad += 1
                if st.bad <= 3:
                    log("order POST answered %s %r" % (status, body[:120]))
            else:
                mid = json.loads(body.decode("utf-8"))["id"]
                st.posted[mid] = "p%d-%d" % (i, M - st.left[i])
                st.poster_ids[i].append(mid)
            st.left[i] -= 1
            if st.left[i] > 0 and not c.dead:
                c.send(post_request(room, "p%d-%d" % (i, M - st.left[i])))
            else:
                st.posting -= 1
                if st.posting == 0:
                    st.max_id = max(st.posted) if st.posted else cursor0

        def on_follow(c, status, body, t):
            j = c.tag
            if status == 200:
                for m in json.loads(body.decode("utf-8")):
                    st.seen[j].append(m["id"])
                    st.bodies[j].append(m.get("body"))
                if st.seen[j]:
                    st.cursor[j] = st.seen[j][-1]
            elif status is None:
                # The server dropped the connection with a long poll outstanding: a client
                # reconnects and polls again from its cursor, so do that, and report it.
                st.dropped += 1
                log("order: follower %d's connection dropped %.3f s after its GET (%d messages seen)"
                    % (j, t - c.t_sent, len(st.seen[j])))
                if st.dropped > 20 or st.stop:
                    return
                c = loop.connect(srv.port, on_follow, tag=j)
            else:
                st.bad += 1
                if status == 410:
                    st.gone += 1
                if st.bad <= 3:
                    log("order GET answered %s %r" % (status, body[:120]))
                if st.bad > 50:
                    return
            if not st.stop and not c.dead:
                c.send(poll_request(room, st.cursor[j], 10))

        followers = [loop.connect(srv.port, on_follow, tag=j) for j in range(F)]
        for c in followers:
            c.send(poll_request(room, cursor0, 10))
        ok, _ = wait_parked(ctl, loop, lambda: F, 10)
        posters = [loop.connect(srv.port, on_post, tag=i) for i in range(P)]
        t0 = now()
        for c in posters:
            c.send(post_request(room, "p%d-0" % c.tag))

        def finished():
            return st.posting == 0 and all(cur >= st.max_id for cur in st.cursor)

        done = loop.run(finished, ctx.order_bound)
        res["seconds"] = rnd(now() - t0)
        st.stop = True
        if not done:
            log("order: followers did not all reach the last message within %.0f s" % ctx.order_bound)
        posted = set(st.posted)
        lost = dup = reordered = foreign = wrong_body = 0
        for j in range(F):
            seen = st.seen[j]
            s = set(seen)
            lost += len(posted - s)
            dup += len(seen) - len(s)
            foreign += len(s - posted)
            reordered += sum(1 for a, b in zip(seen, seen[1:]) if b <= a)
            wrong_body += sum(1 for mid, b in zip(seen, st.bodies[j]) if mid in st.posted and st.posted[mid] != b)
        for ids in st.poster_ids:                           # one poster's posts are sequential: ids must rise
            reordered += sum(1 for a, b in zip(ids, ids[1:]) if b <= a)
        res.update({"posted": len(posted), "lost": lost, "duplicated": dup, "reordered": reordered,
                    "foreign": foreign, "wrong_body": wrong_body, "gone_410": st.gone,
                    "connections_dropped": st.dropped})
        res["ordering_errors"] = lost + dup + reordered + foreign + wrong_body
        errors += st.bad + st.dropped + res["ordering_errors"] + (0 if ok else 1)
    finally:
        loop.close_all()
        ctl.close()
        res["server_exit"] = srv.stop()
    res["errors"] = errors
    return res


# ---------------------------------------------------------------------------------------------------
# Targets and the table


def targets_for(r, results):
    """Rows (measure, value text, target text, PASS/MISS/'') for one scenario result."""
    rows = []

    def row(measure, value, unit="", target=None, ok=None, fmt="%.3g"):
        vt = "n/a" if value is None else (fmt % value if isinstance(value, float) else str(value)) + unit
        res = "" if target is None else ("PASS" if ok else "MISS")
        rows.append((measure, vt, target or "", res))

    sc = r["scenario"]
    if r.get("skipped"):
        rows.append(("skipped", r["skipped"][:70], "", "SKIP"))
        return rows
    if r.get("exception"):
        rows.append(("exception", r["exception"][:110], "", "FAIL"))
        return rows
    if sc == "wake":
        w = r["waiters"]
        if w == 1:
            row("p50", r["p50_ms"], " ms", "<= 1.0 ms", r["p50_ms"] is not None and r["p50_ms"] <= 1.0)
        else:
            row("p50", r["p50_ms"], " ms")
        if w == 1000:
            row("p99", r["p99_ms"], " ms", "<= 45 ms", r["p99_ms"] is not None and r["p99_ms"] <= 45)
        else:
            row("p99", r["p99_ms"], " ms")
        row("max / all answered", r["all_ms"], " ms")
        row("POST answered", r["post_ms"], " ms")
    elif sc == "fanout":
        n = r["waiters"]
        big = n == 10000
        row("parked / errors", "%s / %s" % (r.get("parked"), r.get("park_errors")), "", "%d / 0" % n,
            r.get("parked") == n and not r.get("park_errors"))
        row("all answered", r.get("all_ms"), " ms", "<= 300 ms" if big else None,
            r.get("all_ms") is not None and r["all_ms"] <= 300)
        row("POST answered", r.get("post_ms"), " ms")
        row("all re-poll at once: re-parked", r.get("repark_s"), " s")
        row("server CPU / waiter, to last answer", r.get("cpu_us_per_waiter_answered"), " us")
        row("server CPU / waiter, all (settled)", r.get("cpu_us_per_waiter"), " us", "<= 40 us" if big else None,
            r.get("cpu_us_per_waiter") is not None and r["cpu_us_per_waiter"] <= 40)
        row("RSS / parked waiter", r.get("rss_kib_per_waiter"), " KiB", "<= 24 KiB",
            r.get("rss_kib_per_waiter") is not None and r["rss_kib_per_waiter"] <= 24)
        k = r.get("recovery_runs", 0)
        tag = "" if k <= 1 else " (max of %d)" % k
        row("leave: new /healthz" + tag, r.get("healthz_ms_max"), " ms", "<= 1000 ms" if big else None,
            r.get("healthz_ms_max") is not None and r["healthz_ms_max"] <= 1000)
        row("leave: sockets back" + tag, r.get("sockets_back_s_max"), " s", "<= 3 s" if big else None,
            r.get("sockets_back_s_max") is not None and r["sockets_back_s_max"] <= 3)
        if r.get("recovery"):
            row("leave: RSS after", r["recovery"][-1].get("rss_after_kib"), " KiB")
    elif sc == "idle":
        n = r["waiters"]
        row("parked", r.get("parked"), "", "%d" % n, r.get("parked") == n and r.get("parked_after") == n)
        row("server CPU over %ss" % r["seconds"], r.get("cpu_pct"), " % of a core",
            "< 0.5 %" if n == 10000 else None, r.get("cpu_pct") is not None and r["cpu_pct"] < 0.5, fmt="%.2f")
        row("RSS / parked waiter", r.get("rss_kib_per_waiter"), " KiB", "<= 24 KiB",
            r.get("rss_kib_per_waiter") is not None and r["rss_kib_per_waiter"] <= 24)
        if "sigterm_answered" in r:
            good = r["sigterm_answered"] == r.get("parked_after") and r.get("server_exit") == 0
            row("SIGTERM: answered [] / exit", "%s / %s after %s s" % (r["sigterm_answered"], r.get("server_exit"),
                r.get("sigterm_exit_s")), "", "%s / 0 (API)" % r.get("parked_after"), good)
    elif sc == "post":
        c, db = r["clients"], r["db"]
        if db == "memory" and c == 16:
            row("req/s", r["rps"], "", ">= 10000", r["rps"] >= 10000, fmt="%.0f")
        elif db == "file" and c == 64:
            mem = [x for x in results if x["scenario"] == "post" and x["db"] == "memory"
                   and x["clients"] == 64 and x.get("rps")]
            if mem:
                need = 0.7 * mem[0]["rps"]
                row("req/s", r["rps"], "", ">= %.0f (70%% of memory)" % need, r["rps"] >= need, fmt="%.0f")
            else:
                row("req/s", r["rps"], "", fmt="%.0f")
        else:
            row("req/s", r["rps"], "", fmt="%.0f")
        row("p99", r["p99_ms"], " ms")
    elif sc == "order":
        row("lost/dup/reordered", "%s/%s/%s" % (r.get("lost"), r.get("duplicated"), r.get("reordered")),
            "", "0/0/0", r.get("ordering_errors") == 0 and not r.get("errors"))
    if r.get("dropped_by_server") or r.get("connections_dropped"):
        rows.append(("connections dropped by server", str(r.get("dropped_by_server") or r.get("connections_dropped")),
                     "0", "FAIL"))
    if r.get("errors"):
        rows.append(("errors", str(r["errors"]), "0", "FAIL"))
    return rows


def size_label(r):
    sc = r["scenario"]
    if sc in ("wake", "fanout", "idle"):
        return "%d waiter%s" % (r["waiters"], "" if r["waiters"] == 1 else "s")
    if sc == "post":
        return "%s, %d client%s" % (r["db"], r["clients"], "" if r["clients"] == 1 else "s")
    if sc == "order":
        return "%dx%d, %d msgs" % (r["posters"], r["followers"], r["messages"])
    return ""


def print_table(results):
    rows = [("scenario", "size", "measure", "value", "target", "result")]
    for r in results:
        for measure, value, target, res in targets_for(r, results):
            rows.append((r["scenario"], size_label(r), measure, value, target, res))
    widths = [max(len(row[i]) for row in rows) for i in range(6)]
    lines = []
    for k, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
        if k == 0:
            lines.append("  ".join("-" * widths[i] for i in range(6)))
    print("\n".join(lines))
    verdicts = [row[5] for row in rows[1:] if row[5]]
    print("targets: %d PASS, %d MISS; failures: %d" % (verdicts.count("PASS"), verdicts.count("MISS"),
                                                       verdicts.count("FAIL")))


# ---------------------------------------------------------------------------------------------------
# Main


def where(exc):
    """'function:line' frames of this file in the exception's traceback, innermost last."""
    import traceback
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == __file__ or
              os.path.basename(f.filename) == "bench.py"]
    return " < ".join("%s:%d" % (f.name, f.lineno) for f in reversed(frames[-8:]))


def parse_ints(text):
    return [int(x) for x in text.split(",") if x.strip()]


def setup_machine(ctx, pin):
    """Raise RLIMIT_NOFILE to the hard limit; choose CPUs for the server and for us."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = hard if hard != resource.RLIM_INFINITY else 1 << 20
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, 10240), hard))   # macOS: OPEN_MAX
        ctx.nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, ValueError, OSError):
        ctx.nofile = None
    ctx.server_cpu = None
    ctx.pinning = "not pinned"
    if pin and hasattr(os, "sched_getaffinity") and shutil.which("taskset"):
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) >= 2:
            ctx.server_cpu = cpus[0]
            os.sched_setaffinity(0, {cpus[1]})
            ctx.pinning = "server on CPU %d, load generator on CPU %d" % (cpus[0], cpus[1])


def main(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smallest sizes of every scenario, a few seconds")
    p.add_argument("--only", default=",".join(SCENARIOS), help="comma list of %s" % ",".join(SCENARIOS))
    p.add_argument("--server", default=os.path.join(here, "..", "chat_server.py"),
                   help="path of chat_server.py (default: ../chat_server.py beside this file)")
    p.add_argument("--wake-sizes", type=parse_ints, help="waiters per wake run (default 1,100,1000; quick 1,20)")
    p.add_argument("--rounds", type=int, help="wake rounds per size (default 5; quick 3)")
    p.add_argument("--fanout-sizes", type=parse_ints, help="default 1000,5000,10000; quick 200")
    p.add_argument("--recovery-runs", type=int, default=1,
                   help="mass-leave runs per fan-out size (default 1; the target is 10 in a row)")
    p.add_argument("--idle-waiters", type=int, help="default 10000; quick 200")
    p.add_argument("--idle-seconds", type=float, help="default 10; quick 1")
    p.add_argument("--post-clients", type=parse_ints, help="default 1,16,64")
    p.add_argument("--post-seconds", type=float, help="default 3; quick 0.5")
    p.add_argument("--post-db", default="memory,file", help="memory,file (default both)")
    p.add_argument("--order-posters", type=int, default=4)
    p.add_argument("--order-followers", type=int, default=4)
    p.add_argument("--order-messages", type=int, help="per poster (default 200; quick 25)")
    p.add_argument("--batch", type=int, default=PARK_BATCH, help="connections per parking batch")
    p.add_argument("--no-pin", action="store_true", help="do not pin server and load generator to CPUs")
    a = p.parse_args(argv)

    q = a.quick
    ctx = Ctx()
    ctx.server_path = os.path.abspath(a.server)
    ctx.wake_sizes = a.wake_sizes or ([1, 20] if q else [1, 100, 1000])
    ctx.rounds = a.rounds or (3 if q else 5)
    ctx.fanout_sizes = a.fanout_sizes or ([200] if q else [1000, 5000, 10000])
    ctx.recovery_runs = max(1, a.recovery_runs)
    ctx.idle_waiters = a.idle_waiters or (200 if q else 10000)
    ctx.idle_seconds = a.idle_seconds or (1.0 if q else 10.0)
    ctx.post_clients = a.post_clients or [1, 16, 64]
    ctx.post_seconds = a.post_seconds or (0.5 if q else 3.0)
    ctx.post_warmup = 0.1 if q else 0.3
    ctx.post_dbs = [x for x in a.post_db.split(",") if x in ("memory", "file")]
    ctx.order_posters, ctx.order_followers = a.order_posters, a.order_followers
    ctx.order_messages = a.order_messages or (25 if q else 200)
    ctx.order_bound = 10.0 if q else 30.0
    ctx.batch = max(1, a.batch)
    biggest = max(ctx.fanout_sizes + ctx.wake_sizes + [ctx.idle_waiters])
    ctx.max_waiters = max(12000, biggest + 1000)
    ctx.max_connections = max(13000, biggest + 2000)
    ctx.park_timeout = 30.0 if q else 120.0
    ctx.fanout_bound = 30.0
    ctx.recovery_bound = 5.0 if q else 20.0
    ctx.repark_bound = 10.0 if q else 20.0
    ctx.sigterm_bound = 5.0 if q else 10.0
    ctx.server_lines = set()
    ctx.server_stderr = []
    only = [x.strip() for x in a.only.split(",") if x.strip()]
    unknown = [x for x in only if x not in SCENARIOS]
    if unknown:
        p.error("unknown scenario(s): %s" % ", ".join(unknown))
    if not os.path.exists(ctx.server_path):
        print("bench: server not found: %s" % ctx.server_path, file=sys.stderr)
        return 2
    setup_machine(ctx, not a.no_pin)
    if ctx.nofile is not None and ctx.nofile < biggest + 100:
        log("RLIMIT_NOFILE is %d: too low for %d clients" % (ctx.nofile, biggest))
    log("python %s; %s; RLIMIT_NOFILE %s" % (sys.version.split()[0], ctx.pinning, ctx.nofile))

    results = []
    failed = False

    def emit(r):
        nonlocal failed
        print(json.dumps(r), flush=True)
        results.append(r)
        if r.get("exception") or r.get("errors") or r.get("ordering_errors"):
            failed = True

    def run(label, base, fn, *args):
        log(label)
        t = now()
        try:
            r = fn(*args)
        except Exception as e:                              # report, keep going, fail at the end
            r = dict(base)
            r["exception"] = "%s: %s (%s)" % (type(e).__name__, e, where(e))
            log("%s failed: %s" % (label, r["exception"]))
        r["elapsed_s"] = rnd(now() - t, 2)
        emit(r)

    with tempfile.TemporaryDirectory(prefix="chat-bench-") as tmpdir:
        ctx.tmpdir = tmpdir
        t_all = now()
        for sc in SCENARIOS:
            if sc not in only:
                continue
            if sc == "wake":
                for w in ctx.wake_sizes:
                    run("wake: %d waiters x %d rounds" % (w, ctx.rounds), {"scenario": "wake", "waiters": w},
                        scenario_wake, ctx, w)
            elif sc == "fanout":
                for n in ctx.fanout_sizes:
                    run("fanout: %d waiters" % n, {"scenario": "fanout", "waiters": n}, scenario_fanout, ctx, n)
            elif sc == "idle":
                run("idle: %d waiters for %.0f s" % (ctx.idle_waiters, ctx.idle_seconds),
                    {"scenario": "idle", "waiters": ctx.idle_waiters, "seconds": ctx.idle_seconds},
                    scenario_idle, ctx, ctx.idle_waiters, ctx.idle_seconds)
            elif sc == "post":
                for db in ctx.post_dbs:
                    log("post: %s, clients %s, %.1f s each" % (db, ctx.post_clients, ctx.post_seconds))
                    gen = scenario_post(ctx, db)
                    done = set()
                    try:
                        for r in gen:
                            done.add(r["clients"])
                            emit(r)
                    except Exception as e:
                        for c in ctx.post_clients:
                            if c not in done:
                                emit({"scenario": "post", "db": db, "clients": c,
                                      "exception": "%s: %s" % (type(e).__name__, e)})
            elif sc == "order":
                run("order: %d posters x %d messages, %d followers" %
                    (ctx.order_posters, ctx.order_messages, ctx.order_followers),
                    {"scenario": "order", "posters": ctx.order_posters, "followers": ctx.order_followers,
                     "messages": ctx.order_posters * ctx.order_messages}, scenario_order, ctx)
        elapsed = now() - t_all

    print()
    print("chat_server bench: %s; python %s; %s; %.0f s (load generator CPU %.1f s)" %
          (ctx.server_path, sys.version.split()[0], ctx.pinning, elapsed, self_cpu()))
    for line in sorted(ctx.server_lines):
        print("server said: %s" % line)
    for tail in ctx.server_stderr:
        print("server stderr: %s" % tail[-300:])
    print_table(results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
