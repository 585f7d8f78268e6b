#!/usr/bin/env python3
"""bench.py - load benchmark for chat_server.py; Python standard library only.

Run:    python bench/bench.py                 # every scenario, full sizes (about 5 minutes on 2 cores)
        python bench/bench.py --quick         # smallest sizes, well under a minute (used by a unit test)
        python bench/bench.py --only wake,fanout --fanout-sizes 10000 --recovery-runs 10
        python bench/bench.py --only post,stream --post-fanout 5000 --stream-sizes 1000,10000
        python bench/bench.py --only shards --shard-clients 64 --shard-waiters 5000
        python bench/bench.py --only adversarial --adversarial-runs 5     # not part of the default run
        python bench/bench.py --only backup                               # not part of the default run either
        python bench/bench.py --only identity                             # nor this one
        python bench/bench.py --only rooms                                # nor this one (about 4 minutes)

Starts ../chat_server.py (relative to this file) as a separate process for each scenario size
(`--port 0 --quiet --db :memory:`, or a database file in a temporary directory for the durable
posting rows), reads the port from its first stdout line, pins it to one CPU and this process to
another (taskset / os.sched_setaffinity, where available), and drives it from a single-threaded
load generator over raw non-blocking sockets (selectors), loopback only. The shards scenario also
starts a private nginx (`nginx -p DIR -c CONF`, daemon off, everything in the temporary directory;
the system's nginx and /etc/nginx are never touched) and speaks TLS to it.

Scenarios
    wake    W waiters parked on a room, one POST: latency from just before the POST is written until
            each waiter has its complete response (p50/p99/max), median over several rounds.
    fanout  N parked waiters, one POST: time until all N are answered, the POST's own response time,
            server CPU per woken waiter, RSS per parked waiter; then all N re-park and leave at once
            (abortive close) and we time a new GET /healthz and the return of /stats
            `connections`/`threads_busy` to their starting values.
    idle    N waiters parked with nothing posted: server CPU over the window.
    post    Memory and database file side by side, a fresh server each: 1/16/64 keep-alive clients
            posting as fast as answered (req/s, p99 and max latency, server CPU per post); then on the
            SAME server a fan-out of --post-fanout long polls on another room (parked, one POST answers
            them, all re-poll, all leave at once, /stats connections back to the start), then the
            same rows again, "after N fan-out". Targets compare file with memory, and "after" with
            fresh, within the run.
    order   4 posters and 4 long-polling followers at once: every follower must see every message
            exactly once, in id order.
    stream  Server-Sent Events (GET with Accept: text/event-stream). (a) N streams open on one room,
            one POST: time until every stream has the event, the POST's own answer, server CPU per
            delivered event, RSS per stream against RSS per parked long poll (from this run's idle or
            fanout result of the same size, else measured on a fresh server). (b) M streams, a paced
            poster (--stream-rate posts/s on its own keep-alive connection) for a few seconds:
            delivered events/s, delay from each post being sent to each stream receiving it (p50/p99/
            max). (c) During (b), some streams are closed from our side mid-run and reopened with
            Last-Event-ID = the last id each received: at the end every stream must have every
            posted id exactly once, in order. Also reports /stats `streams_cut`.
    shards  The README's "More than one core" deployment, measured: its ```nginx block
            `# /etc/nginx/conf.d/chat-shards.conf` and its shard command lines are read from ../README.md
            and changed only as the tests change them (ports, file paths, a throwaway `openssl req -x509`
            certificate; the block stays `listen ... ssl`, so the load generator speaks TLS, verifying
            the certificate). Run twice: 1 shard (the same block with the upstream's second `server`
            line deleted) and 2 shards, each shard with its own database file, as the README runs them.
            Each run: --shard-clients keep-alive clients post through nginx as fast as answered,
            client i to room i % 8 (the 2-shard run picks 8 room names that split 4 + 4: the hash
            covers the shards' random ports, so fixed names would split by luck), for --shard-seconds:
            posts/s, p50/p99/max, each process's CPU from /proc (shards, nginx master and workers,
            this load generator, irq/softirq, and what other processes took: the machine is shared),
            CPU per post; the 2-shard run adds the ratio 2 shards / 1 shard. Each room's posts must
            all reach one shard: every shard's /stats `posts` (read through the block's
            /shards/<port>/stats location) must rise by exactly the posts of the rooms homed on it.
            Then --shard-waiters long polls, spread over the 8 rooms (so over both shards), and one
            POST to each room at once: time until all are answered (per shard too).
            Pinning on 2 CPUs: 1 shard on the first, nginx and the load generator on the second;
            2 shards one on each CPU, nginx and the load generator unpinned (they compete with the
            shards: that is what 2 cores give). On 4 or more CPUs nginx and the load generator get
            CPUs of their own in both runs. A row says "skipped" without README.md, nginx or openssl.
    adversarial  Issue 19's hostile mixes; only with --only adversarial (the default run and --quick leave it
            out). Each part on a fresh server (--db :memory:, or --adversarial-db file for a database file,
            where a burst lands in group commits). Cursors are fabricated: one post to room adv (id A), one to
            room other, one to a third room (id L); ids spaced evenly strictly between A and L are valid
            positions in adv, after its newest message, so every client waits, each on a distinct cursor, and
            every later adv post is news to all of them. A burst is 64 posts of 10,000 '"' (text/plain: the
            body limit counts the request's bytes; the stored JSON is ~20 KB), one per keep-alive connection
            opened beforehand, all but its last byte sent first, then the 64 last bytes at once (with a file,
            just after a post to a third room, whose commit the burst queues behind). "Non-reading" clients set
            SO_RCVBUF 4096 before connecting and are never read once parked. The server's RSS is sampled every
            50 ms and its peak taken from /proc VmHWM; past 10 GiB (ADV_RSS_ABORT_MIB) it is killed and the run
            says "aborted". (a) polls: N non-reading long polls on adv, each on its own (after, limit) pair
            (limit 1..1000 cycling), and one reading poll on room other; the burst, and right after it one post
            to other: RSS before the burst and peak (until --adversarial-hold s after the burst), the other
            room's wake-up (its post sent -> its poll's answer; "not within 60 s"), server CPU. (b) streams:
            the same with M non-reading event streams on adv, each with its own Last-Event-ID. (c) order: K
            reading event streams (half of them slow readers: SO_RCVBUF 4096) and K reading long-poll followers
            on adv (distinct cursors; followers with distinct limits), plus K non-reading polls and K non-
            reading streams; several bursts, each with posts to 4 other rooms at the same time; at the end
            every reader must have every adv id exactly once, in id order (duplicates, reorderings, lost are
            counted per kind). A stream the server ends reconnects with Last-Event-ID = its last id (the
            contract): counted as cuts, not errors. Targets: peak RSS within the README's bound
            (README_RSS_BOUND_MIB), the other room's wake-up <= 100 ms, no duplicates, reorderings or losses.

    identity  Issue 21; only with --only identity. One server with --jwt-secret-file (a random 32-byte
            secret) and --token, and one with the same secret and --anonymous-rooms anon (with --token
            set, anonymous requests get 401 in every room), both --db :memory:. (a) --identity-clients (16) keep-alive
            clients posting as fast as answered, each with its own JWT (made here with hmac, PyJWT's shape;
            verified once, then from the server's cache), with the shared --token, and with none (in the
            anonymous room), --identity-rounds (3) rounds with the order rotated: posts/s, p99, server CPU
            per post; target: the JWT costs at most 10 us of server CPU per post over the shared token
            (medians). (b) The JWT posters alone, and beside --identity-bad-rate (2000) refused tokens a
            second (GET ?tail=1 with alg none, another secret, expired, not base64url, in turn; 400 distinct;
            paced over 32 other keep-alive connections, one outstanding each, so a request due while all
            32 wait is counted late, not sent), alternating, --identity-rounds each; target: the posters'
            p99 with the refused tokens within +20 % of without (medians); every one must be a 401. A control
            run puts as many GETs with the posters' valid tokens beside them instead (200 each).

    rooms   Issue 22; only with --only rooms. (a) list: one message posted to each of --rooms-count (1000) rooms
            (--max-rooms 2000), then --rooms-requests (2000) GET /rooms?limit=1000 from one keep-alive client, one
            at a time (after --rooms-warmup, 20): p50/p99/max; target p99 <= 5 ms; --db :memory: and a database
            file. (b) scroll: a database file whose one room holds --rooms-messages (100,000) messages, written
            with sqlite3 directly (the server creates the file, schema 3, and stores a template row; the rooms
            table gets the room's count, latest and last_activity); a server on it; page back from the newest
            to the oldest with before= and limit=--rooms-page (100): each page's latency, target each page
            <= 5 ms (how many exceeded it); every message exactly once, in order. (c) presence: --rooms-followers
            (10000) long polls parked on one room, each with its own ?name= (so 10,000 followers, though all
            come from 127.0.0.1); one POST, time until all are answered (median of --rooms-fanout-rounds, 5);
            then --rooms-posters (16) keep-alive clients post to that room as fast as answered for
            --rooms-seconds (3) while every follower polls again as soon as it is answered: posts/s, p99,
            answers/s to the followers. This server against the one before presence (`git show %s:chat_server.py`,
            or --rooms-baseline PATH), a fresh --db :memory: server each, alternating, --rooms-runs (3) each;
            per-run ratios new/old and their median; target: posts/s and fan-out time within 5 %%.

Output: one JSON line per scenario size (post: per row) as it finishes (stdout), then one aligned table
with PASS/MISS against the targets. Progress goes to stderr.
    backup  Issue 23; only with --only backup (it writes a 1 GiB file). (a) Posting at --backup-post-clients (64)
            on the file store, as the post rows do, a fresh server and file each: this server against the
            previous commit's (`git show fceeaa2:chat_server.py`, the last with EXCLUSIVE locking; or
            --backup-baseline PATH), --backup-rounds each, alternating: posts/s, p99, max, and new/old (target
            >= 0.95). (b) A database of --backup-db-mib (1024) MiB built with sqlite3 directly in the temporary
            directory (random base64 bodies, which do not compress; refused unless 3 times its size is free),
            a server on it, --backup-clients (16) posting as fast as answered: alone; while `chat_server.py
            backup` copies it (to the same temporary directory); while Litestream ($CHAT_LITESTREAM, PATH or
            .ci/.venv-litestream; skipped without it) takes its first snapshot to a file replica there, and
            then while it replicates: p50/p99/max of the posts answered in each window (target: max <= 100 ms),
            and Litestream's "database is locked" lines and errors (target 0).

Exit status: 0; 1 if ordering (order, stream, adversarial) found a lost/duplicated/reordered message or any
scenario could not run correctly (exception, wrong status, a waiter never answered, a stream ended
by the server, a failed request through nginx, a room whose posts reached two shards). Missed
targets do not change it.
"""

import argparse
import json
import math
import os
import re
import selectors
import shlex
import shutil
import socket
import ssl
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
RECONNECT_GAP_S = 0.2                   # stream rate: streams we close mid-run are reopened after this

SCENARIOS = ("wake", "fanout", "idle", "post", "order", "stream", "shards", "adversarial", "backup", "identity",
             "edge", "rooms")
# adversarial runs only when named (it is made to break today's server); backup too (it writes a 1 GiB file);
# identity and edge too (edge needs varnishd and tens of thousands of connections); rooms too (it writes
# 100,000 messages and runs 6 servers with 10,000 polls each)
NAMED_ONLY = ("adversarial", "backup", "identity", "edge", "rooms")
DEFAULT_SCENARIOS = tuple(sc for sc in SCENARIOS if sc not in NAMED_ONLY)


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


def build_request(method, path, body=b"", ctype="application/json", host=HOST):
    """One complete HTTP/1.1 keep-alive request as bytes."""
    head = "%s %s HTTP/1.1\r\nHost: %s\r\n" % (method, path, host)
    if method in ("POST", "PUT") or body:
        head += "Content-Type: %s\r\nContent-Length: %d\r\n" % (ctype, len(body))
    return (head + "\r\n").encode("ascii") + body


def post_request(room, text, author="bench", host=HOST):
    """A JSON POST of one message to `room`."""
    body = json.dumps({"body": text, "author": author}).encode("utf-8")
    return build_request("POST", "/rooms/%s/messages" % room, body, host=host)


def poll_request(room, after, timeout, limit=None, host=HOST):
    """A long-poll GET on `room` after cursor `after`."""
    path = "/rooms/%s/messages?after=%s&timeout=%s" % (room, after, timeout)
    if limit:
        path += "&limit=%d" % limit
    return build_request("GET", path, host=host)


def stream_request(room, after=None, last_event_id=None):
    """An event-stream GET on `room`: from Last-Event-ID if given, else after cursor `after`, else from now on."""
    path = "/rooms/%s/messages" % room + ("?after=%s" % after if after else "")
    head = "GET %s HTTP/1.1\r\nHost: %s\r\nAccept: text/event-stream\r\n" % (path, HOST)
    if last_event_id:
        head += "Last-Event-ID: %s\r\n" % last_event_id
    return (head + "\r\n").encode("ascii")


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


def cpu_busy_seconds(cpu):
    """Seconds CPU `cpu` has not been idle (user, system, irq, softirq, and steal: the hypervisor's), or None."""
    try:
        with open("/proc/stat", "rb") as f:
            for line in f:
                if line.startswith(b"cpu%d " % cpu):
                    v = [int(x) for x in line.split()[1:9]]
                    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / float(CLK_TCK)
    except (OSError, ValueError):
        pass
    return None


class Others:
    """Share of the server's CPU taken by other processes (and steal) over a window, in % of the window:
    the machine is shared, and this tells their noise apart from the server's own slowness."""

    def __init__(self, srv):
        self.srv, self.cpu = srv, srv.ctx.server_cpu
        self.t0 = now()
        self.b0 = cpu_busy_seconds(self.cpu) if self.cpu is not None else None
        self.s0 = srv.cpu()

    def pct(self):
        if self.b0 is None or self.s0 is None:
            return None
        b1, s1, t1 = cpu_busy_seconds(self.cpu), self.srv.cpu(), now()
        if b1 is None or s1 is None or t1 - self.t0 < 0.1:  # /proc counts in 10 ms ticks
            return None
        return rnd(min(100.0, max(0.0, (b1 - self.b0) - (s1 - self.s0)) / (t1 - self.t0) * 100.0), 1)


def self_cpu():
    """CPU seconds used by this process (the load generator)."""
    t = os.times()
    return t[0] + t[1]


def proc_rss_kib(pid, field=b"VmRSS:"):
    """VmRSS in KiB (or another /proc/PID/status field: b"VmHWM:", the peak RSS), or None where /proc is missing."""
    try:
        with open("/proc/%d/status" % pid, "rb") as f:
            for line in f:
                if line.startswith(field):
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


def terminate(p, what):
    """SIGTERM the process we started, then SIGKILL it if it has not exited after SERVER_STOP_TIMEOUT_S."""
    if p.poll() is not None:
        return
    try:
        p.terminate()
        p.wait(SERVER_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        log("%s pid %d ignored SIGTERM for %.0f s: killing it" % (what, p.pid, SERVER_STOP_TIMEOUT_S))
        p.kill()
        p.wait(5)


class Server:
    """One chat_server.py child process; stopped only by its own PID."""

    count = 0

    def __init__(self, ctx, db=":memory:", args=None, cpus="server"):
        self.ctx = ctx
        self.db = db
        self.args = args        # the server's flags instead of the bench's own (shards: the README's)
        self.cpus = ctx.server_cpu if cpus == "server" else cpus    # taskset -c list, or None
        self.path = ctx.server_path     # another chat_server.py to compare with (backup: the previous commit's)
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
        if self.args is not None:
            cmd = [sys.executable, self.path] + list(self.args)
        else:
            cmd = [sys.executable, self.path, "--host", HOST, "--port", "0", "--quiet",
                   "--db", self.db, "--max-waiters", str(ctx.max_waiters),
                   "--max-connections", str(ctx.max_connections), "--max-timeout", "300",
                   "--allow-host", HOST]    # the load generator's requests say "Host: 127.0.0.1", without the port
        if self.cpus is not None:
            cmd = ["taskset", "-c", str(self.cpus)] + cmd   # exec: same PID, threads inherit
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

    def others(self):
        """Start measuring what other processes take of this server's CPU (Others.pct() to read it)."""
        return Others(self)

    def stop(self):
        """SIGTERM, then SIGKILL after a timeout; returns the exit status."""
        p = self.proc
        if p is None:
            return None
        terminate(p, "server")
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

    def __init__(self, port, timeout=CTL_TIMEOUT_S, tls=None, host=HOST):
        self.port = port
        self.timeout = timeout
        self.tls = tls              # (ssl.SSLContext, server name) to speak TLS (to nginx), or None
        self.host = host            # the Host header of get_json/stats/post
        self.sock = None
        self.buf = b""
        self.last_head = b""

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
                if self.tls is not None:
                    try:
                        self.sock = self.tls[0].wrap_socket(self.sock, server_hostname=self.tls[1])
                    except Exception:
                        self.close()
                        raise
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
                self.last_head = head
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
        status, body = self.request(build_request("GET", path, host=self.host), timeout)
        return status, json.loads(body.decode("utf-8")) if body else None

    def stats(self):
        status, obj = self.get_json("/stats")
        if status != 200 or not isinstance(obj, dict):
            raise ProtocolError("GET /stats answered %s" % status)
        return obj

    def post(self, room, text):
        """POST one message, return its id."""
        status, body = self.request(post_request(room, text, host=self.host))
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
    AGAIN = (BlockingIOError, InterruptedError)     # "not now": TLSConn adds SSLWantRead/WriteError

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
        except self.AGAIN:
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
        except self.AGAIN:
            return
        except OSError:
            self.fail()
            return
        self.out = self.out[n:]
        if not self.out:
            self.loop.sel.modify(self.sock, selectors.EVENT_READ, self)

    def receive(self):
        """Bytes read now, b"" when the connection has ended, None when there are none yet."""
        try:
            return self.sock.recv(262144)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return b""

    def on_read(self):
        data = self.receive()
        if data is None:
            return
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
            self.on_head(head)
            self.on_resp(self, status, body, now())
            if self.dead:
                return
        self.buf = buf

    def on_head(self, head):
        """Called with each response's head before on_resp (TLSConn watches for Connection: close)."""

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


class StreamConn(Conn):
    """A client of one event stream: a GET with Accept: text/event-stream, answered by a close-delimited
    200 text/event-stream (no Content-Length): a `retry: N` block, then `id: <id>\ndata: <json>\n\n` per
    message, `:` comment lines (heartbeats), perhaps `event: reset` blocks.

    Calls on_resp(conn, mid, t) with mid = b"" once the head has arrived, the id (bytes) of each message
    event, and None once when the stream ends other than by our close() (conn.ended_by says how).
    pending stays 1 while the stream is open, so outstanding() counts open streams.
    """

    __slots__ = ("status", "t_head", "last_id", "events", "heartbeats", "resets", "retry", "junk", "ended_by")

    def __init__(self, sock, loop, on_resp, tag=None):
        Conn.__init__(self, sock, loop, on_resp, tag)
        self.status = self.t_head = self.last_id = self.retry = self.ended_by = None
        self.events = self.heartbeats = self.resets = self.junk = 0

    def on_read(self):
        data = self.receive()
        if data is None:
            return
        if not data:
            self.end("closed by the server" if self.t_head is not None else "closed before the head")
            return
        buf = self.buf + data if self.buf else data
        if self.t_head is None:
            i = buf.find(b"\r\n\r\n")
            if i < 0:
                self.buf = buf
                if len(buf) > 65536:
                    self.end("no end of head in 64 KiB")
                return
            head = buf[:i]
            low = head.lower()
            try:
                self.status = int(head[9:12])
            except ValueError:
                self.end("bad status line %r" % head[:40])
                return
            if self.status != 200:
                self.end("answered %s: %r" % (self.status, buf[i + 4:i + 124]))
                return
            if b"content-type: text/event-stream" not in low or b"content-length:" in low:
                self.end("200 but not a close-delimited text/event-stream: %r" % head[:300])
                return
            self.t_head = now()
            buf = buf[i + 4:]
            self.on_resp(self, b"", self.t_head)
            if self.dead:
                return
        blocks = buf.split(b"\n\n")
        self.buf = blocks.pop()
        t = now()
        if blocks and self.retry is None and not blocks[0].startswith(b"retry: "):
            self.retry = "missing"                  # the stream must start with its retry block
            self.junk += 1
        for b in blocks:
            if b.startswith(b"id: "):
                j = b.find(b"\n")
                if j < 0 or not b.startswith(b"data: ", j + 1):
                    self.junk += 1
                    continue
                mid = b[4:j]
                self.last_id = mid
                self.events += 1
                self.on_resp(self, mid, t)
                if self.dead:
                    return
            elif b.startswith(b":"):
                self.heartbeats += 1
            elif b.startswith(b"retry: "):
                self.retry = int(b[7:]) if b[7:].isdigit() else b[7:]
            elif b.startswith(b"event: reset"):
                self.resets += 1
                if self.resets <= 3:
                    log("stream %s: reset event %r" % (self.tag, b[:200]))
            else:
                self.junk += 1

    def fail(self):
        self.end("connection error")

    def end(self, reason):
        """The stream ended without our close(): record why, close, tell on_resp (mid None)."""
        if self.dead:
            return
        self.dead = True
        self.pending = 0
        self.ended_by = reason
        self.loop.forget(self)
        try:
            self.sock.close()
        except OSError:
            pass
        self.on_resp(self, None, now())


class TLSConn(Conn):
    """A Conn over TLS (the shards scenario speaks to nginx's `listen ... ssl`): made by Loop.connect_tls
    with do_handshake_on_connect=False; the handshake is driven by the loop's read/write events, and
    requests sent before it completes wait in `out`. Afterwards the same keep-alive framing as Conn, with
    ssl.SSLWantReadError/SSLWantWriteError as "not now". `closing` is set when a response says
    "Connection: close" (nginx's keepalive_requests): the caller opens a new connection.
    """

    __slots__ = ("hs", "closing")
    AGAIN = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)

    def __init__(self, sock, loop, on_resp, tag=None):
        Conn.__init__(self, sock, loop, on_resp, tag)
        self.hs = True
        self.closing = False

    def handshake(self):
        """One step of the non-blocking handshake; at its end, write what was queued."""
        if self.dead:
            return
        try:
            self.sock.do_handshake()
        except ssl.SSLWantReadError:
            self.loop.sel.modify(self.sock, selectors.EVENT_READ, self)
            return
        except ssl.SSLWantWriteError:
            self.loop.sel.modify(self.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, self)
            return
        except (OSError, ValueError) as e:                 # ssl.SSLError (certificate, protocol), reset, ...
            self.loop.tls_errors += 1
            if self.loop.tls_errors <= 3:
                log("TLS handshake failed: %s: %s" % (type(e).__name__, e))
            self.fail()
            return
        self.hs = False
        if self.out:
            self.loop.sel.modify(self.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, self)
            self.on_write()
        else:
            self.loop.sel.modify(self.sock, selectors.EVENT_READ, self)

    def send(self, data):
        if self.hs and not self.dead:                       # queued until the handshake is done
            self.t_sent = now()
            self.pending += 1
            self.out += data
            return True
        return Conn.send(self, data)

    def on_write(self):
        if self.hs:
            self.handshake()
        else:
            Conn.on_write(self)

    def receive(self):
        """Every decrypted byte available now (a TLS record at a time, until the next one is incomplete:
        what OpenSSL holds is invisible to select), b"" at the end, None if none yet."""
        chunks = []
        while True:
            try:
                data = self.sock.recv(262144)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError, InterruptedError):
                break
            except OSError:                                 # SSLZeroReturnError, SSLError, reset
                data = b""
            if not data:
                if chunks:
                    break                                   # the end shows again on the next read event
                return b""
            chunks.append(data)
        return b"".join(chunks) if chunks else None

    def on_read(self):
        if self.hs:
            self.handshake()
        else:
            Conn.on_read(self)

    def on_head(self, head):
        if b"onnection: close" in head:                    # nginx's keepalive_requests reached
            self.closing = True


class Loop:
    """A selector and the loop that drives every Conn registered on it."""

    def __init__(self, rcvbuf=None):
        self.sel = selectors.DefaultSelector()
        self.dropped = 0        # connections the server closed with a request outstanding
        self.tls_errors = 0     # TLS handshakes that failed (TLSConn)
        self.rcvbuf = rcvbuf    # SO_RCVBUF set before each connect (a small window: clients that do not read)

    def connect(self, port, on_resp, tag=None, timeout=5.0, cls=None, rcvbuf=None):
        """A new connected Conn, or `cls` (StreamConn), (blocking connect with a timeout, then non-blocking);
        SO_RCVBUF `rcvbuf`, else the loop's, if set."""
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if rcvbuf or self.rcvbuf:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf or self.rcvbuf)
            s.settimeout(timeout)
            s.connect((HOST, port))
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ABORT)
            s.setblocking(False)
        except OSError:
            s.close()
            raise
        return (cls or Conn)(s, self, on_resp, tag)

    def connect_tls(self, port, tls, on_resp, tag=None, timeout=5.0):
        """A new TLSConn: blocking TCP connect (loopback) with a timeout, then a non-blocking TLS handshake
        driven by the loop (requests sent meanwhile wait for it). tls is (ssl.SSLContext, server name)."""
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.settimeout(timeout)
            s.connect((HOST, port))
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ABORT)
            s.setblocking(False)
            t = tls[0].wrap_socket(s, server_hostname=tls[1], do_handshake_on_connect=False)
        except (OSError, ValueError):
            s.close()
            raise
        c = TLSConn(t, self, on_resp, tag)
        c.handshake()
        return c

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
    """Open n keep-alive clients in batches, each sending `request` (or request(i), if it is a function of the
    client's index); wait until /stats shows them parked.

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
            c.send(request(len(conns)) if callable(request) else request)
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
        # The poster's connection must be counted before `base` is taken, or the
        # return to `base` after the mass leave can never be seen.
        _, base = wait_stats(ctl, lambda x: x.get("connections", 0) >= 2, 5.0)
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
    st = State(t_start=0.0, t_end=0.0, lat=[], bad=0, done=0, ok=0)

    def on_resp(c, status, body, t):
        if status != 201:
            st.bad += 1
            if st.bad <= 3:
                log("POST answered %s %r" % (status, body[:120]))
        else:
            st.ok += 1
            if st.t_start <= t <= st.t_end:
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
    return {"requests": len(lat), "answered": st.ok, "rps": round(len(lat) / seconds, 1),
            "p50_ms": ms(percentile(lat, 50)), "p99_ms": ms(percentile(lat, 99)),
            "max_ms": ms(lat[-1]) if lat else None, "errors": st.bad + (clients - st.done)}


def post_row(ctx, srv, db_kind, phase, clients):
    """One posting row on a running server: req/s, latency, server CPU per post."""
    others = srv.others()
    cpu0, t0, me0 = srv.cpu(), now(), self_cpu()
    r = post_run(srv.port, clients, ctx.post_seconds, ctx.post_warmup)
    cpu1, t1, me1 = srv.cpu(), now(), self_cpu()
    res = {"scenario": "post", "db": db_kind, "phase": phase, "clients": clients, "seconds": ctx.post_seconds}
    if phase == "after":
        res["fanout_waiters"] = ctx.post_fanout
    res.update(r)
    if cpu0 is not None and r["answered"]:
        res["server_cpu_pct"] = rnd((cpu1 - cpu0) / (t1 - t0) * 100.0, 1)
        # Over the whole run (warm-up included), divided by every post answered in it.
        res["server_us_per_post"] = rnd((cpu1 - cpu0) / r["answered"] * 1e6, 1)
    res["bench_cpu_pct"] = rnd((me1 - me0) / (t1 - t0) * 100.0, 1)
    res["others_cpu_pct"] = others.pct()
    return res


def wait_stats(ctl, pred, bound):
    """Poll /stats until pred(stats) or `bound` s; returns (seconds taken or None, last stats)."""
    t0 = now()
    st = {}
    while True:
        try:
            st = ctl.stats()
        except (OSError, EOFError, ProtocolError, ValueError):
            st = {}
        if st and pred(st):
            return now() - t0, st
        if now() - t0 >= bound:
            return None, st
        time.sleep(0.02)


def post_fanout(ctx, srv, db_kind):
    """On a posting server: park N long polls on another room, one POST answers them all, every client
    re-polls at once and then all leave at once (abortive close), as in the fanout scenario; wait until
    /stats connections is back to where it started."""
    n = ctx.post_fanout
    ctl = Ctl(srv.port)
    loop = Loop()
    res = {"scenario": "post", "db": db_kind, "phase": "fanout", "waiters": n}
    errors = 0
    try:
        room = "post-fanout"
        cursor = ctl.post(room, "start")
        st, on_wait, on_post = fanout_callbacks()
        poster = loop.connect(srv.port, on_post)
        # The start to come back to includes the poster, which stays: wait until the server
        # has counted its connection (accepted on the server's own time), or the end never matches.
        _, base = wait_stats(ctl, lambda x: x.get("connections", 0) >= 2, 5.0)
        t_park = now()
        conns, cerr, ok = park(ctx, srv.port, ctl, loop, n, poll_request(room, cursor, LONG_POLL_S), on_wait, st,
                               timeout=ctx.park_timeout)
        res["park_s"] = rnd(now() - t_park)
        res["parked"] = ctl.stats().get("waiters", 0) - base.get("waiters", 0)
        res["park_errors"] = cerr + st.early
        errors += cerr + (0 if ok else 1)
        live = [c for c in conns if not c.dead and c.pending > 0]
        others = srv.others()
        st.t0 = now()
        poster.send(post_request(room, "fan-out"))
        loop.run(lambda: st.got >= len(live) and st.post_t is not None, ctx.fanout_bound)
        res["others_cpu_pct"] = others.pct()
        lat = sorted(st.lat)
        res["answered"] = len(lat)
        res["all_ms"] = ms(lat[-1]) if lat and len(lat) == n else None
        res["post_ms"] = ms(st.post_t - st.t0) if st.post_t else None
        errors += len(live) - len(lat)
        if st.post_status != 201:
            raise ProtocolError("POST answered %s" % st.post_status)
        cursor = json.loads(st.post_body.decode("utf-8"))["id"]
        st.t0 = None                                        # from here on an answer is early, and bad
        live = [c for c in live if not c.dead]
        req = poll_request(room, cursor, LONG_POLL_S)
        t_repark = now()
        for c in live:
            c.send(req)
        try:
            ok, _ = wait_parked(ctl, loop, lambda: base.get("waiters", 0) + outstanding(live), ctx.repark_bound)
        except (OSError, EOFError):
            ok = False
        res["repark_s"] = rnd(now() - t_repark) if ok else None
        if not ok:
            log("post fan-out (%s): clients did not all re-park; leaving anyway" % db_kind)
            errors += 1
        t_leave = now()
        rec = mass_leave(ctx, srv, ctl, loop, (poster,), base)
        res["leave_healthz_ms"] = rec["healthz_ms"]
        res["leave_sockets_back_s"] = rec["sockets_back_s"]
        back, sa = wait_stats(ctl, lambda x: x.get("connections", 1 << 30) <= base.get("connections", 0),
                              max(0.5, ctx.recovery_bound - (now() - t_leave)))
        res["connections_back_s"] = rnd(now() - t_leave) if back is not None else None
        if back is None:
            log("post fan-out (%s): /stats connections %s, not back to %s" %
                (db_kind, sa.get("connections"), base.get("connections")))
            errors += 1
        res["after"] = {k: sa.get(k) for k in ("connections", "threads", "threads_busy", "waiters")}
        res["rss_after_kib"] = srv.rss()
        res["dropped_by_server"] = loop.dropped
        errors += st.bad
    finally:
        loop.close_all()
        ctl.close()
    res["errors"] = errors
    return res


def guarded(base, fn, *args):
    """fn(*args), or `base` with the exception it raised (reported, not raised)."""
    t = now()
    try:
        r = fn(*args)
    except Exception as e:
        r = dict(base)
        r["exception"] = "%s: %s (%s)" % (type(e).__name__, e, where(e))
        log("%s failed: %s" % (size_label(base), r["exception"]))
    r["elapsed_s"] = rnd(now() - t, 2)
    return r


def scenario_post(ctx):
    """Posting, memory and file database side by side; yields one result per row.

    A fresh server per database; the fresh rows alternate between the two servers (same client count
    next to each other in time); then, per server, a fan-out of N long polls on another room and the
    same rows again on that same server ("after").
    """
    servers = {}
    try:
        for db_kind in ctx.post_dbs:
            db = ":memory:" if db_kind == "memory" else os.path.join(ctx.tmpdir, "bench-%d.db" % (Server.count + 1))
            try:
                srv = start_server(ctx, db)
            except ServerStartError as e:
                yield {"scenario": "post", "db": db_kind, "phase": "fresh", "clients": 0,
                       "skipped": "server did not start: %s" % e}
                continue
            servers[db_kind] = srv
            ctl = Ctl(srv.port)
            try:
                ctl.post("post", "start")
            except (OSError, EOFError, ProtocolError) as e:
                del servers[db_kind]
                srv.stop()
                yield {"scenario": "post", "db": db_kind, "phase": "fresh", "clients": 0,
                       "exception": "first POST failed: %s: %s" % (type(e).__name__, e)}
            finally:
                ctl.close()
        log("post: %s, clients %s, %.1f s each" % (" and ".join(servers), ctx.post_clients, ctx.post_seconds))
        for c in ctx.post_clients:
            for db_kind, srv in servers.items():
                yield guarded({"scenario": "post", "db": db_kind, "phase": "fresh", "clients": c},
                              post_row, ctx, srv, db_kind, "fresh", c)
        for db_kind in list(servers):
            srv = servers[db_kind]
            log("post: %s, fan-out of %d long polls on the same server, then the rows again" %
                (db_kind, ctx.post_fanout))
            yield guarded({"scenario": "post", "db": db_kind, "phase": "fanout", "waiters": ctx.post_fanout},
                          post_fanout, ctx, srv, db_kind)
            for c in ctx.post_clients:
                yield guarded({"scenario": "post", "db": db_kind, "phase": "after", "clients": c,
                               "fanout_waiters": ctx.post_fanout}, post_row, ctx, srv, db_kind, "after", c)
            del servers[db_kind]
            rc = srv.stop()
            if rc not in (0, None):
                log("post server (%s) exited with status %s" % (db_kind, rc))
    finally:
        for srv in servers.values():
            srv.stop()


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


def parked_poll_rss(ctx, n):
    """RSS KiB per parked long poll at size n, for comparison with a stream: from this run's idle or
    fanout result of the same size if there is one, else measured on a fresh server. (value, where from)."""
    for sc in ("idle", "fanout"):
        for r in ctx.results:
            if r.get("scenario") == sc and r.get("waiters") == n and r.get("rss_kib_per_waiter") is not None:
                return r["rss_kib_per_waiter"], "%s scenario, %d waiters, this run" % (sc, n)
    log("stream: RSS per parked long poll at %d, for comparison (no idle/fanout result of that size)" % n)
    srv = start_server(ctx)
    ctl = Ctl(srv.port)
    loop = Loop()
    try:
        cursor = ctl.post("polls", "start")
        st = State(early=0)

        def on_wait(c, status, body, t):
            st.early += 1

        rss0 = srv.rss()
        conns, cerr, ok = park(ctx, srv.port, ctl, loop, n, poll_request("polls", cursor, LONG_POLL_S), on_wait, st,
                               timeout=ctx.park_timeout)
        loop.run(None, 0.2)
        rss1 = srv.rss()
        if not ok or cerr or st.early or outstanding(conns) != n:
            raise ProtocolError("parked-poll RSS: only %d of %d polls parked" % (outstanding(conns), n))
        if rss0 is None or rss1 is None:
            return None, "no /proc"
        return rnd((rss1 - rss0) / float(n), 2), "measured here: %d polls parked on a fresh server" % n
    finally:
        loop.close_all()
        ctl.close()
        srv.stop()


def scenario_stream_fanout(ctx, n):
    """N event streams open on one room, one POST: time until every stream has the event, the POST's own
    answer, server CPU per delivered event, RSS per stream against RSS per parked long poll."""
    res = {"scenario": "stream", "part": "fanout", "streams": n}
    res["poll_rss_kib_per_waiter"], res["poll_rss_from"] = parked_poll_rss(ctx, n)
    srv = start_server(ctx)
    ctl = Ctl(srv.port)
    loop = Loop()
    errors = 0
    try:
        room = "stream"
        cursor = ctl.post(room, "start")
        st = State(early=0, t0=None, got=0, lat=[], heads=0, ended=0, post_t=None, post_status=None, post_body=None)

        def on_event(c, mid, t):
            if mid is None:
                st.ended += 1
                if st.ended <= 3:
                    log("stream %s ended: %s" % (c.tag, c.ended_by))
            elif not mid:
                st.heads += 1
            elif st.t0 is None:
                st.early += 1
                if st.early <= 3:
                    log("stream %s: event %r before the POST" % (c.tag, mid))
            else:
                st.got += 1
                if c.events == 1:
                    st.lat.append(t - st.t0)

        def on_post(c, status, body, t):
            st.post_t, st.post_status, st.post_body = t, status, body

        poster = loop.connect(srv.port, on_post)
        base = ctl.stats()
        rss0 = srv.rss()
        t_open = now()
        conns, cerr, ok = park(ctx, srv.port, ctl, loop, n, stream_request(room, after=cursor), on_event, st,
                               timeout=ctx.park_timeout, key="streams", cls=StreamConn)
        errors += cerr + (0 if ok else 1)
        loop.run(lambda: st.heads + st.ended >= len(conns), 10.0)
        res["open_s"] = rnd(now() - t_open)
        loop.run(None, 0.2)                                 # each stream goes live just after its head
        sp = ctl.stats()
        rss1 = srv.rss()
        res["opened"] = sp.get("streams", 0) - base.get("streams", 0)
        res["heads"] = st.heads
        res["open_errors"] = cerr + st.ended + st.early
        if rss0 is not None and rss1 is not None:
            res["rss_before_kib"], res["rss_open_kib"] = rss0, rss1
            res["rss_kib_per_stream"] = rnd((rss1 - rss0) / float(max(1, n)), 2)
        live = [c for c in conns if not c.dead and c.t_head is not None]
        others = srv.others()
        cpu0, me0, ev0, cut0 = srv.cpu(), self_cpu(), sp.get("stream_events", 0), sp.get("streams_cut", 0)
        ended0 = st.ended
        st.t0 = now()
        poster.send(post_request(room, "stream fan-out"))
        loop.run(lambda: st.got + st.ended - ended0 >= len(live) and st.post_t is not None, ctx.fanout_bound)
        t_end = now()
        cpu_last = srv.cpu()
        res["others_cpu_pct"] = others.pct()
        res["bench_cpu_s"] = rnd(self_cpu() - me0)
        cpu1 = settle_cpu(srv)
        loop.run(None, 0.1)                                 # anything more would be a duplicate
        lat = sorted(st.lat)
        res["delivered"] = len(lat)
        res["all_ms"] = ms(lat[-1]) if lat and len(lat) == n else None
        res["first_ms"] = ms(lat[0]) if lat else None
        res["p50_ms"] = ms(percentile(lat, 50))
        res["p99_ms"] = ms(percentile(lat, 99))
        res["post_ms"] = ms(st.post_t - st.t0) if st.post_t else None
        res["duplicated"] = sum(c.events - 1 for c in live if c.events > 1)
        if len(lat) < len(live):
            log("stream fan-out: only %d of %d streams had the event within %.1f s" %
                (len(lat), len(live), t_end - st.t0))
        if cpu0 is not None and lat:
            res["cpu_s"] = rnd(cpu1 - cpu0)
            res["cpu_us_per_event_delivered"] = rnd((cpu_last - cpu0) / float(len(lat)) * 1e6, 1)
            res["cpu_us_per_event"] = rnd((cpu1 - cpu0) / float(len(lat)) * 1e6, 1)
        if st.post_status != 201:
            raise ProtocolError("POST answered %s" % st.post_status)
        sp = ctl.stats()
        res["stream_events"] = sp.get("stream_events", 0) - ev0
        res["streams_cut"] = sp.get("streams_cut", 0) - cut0
        res["streams_open_after"] = sp.get("streams", 0) - base.get("streams", 0)
        res["ended_by_server"] = st.ended
        res["heartbeats"] = sum(c.heartbeats for c in conns)
        res["resets"] = sum(c.resets for c in conns)
        res["junk_blocks"] = sum(c.junk for c in conns)
        errors += (len(live) - len(lat)) + res["duplicated"] + st.ended + st.early + res["resets"] + res["junk_blocks"]
    finally:
        loop.close_all()
        ctl.close()
        res["server_exit"] = srv.stop()
    res["errors"] = errors
    return res


def scenario_stream_rate(ctx, n, rate, seconds, reconnects):
    """N streams on one room, a paced poster (`rate` posts/s for `seconds` s, its own keep-alive connection):
    delivered events/s, delay from each post being sent to each stream receiving it; mid-run `reconnects`
    streams are closed from our side and reopened with Last-Event-ID, and at the end every stream must
    have every posted id exactly once, in order."""
    total = max(1, int(round(rate * seconds)))
    interval = 1.0 / rate
    reconnects = max(0, min(reconnects, n))
    res = {"scenario": "stream", "part": "rate", "streams": n, "rate": rate, "seconds": seconds,
           "reconnects": reconnects}
    srv = start_server(ctx)
    ctl = Ctl(srv.port)
    loop = Loop()
    errors = 0
    try:
        room = "rate"
        cursor = ctl.post(room, "start")
        seqs = [[] for _ in range(n)]                       # ids each stream received, over its connections
        st = State(heads=0, ended=0, early=0, foreign=0, posted=[], sent_at={}, inflight=None, post_lat=[],
                   post_bad=0, sent=0, late=0, t0=None, delays=[], catchup=0, catchup_max=0.0, t_last=None,
                   reopen=[], server_reopened=0, stop_posting=False)
        streams = [None] * n

        def on_event(c, mid, t):
            if mid:
                ts = st.sent_at.get(mid)
                if ts is None:
                    ts = st.inflight                        # posts go one at a time: the one in flight
                    if ts is None:
                        st.foreign += 1
                        if st.foreign <= 3:
                            log("stream %s: unexpected id %r" % (c.tag, mid))
                        seqs[c.tag].append(mid)
                        return
                else:
                    mid = st.canon[mid]                     # share one bytes object per id
                seqs[c.tag].append(mid)
                st.t_last = t
                if ts >= c.t_sent:
                    st.delays.append(t - ts)
                else:                                       # posted before this connection: catch-up
                    st.catchup += 1
                    st.catchup_max = max(st.catchup_max, t - ts)
            elif mid is None:
                st.ended += 1
                if st.ended <= 3:
                    log("stream %s ended: %s" % (c.tag, c.ended_by))
                if st.t0 is not None and st.ended <= 3 * n:    # a client reconnects, from its last id
                    st.reopen.append(c.tag)
            else:
                st.heads += 1

        def open_stream(i):
            last = seqs[i][-1] if seqs[i] else None
            c = loop.connect(srv.port, on_event, tag=i, cls=StreamConn)
            c.send(stream_request(room, after=None if last else cursor,
                                  last_event_id=last.decode("ascii") if last else None))
            streams[i] = c
            return c

        def on_post(c, status, body, t):
            st.post_lat.append(t - c.t_sent)
            if status == 201:
                mid = json.loads(body.decode("utf-8"))["id"].encode("ascii")
                st.sent_at[mid] = c.t_sent
                st.canon[mid] = mid
                st.posted.append(mid)
            else:
                st.post_bad += 1
                if st.post_bad <= 3:
                    log("rate POST answered %s %r" % (status, body[:120]))
            st.inflight = None
            maybe_post(c, t)

        def maybe_post(c, t):
            if st.sent < total and st.inflight is None and not c.dead and not st.stop_posting \
                    and t >= st.t0 + st.sent * interval:
                if t - (st.t0 + st.sent * interval) > interval:
                    st.late += 1
                c.send(post_request(room, "r%d" % st.sent))
                st.inflight = c.t_sent
                st.sent += 1

        st.canon = {}
        conns, cerr, ok = park(ctx, srv.port, ctl, loop, n, stream_request(room, after=cursor), on_event, st,
                               timeout=ctx.park_timeout, key="streams", cls=StreamConn)
        streams[:len(conns)] = conns
        errors += cerr + (0 if ok else 1)
        loop.run(lambda: st.heads + st.ended >= len(conns), 10.0)
        loop.run(None, 0.2)
        res["opened"] = st.heads
        if st.ended or len(conns) < n:
            raise ProtocolError("only %d of %d streams opened (%d ended)" % (st.heads - st.ended, n, st.ended))
        poster = loop.connect(srv.port, on_post)
        chosen = sorted(set(int(k * n / reconnects) for k in range(reconnects))) if reconnects else []
        sp = ctl.stats()
        cut0, ev0 = sp.get("streams_cut", 0), sp.get("stream_events", 0)
        others = srv.others()
        cpu0, me0 = srv.cpu(), self_cpu()
        st.t0 = now()
        t_mid = st.t0 + seconds / 2.0
        closed_at = reopened_at = None
        cut_closing = 0
        bound = st.t0 + seconds + 10.0
        maybe_post(poster, now())
        while now() < bound:
            t = now()
            maybe_post(poster, t)
            if closed_at is None and t >= t_mid and chosen:
                cut_closing = ctl.stats().get("streams_cut", 0)
                for i in chosen:                            # from our side, mid-run
                    streams[i].close()
                closed_at = now()
            if closed_at is not None and reopened_at is None and t >= closed_at + RECONNECT_GAP_S:
                # Cuts in this window are our own closes, seen by a post's write before the housekeeper.
                cut_closing = ctl.stats().get("streams_cut", 0) - cut_closing
                for i in chosen:
                    open_stream(i)
                reopened_at = now()
            while st.reopen:                                # the server ended one: reconnect at once
                i = st.reopen.pop()
                st.server_reopened += 1
                open_stream(i)
            if st.sent >= total and st.inflight is None and (not chosen or reopened_at is not None):
                break
            due = st.t0 + st.sent * interval
            loop.run(None, max(0.0005, min(due - now(), 0.01)))
        st.stop_posting = True                              # past the bound: the rest are not sent
        if closed_at is not None and reopened_at is None:
            for i in chosen:
                open_stream(i)
            reopened_at = now()
        if st.inflight is not None:                         # the last one's answer, so its id is known
            loop.run(lambda: st.inflight is None, 10.0)
        t_posted = now()
        res["posts_planned"] = total
        res["posts_sent"] = st.sent
        res["posts_late"] = st.late
        last = st.posted[-1] if st.posted else None

        def caught_up():
            while st.reopen:
                i = st.reopen.pop()
                st.server_reopened += 1
                open_stream(i)
            return all(q and q[-1] == last for q in seqs)

        drained = loop.run(caught_up, 10.0) if last else True
        t_end = now()
        cpu1 = settle_cpu(srv)
        me1 = self_cpu()
        res["others_cpu_pct"] = others.pct()
        loop.run(None, 0.1)                                 # anything more would be a duplicate
        sp = ctl.stats()
        res["posted"] = len(st.posted)
        res["post_errors"] = st.post_bad
        res["post_rate"] = rnd(st.sent / max(1e-9, t_posted - st.t0), 1)
        pl = sorted(st.post_lat)
        res["post_p99_ms"], res["post_max_ms"] = ms(percentile(pl, 99)), ms(pl[-1] if pl else None)
        delivered = sum(len(q) for q in seqs)
        res["delivered"] = delivered
        res["expected"] = n * len(st.posted)
        span = (st.t_last - st.t0) if st.t_last else None
        res["events_per_s"] = rnd(delivered / span, 0) if span else None
        res["offered_events_per_s"] = rnd(n * rate, 0)
        d = sorted(st.delays)
        res["delay_p50_ms"], res["delay_p99_ms"] = ms(percentile(d, 50)), ms(percentile(d, 99))
        res["delay_max_ms"] = ms(d[-1] if d else None)
        res["catchup_events"] = st.catchup
        res["catchup_max_ms"] = ms(st.catchup_max) if st.catchup else None
        res["closed_by_us"] = len(chosen) if closed_at is not None else 0
        res["reopened"] = len(chosen) if reopened_at is not None else 0
        res["ended_by_server"] = st.ended
        res["reopened_after_server_end"] = st.server_reopened
        res["streams_cut"] = sp.get("streams_cut", 0) - cut0
        res["streams_cut_while_ours_closed"] = cut_closing if reopened_at is not None else None
        res["streams_cut_other"] = res["streams_cut"] - min(len(chosen), max(0, cut_closing))
        res["stream_events"] = sp.get("stream_events", 0) - ev0
        res["streams_open_after"] = sp.get("streams")
        live = [c for c in streams if c is not None and not c.dead]
        res["heartbeats"] = sum(c.heartbeats for c in live)
        res["resets"] = sum(c.resets for c in live)
        res["junk_blocks"] = sum(c.junk for c in live)
        if cpu0 is not None:
            res["server_cpu_pct"] = rnd((cpu1 - cpu0) / max(1e-9, t_end - st.t0) * 100.0, 1)
            res["cpu_us_per_event"] = rnd((cpu1 - cpu0) / max(1, delivered) * 1e6, 1)
        res["bench_cpu_pct"] = rnd((me1 - me0) / max(1e-9, t_end - st.t0) * 100.0, 1)
        res["drained"] = bool(drained)
        # Lossless: every stream has every posted id exactly once, in order.
        # A missing id before the last one a stream has is lost; after it, not delivered by the end.
        posted = st.posted
        index = {m: k for k, m in enumerate(posted)}
        lost = dup = reordered = foreign = incomplete = undelivered = 0
        for q in seqs:
            if q == posted:
                continue
            incomplete += 1
            s = set(q)
            dup += len(q) - len(s)
            foreign += len(s - set(index))
            reordered += sum(1 for a, b in zip(q, q[1:]) if b <= a)
            reach = max([index[m] for m in s if m in index] or [-1])
            missing = [k for k in range(len(posted)) if posted[k] not in s]
            lost += sum(1 for k in missing if k < reach)
            undelivered += sum(1 for k in missing if k > reach)
        res.update({"lost": lost, "duplicated": dup, "reordered": reordered, "foreign": foreign,
                    "undelivered_at_end": undelivered, "streams_not_exact": incomplete})
        res["ordering_errors"] = lost + dup + reordered + foreign
        if not drained:
            log("stream rate: %d streams without the last id after 10 s" %
                sum(1 for q in seqs if not q or q[-1] != last))
        errors += st.post_bad + st.ended + st.early + res["resets"] + res["junk_blocks"] + res["ordering_errors"]
        errors += undelivered
        if st.sent < total:                                 # slow, not wrong: reported, not an error
            log("stream rate: only %d of %d posts sent within %.0f s" % (st.sent, total, seconds + 10))
    finally:
        loop.close_all()
        ctl.close()
        res["server_exit"] = srv.stop()
    res["errors"] = errors
    return res


# ---------------------------------------------------------------------------------------------------
# adversarial: distinct cursors and limits, clients that do not read, bursts of large posts (issue 19)


ADV_ROOM = "adv"                # the room under attack
ADV_OTHER = "other"             # an unrelated room: its poll must not wait for adv's fan-out
ADV_BURST = 64                  # posts per burst, each on its own keep-alive connection, sent at once
ADV_BODY = b'"' * 10000         # MAX_BODY_BYTES of text/plain; its JSON (each " escaped) is twice as long
ADV_RCVBUF = 4096               # SO_RCVBUF of the clients that never read: their answers cannot drain
# The README's "Memory, worst case" (## Limits): "31 MiB at start + 300 + 84 + 15,000 x 45 KiB
# ~= 1.1 GiB, whatever clients do" (default flags; the bench's --max-connections is lower).
README_RSS_BOUND_MIB = 1.1 * 1024
ADV_RSS_ABORT_MIB = 10 * 1024   # past this the server is killed (SIGKILL, its own PID): the machine has 24 GiB
ADV_WAKE_BOUND_S = 60.0         # the other room's poll: "not within 60 s" after this
ADV_WAKE_TARGET_MS = 100.0      # issue 19: one room's fan-out delays another room's wake-up by at most this
ADV_ID_RE = re.compile(rb'\{"id":"([0-9a-f-]{36})"')      # each message of an answer starts with its id


def adv_post_request(room=ADV_ROOM):
    """One burst post: 10,000 '"' as text/plain (the body limit is the request's bytes, so JSON could not
    carry as many: each '"' escaped is two bytes; the server stores and sends it as JSON, ~20 KB)."""
    return build_request("POST", "/rooms/%s/messages" % room, ADV_BODY, ctype="text/plain; charset=utf-8")


def uuid_int(text):
    return int(text.replace("-", ""), 16)


def uuid_text(value):
    t = "%032x" % value
    return "%s-%s-%s-%s-%s" % (t[:8], t[8:12], t[12:16], t[16:20], t[20:])


def adv_cursors(ctl, n):
    """Seed a fresh server and fabricate n distinct cursors: one post to adv (id A), one to other (its poll's
    cursor), one to a third room (id L, the newest). Ids strictly between A and L are valid positions in adv
    (after its newest, not after the newest issued: no 410, no reset), so a poll or stream on any of them
    waits, and every later adv post is news to all of them. Returns (cursors, other's cursor)."""
    a = uuid_int(ctl.post(ADV_ROOM, "seed"))
    other = ctl.post(ADV_OTHER, "seed")
    b = uuid_int(ctl.post("seed", "the newest id before the burst"))
    step = (b - a) // (n + 1)
    if step < 1:
        raise ProtocolError("ids too close to fabricate %d cursors between them" % n)
    return [uuid_text(a + (k + 1) * step) for k in range(n)], other


class AdvWatch:
    """While a part runs: the server's RSS sampled every few ms (VmRSS; VmHWM is the peak since start), its
    CPU, and the abort past ADV_RSS_ABORT_MIB."""

    def __init__(self, srv, res):
        self.srv, self.res = srv, res
        self.max_kib = 0
        self.aborted = False
        self.cpu0 = srv.cpu()

    def sample(self):
        if self.aborted:
            return False
        kib = self.srv.rss()
        if kib is None:
            return True
        self.max_kib = max(self.max_kib, kib)
        if kib > ADV_RSS_ABORT_MIB * 1024:
            self.res["aborted"] = "server RSS %.0f MiB > %d MiB: killed" % (kib / 1024.0, ADV_RSS_ABORT_MIB)
            self.res["rss_peak_mib"] = rnd(self.peak_kib() / 1024.0, 1)
            log("adversarial: %s" % self.res["aborted"])
            self.res["server_cpu_s"] = rnd(self.srv.cpu() - self.cpu0) if self.cpu0 is not None else None
            self.srv.proc.kill()
            self.srv.proc.wait(10)
            self.aborted = True
            return False
        return True

    def peak_kib(self):
        hwm = proc_rss_kib(self.srv.pid, b"VmHWM:")
        return max(self.max_kib, hwm or 0)

    def run(self, loop, until, bound):
        """Serve `loop` in short slices, sampling, until until() or `bound` s; False if aborted."""
        deadline = now() + bound
        while self.sample():
            if until is not None and until():
                return True
            left = deadline - now()
            if left <= 0:
                return True
            loop.run(None, min(0.05, left))
        return False

    def finish(self):
        if self.aborted:
            return
        self.res["rss_peak_mib"] = rnd(self.peak_kib() / 1024.0, 1)
        self.res["rss_end_mib"] = rnd((self.srv.rss() or 0) / 1024.0, 1)
        if self.cpu0 is not None:
            self.res["server_cpu_s"] = rnd(self.srv.cpu() - self.cpu0)


def adv_burst_conns(loop, port, st):
    """ADV_BURST keep-alive connections for one burst each, connected in advance; answers counted in st."""
    def on_post(c, status, body, t):
        st.burst_answered += 1
        if status == 201:
            st.posted.append(json.loads(body.decode("utf-8"))["id"].encode("ascii"))
            st.burst_max = max(st.burst_max, t - c.t_sent)
        else:
            st.burst_bad += 1
            if st.burst_bad <= 3:
                log("adversarial: burst POST answered %s %r" % (status, body[:120]))
    return [loop.connect(port, on_post) for _ in range(ADV_BURST)]


def scenario_adversarial(ctx, part, n, run_no):
    """Issue 19's adversarial mixes on a fresh server (part polls, streams or order); see the docstring."""
    res = {"scenario": "adversarial", "part": part, "clients": n, "run": run_no, "db": ctx.adv_db}
    srv = start_server(ctx, ":memory:" if ctx.adv_db == "memory" else
                       os.path.join(ctx.tmpdir, "adversarial-%s-%d.db" % (part, run_no)))
    ctl = Ctl(srv.port)
    loop = Loop()                            # clients that read: the other room's poll, posters, followers
    quiet = Loop(rcvbuf=ADV_RCVBUF)          # clients that never read once their request is parked
    errors = 0
    try:
        if part == "order":
            errors += adv_order(ctx, srv, ctl, loop, quiet, n, res)
        else:
            errors += adv_flood(ctx, srv, ctl, loop, quiet, part, n, res)
    finally:
        quiet.close_all()
        loop.close_all()
        ctl.close()
        res["server_exit"] = srv.stop() if srv.proc.poll() is None else srv.proc.returncode
    res["errors"] = errors
    return res


def adv_flood(ctx, srv, ctl, loop, quiet, part, n, res):
    """Parts polls and streams: n non-reading clients on distinct cursors (polls: distinct limits too),
    one reading poll on another room, one burst, then that room's post; RSS, CPU, the other room's wake."""
    errors = 0
    cursors, other_cursor = adv_cursors(ctl, n)
    st = State(early=0, heads=0, ended=0, other_t=None, other_status=None, other_body=None, other_post_t=None,
               other_post_status=None, posted=[], burst_answered=0, burst_bad=0, burst_max=0.0)

    def on_quiet(c, status, body, t):                   # a poll answered before the burst: 503, 400, ...
        st.early += 1
        if st.early <= 3:
            log("adversarial: parked poll answered before the burst: %s %r" % (status, body[:120]))

    def on_quiet_stream(c, mid, t):
        if mid is None:
            st.ended += 1
            if st.ended <= 3:
                log("adversarial: stream %s ended before the burst: %s" % (c.tag, c.ended_by))
        elif not mid:
            st.heads += 1
        else:
            st.early += 1

    def on_other(c, status, body, t):
        st.other_t, st.other_status, st.other_body = t, status, body

    def on_other_post(c, status, body, t):
        st.other_post_t, st.other_post_status = t, status

    other = loop.connect(srv.port, on_other)
    other.send(poll_request(ADV_OTHER, other_cursor, LONG_POLL_S))
    posters = adv_burst_conns(loop, srv.port, st)
    other_poster = loop.connect(srv.port, on_other_post)
    leader = loop.connect(srv.port, lambda c, status, body, t: None)
    ok, _ = wait_parked(ctl, loop, lambda: 1, 10)
    if not ok:
        raise ProtocolError("the other room's poll did not park")
    t_park = now()
    if part == "polls":
        conns, cerr, ok = park(ctx, srv.port, ctl, quiet, n,
                               lambda i: poll_request(ADV_ROOM, cursors[i], LONG_POLL_S, limit=1 + i % 1000),
                               on_quiet, st, timeout=ctx.park_timeout)
        parked = outstanding(conns)
    else:
        conns, cerr, ok = park(ctx, srv.port, ctl, quiet, n,
                               lambda i: stream_request(ADV_ROOM, last_event_id=cursors[i]),
                               on_quiet_stream, st, timeout=ctx.park_timeout, key="streams", cls=StreamConn)
        quiet.run(lambda: st.heads + st.ended >= len(conns), 10.0)     # the head and retry block only
        quiet.run(None, 0.2)                                            # each goes live just after its head
        parked = st.heads - st.ended
    res["park_s"] = rnd(now() - t_park)
    res["parked"] = parked
    res["park_errors"] = cerr + st.early + st.ended
    errors += res["park_errors"] + (0 if ok else 1)
    # Every connection the burst uses is counted before it starts (accepted, its thread waiting).
    wait_stats(ctl, lambda x: x.get("connections", 0) >= parked + ADV_BURST + 4, 10.0)
    ctl.close()                         # /stats during the burst would queue behind it: not asked again
    # Each burst post goes out whole but its last byte, read by its server thread, which then waits for it;
    # the last bytes go together, so the 64 posts are stored as close together as the server can.
    req = adv_post_request()
    for c in posters:
        c.send(req[:-1])
        c.pending -= 1                                  # one request, counted when its last byte goes
    loop.run(None, 0.3)
    res["rss_before_mib"] = rnd((srv.rss() or 0) / 1024.0, 1)
    watch = AdvWatch(srv, res)
    t_burst = now()
    if ctx.adv_db == "file":
        # Another room's post first: its commit is under way when the burst arrives, so the burst queues
        # behind it and lands in one group commit (64 messages visible to adv's first wake at once).
        leader.send(adv_post_request("seed"))
    for c in posters:
        c.send(req[-1:])
    other_poster.send(post_request(ADV_OTHER, "is this room still awake?"))
    t_other = other_poster.t_sent
    res["burst_send_ms"] = ms(t_other - t_burst)
    hold = ctx.adv_hold

    def done():
        t = now()
        return t >= t_burst + hold and st.burst_answered >= ADV_BURST and \
            (st.other_t is not None or t >= t_other + ADV_WAKE_BOUND_S)

    watch.run(loop, done, max(hold, ADV_WAKE_BOUND_S) + 5.0)
    watch.finish()
    if st.other_t is not None and st.other_status == 200 and st.other_body.count(b'"id":') == 1:
        res["other_room_wake_ms"] = ms(st.other_t - t_other)
    elif st.other_t is not None:
        res["other_room_answer"] = "%s %r" % (st.other_status, st.other_body[:120])
        errors += 1
    else:
        res["other_room_wake_ms"] = None
        res["other_room_wake"] = "not within %.0f s" % (now() - t_other) if not watch.aborted else "aborted"
    res["other_post_ms"] = ms(st.other_post_t - t_other) if st.other_post_t else None
    res["burst_answered"] = st.burst_answered
    res["burst_max_ms"] = ms(st.burst_max) if st.posted else None
    if not watch.aborted:
        errors += st.burst_bad + (ADV_BURST - st.burst_answered)
        after = Ctl(srv.port)
        try:
            sp = after.stats()
            res["streams_cut"] = sp.get("streams_cut")
            res["unsent_mib_end"] = rnd(sp.get("unsent_bytes", 0) / 1048576.0, 1)
        except (OSError, EOFError, ProtocolError, ValueError) as e:
            res["stats_after"] = "%s: %s" % (type(e).__name__, e)
        finally:
            after.close()
    return errors


def adv_order(ctx, srv, ctl, loop, quiet, k, res):
    """Part order: k reading streams and k reading long-poll followers on adv, each on a distinct cursor
    (followers with distinct limits), k non-reading polls and k non-reading streams likewise; ctx.adv_bursts
    bursts, each followed by posts to other rooms; every reader must see every adv id once, in id order.
    A stream the server ends reconnects with Last-Event-ID = the last id it received (the contract)."""
    errors = 0
    cursors, _ = adv_cursors(ctl, 4 * k)
    seqs = [[] for _ in range(2 * k)]                   # 0..k-1 streams, k..2k-1 followers
    st = State(heads=0, ended=0, cuts=0, reopen=[], reconnects=0, early=0, bad=0, dropped=0, stop=False,
               posted=[], burst_answered=0, burst_bad=0, burst_max=0.0, others_posted=0, others_bad=0)
    curs = cursors[:2 * k]
    limits = [1 + j % 1000 for j in range(k)]

    def on_event(c, mid, t):
        if mid:
            seqs[c.tag].append(mid)
        elif mid is None:
            st.ended += 1
            if not st.stop:
                st.cuts += 1
                if st.cuts <= 3:
                    log("adversarial order: stream %d ended: %s" % (c.tag, c.ended_by))
                st.reopen.append(c.tag)
        else:
            st.heads += 1

    def open_stream(i):
        last = seqs[i][-1].decode("ascii") if seqs[i] else curs[i]
        # Odd streams read through a small window (SO_RCVBUF 4096): slow readers, whose writes the server
        # cannot complete at once, so their streams are cut while later wakes are queued for them.
        c = loop.connect(srv.port, on_event, tag=i, cls=StreamConn, rcvbuf=ADV_RCVBUF if i % 2 else None)
        c.send(stream_request(ADV_ROOM, last_event_id=last))
        opened.append(c)
        return c

    def on_follow(c, status, body, t):
        i = c.tag
        if status == 200:
            seqs[i].extend(ADV_ID_RE.findall(body))
        elif status is None:
            st.dropped += 1
            if st.dropped > 10 * k or st.stop:
                return
            c = loop.connect(srv.port, on_follow, tag=i)
        else:
            st.bad += 1
            if st.bad <= 3:
                log("adversarial order: follower GET answered %s %r" % (status, body[:120]))
            if st.bad > 50:
                return
        if not st.stop and not c.dead:
            last = seqs[i][-1].decode("ascii") if seqs[i] else curs[i]
            c.send(poll_request(ADV_ROOM, last, 30, limit=limits[i - k]))

    def on_quiet(c, *args):
        pass

    opened = []                                         # every reading stream connection, reconnects too
    for i in range(k):
        open_stream(i)
    ok1, _ = wait_parked(ctl, loop, lambda: k, ctx.park_timeout, key="streams")
    cerr1 = 0
    loop.run(lambda: st.heads + st.ended >= k, 10.0)
    base = ctl.stats().get("waiters", 0)
    followers = []
    for j in range(k):
        c = loop.connect(srv.port, on_follow, tag=k + j)
        c.send(poll_request(ADV_ROOM, curs[k + j], 30, limit=limits[j]))
        followers.append(c)
    ok2, _ = wait_parked(ctl, loop, lambda: base + outstanding(followers), 30)
    qp, cerr3, ok3 = park(ctx, srv.port, ctl, quiet, k,
                          lambda i: poll_request(ADV_ROOM, cursors[2 * k + i], LONG_POLL_S, limit=1 + (500 + i) % 1000),
                          on_quiet, st, timeout=ctx.park_timeout)
    qs, cerr4, ok4 = park(ctx, srv.port, ctl, quiet, k,
                          lambda i: stream_request(ADV_ROOM, last_event_id=cursors[3 * k + i]),
                          on_quiet, st, timeout=ctx.park_timeout, key="streams", cls=StreamConn)
    quiet.run(None, 0.3)
    res["park_errors"] = cerr1 + cerr3 + cerr4 + st.ended
    errors += res["park_errors"] + sum(1 for x in (ok1, ok2, ok3, ok4) if not x)
    if st.ended:
        raise ProtocolError("%d reading streams ended before the first burst" % st.ended)
    res["rss_before_mib"] = rnd((srv.rss() or 0) / 1024.0, 1)
    watch = AdvWatch(srv, res)
    others = [loop.connect(srv.port, None, tag=r) for r in range(4)]

    def on_other_post(c, status, body, t):
        st.others_posted += 1
        if status != 201:
            st.others_bad += 1
    for c in others:
        c.on_resp = on_other_post

    def reopen():
        while st.reopen:
            i = st.reopen.pop()
            st.reconnects += 1
            if st.reconnects <= 20 * k:
                open_stream(i)

    t0 = now()
    req = adv_post_request()
    for b in range(ctx.adv_bursts):
        posters = adv_burst_conns(loop, srv.port, st)
        for c in posters:
            c.send(req)
        for c in others:                                # interleaved: other rooms while adv's fan-out runs
            c.send(post_request("other-%d" % c.tag, "burst %d" % b))
        want = (b + 1) * ADV_BURST
        if not watch.run(loop, lambda: (reopen() or True) and st.burst_answered >= want and
                         st.others_posted >= (b + 1) * len(others), 30.0):
            break
        for c in posters:
            c.close()
        watch.run(loop, lambda: reopen() and False, 0.3)    # let the fan-out run before the next burst
    posted = sorted(st.posted)
    last = posted[-1] if posted else None

    def caught_up():
        reopen()
        return all(q and q[-1] == last for q in seqs)

    drained = watch.run(loop, caught_up, ctx.adv_order_bound) and caught_up() if last else True
    st.stop = True
    res["seconds"] = rnd(now() - t0)
    loop.run(None, 0.1)                                 # anything more would be a duplicate
    watch.finish()
    if watch.aborted:
        return errors
    index = {m: i for i, m in enumerate(posted)}
    out = {}
    for kind, rng in (("stream", range(k)), ("follower", range(k, 2 * k))):
        lost = dup = reordered = foreign = undelivered = bad_readers = 0
        worst = None
        for i in rng:
            q = seqs[i]
            if q == posted:
                continue
            bad_readers += 1
            s = set(q)
            d = len(q) - len(s)
            dup += d
            foreign += len(s - set(index))
            r = sum(1 for a, b in zip(q, q[1:]) if b <= a)
            reordered += r
            reach = max([index[m] for m in s if m in index] or [-1])
            missing = [j for j in range(len(posted)) if posted[j] not in s]
            lost += sum(1 for j in missing if j < reach)
            undelivered += sum(1 for j in missing if j > reach)
            if (d or r) and (worst is None or d + r > worst[1] + worst[2]):
                worst = (i, d, r, len(q), len(s))
        out[kind] = {"lost": lost, "duplicated": dup, "reordered": reordered, "foreign": foreign,
                     "undelivered_at_end": undelivered, "not_exact": bad_readers}
        if worst:
            out[kind]["worst"] = "%s %d: %d events, %d distinct ids, %d duplicates, %d reorderings" % (
                kind, worst[0], worst[3], worst[4], worst[1], worst[2])
            log("adversarial order: worst %s" % out[kind]["worst"])
    res["streams"] = out["stream"]
    res["followers"] = out["follower"]
    res["posted"] = len(posted)
    res["burst_max_ms"] = ms(st.burst_max) if posted else None
    res["drained"] = bool(drained)
    res["stream_cuts"] = st.cuts
    res["stream_reconnects"] = st.reconnects
    res["resets"] = sum(c.resets for c in opened)
    res["junk_blocks"] = sum(c.junk for c in opened)
    res["follower_connections_dropped"] = st.dropped
    res["duplicates"] = out["stream"]["duplicated"] + out["follower"]["duplicated"]
    res["reorders"] = out["stream"]["reordered"] + out["follower"]["reordered"]
    res["lost"] = out["stream"]["lost"] + out["follower"]["lost"]
    res["ordering_errors"] = res["duplicates"] + res["reorders"] + res["lost"] + \
        out["stream"]["foreign"] + out["follower"]["foreign"]
    errors += st.bad + st.burst_bad + st.others_bad + res["resets"] + res["junk_blocks"] + (0 if drained else 1)
    return errors


# ---------------------------------------------------------------------------------------------------
# shards: the README's sharding nginx configuration (TLS), one shard against two


SHARD_ROOMS = ["room-%d" % i for i in range(8)]    # the 1-shard run's rooms; 2 shards: shard_rooms()
SHARD_CANDIDATES = 256  # room names tried for an even split (the hash depends on the shards' random ports)
SHARD_BLOCK = "# /etc/nginx/conf.d/chat-shards.conf"   # how the README's nginx block starts
SHARD_COMMAND = "python3 chat_server.py --port 808"     # how the README's shard command lines start
SHARD_POLL_S = 45       # fan-out waiters: below the servers' default --max-timeout (50) and nginx's 65 s
TLS_BATCH = 200         # TLS connections opened between two waits for their handshakes (nginx's backlog: 511)
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)


def shard_prerequisites():
    """(the README's sharding nginx block, its shard command lines, None), or (None, None, why we skip)."""
    path = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "README.md"))
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        return None, None, "no README.md beside bench/ (%s): the nginx block comes from it" % e.strerror
    blocks = [b for b in re.findall(r"```nginx\n(.*?)```", text, re.S) if b.startswith(SHARD_BLOCK)]
    commands = [line.strip() for line in text.splitlines() if line.strip().startswith(SHARD_COMMAND)]
    if len(blocks) != 1:
        return None, None, "README.md: %d ```nginx blocks start with %r, not 1" % (len(blocks), SHARD_BLOCK)
    if len(commands) < 2:
        return None, None, "README.md: %d command lines start with %r, not 2" % (len(commands), SHARD_COMMAND)
    if not NGINX:
        return None, None, "nginx is not installed (apt-get install nginx)"
    if not shutil.which("openssl"):
        return None, None, "openssl is not installed (it makes the throwaway certificate)"
    return blocks[0], commands, None


def set_flag(args, flag, value):
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]


def shard_args(command, db):
    """The README's shard command line, after "python3 chat_server.py": port 0 (we read it), our database
    file, loopback (the README's lines already listen on the default, 127.0.0.1), --quiet."""
    args = shlex.split(command)[2:]
    set_flag(args, "--port", "0")
    set_flag(args, "--db", db)
    set_flag(args, "--host", HOST)
    if "--quiet" not in args:
        args.append("--quiet")
    return args


def shard_site(block, ports, listen_port, cert, key):
    """The README's sharding block for len(ports) shards, changing only ports, paths and the certificate,
    as test_chat_server.py's NginxDeploymentTest does; (site, server name). With fewer shards than the
    README's upstream has, the upstream's extra `server` lines are deleted and their port in the
    /shards/ location becomes the last shard's (for one shard: `(?<shard>P|P)`)."""
    readme_ports = re.findall(r"^\s*server\s+127\.0\.0\.1:(\d+)\b", block, re.M)
    if len(readme_ports) < len(ports):
        raise ProtocolError("README block: %d upstream servers, need %d" % (len(readme_ports), len(ports)))
    for p in readme_ports[len(ports):]:
        block = re.sub(r"^\s*server\s+127\.0\.0\.1:%s\b.*\n" % p, "", block, flags=re.M)
    mapping = {p: str(ports[min(i, len(ports) - 1)]) for i, p in enumerate(readme_ports)}
    block = re.sub(r"\b(%s)\b" % "|".join(readme_ports), lambda m: mapping[m.group(1)], block)
    block, n_listen = re.subn(r"\blisten\s+443\s+ssl\s*;", "listen %s:%d ssl;" % (HOST, listen_port), block)
    block, n_cert = re.subn(r"(\bssl_certificate\s+)[^;\s]+;", lambda m: m.group(1) + cert + ";", block)
    block, n_key = re.subn(r"(\bssl_certificate_key\s+)[^;\s]+;", lambda m: m.group(1) + key + ";", block)
    if (n_listen, n_cert, n_key) != (1, 1, 1):
        raise ProtocolError("README block: expected one `listen 443 ssl;`, ssl_certificate and _key, found %d/%d/%d"
                            % (n_listen, n_cert, n_key))
    listens = re.findall(r"^\s*listen\s+([^;]+);", block, re.M)
    if any(not x.startswith("%s:" % HOST) for x in listens):
        raise ProtocolError("README block listens elsewhere than loopback after our changes: %s" % listens)
    m = re.search(r"^\s*server_name\s+([^;\s]+)", block, re.M)
    return block, (m.group(1) if m else "localhost")


def make_certificate(directory, name):
    """A throwaway self-signed certificate for `name` (as the tests make theirs): (cert, key) paths."""
    cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "2", "-subj", "/CN=" + name, "-addext", "subjectAltName=DNS:" + name],
                   check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    return cert, key


def free_port():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind((HOST, 0))
        return s.getsockname()[1]
    finally:
        s.close()


def proc_children(pid):
    """PIDs of pid's children (nginx's workers)."""
    try:
        with open("/proc/%d/task/%d/children" % (pid, pid)) as f:
            return [int(x) for x in f.read().split()]
    except (OSError, ValueError):
        pass
    kids = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return kids
    for name in names:
        if name.isdigit():
            try:
                with open("/proc/%s/stat" % name, "rb") as f:
                    if int(f.read().rsplit(b")", 1)[1].split()[1]) == pid:
                        kids.append(int(name))
            except (OSError, ValueError, IndexError):
                pass
    return kids


class Nginx:
    """A private nginx, started as test_chat_server.py's PrivateNginx starts one: `nginx -p DIR -c CONF`,
    daemon off, pid, logs and temp paths in DIR, `user root;` when we are root, the site included from
    DIR/site.conf; `-e` keeps even its start-up messages in DIR. Stopped by its own PID (SIGTERM: fast
    shutdown), and its workers by theirs if it had to be killed. The system's nginx is never touched."""

    def __init__(self, directory, site, workers, connections, cpus=None):
        self.dir, self.site, self.workers, self.connections, self.cpus = directory, site, workers, connections, cpus
        self.proc = None
        self.worker_list = []

    def start(self):
        d = self.dir
        for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            os.makedirs(os.path.join(d, "tmp", sub), exist_ok=True)
        with open(os.path.join(d, "site.conf"), "w") as f:
            f.write(self.site)
        self.conf = os.path.join(d, "nginx.conf")
        self.err_path = os.path.join(d, "error.log")
        with open(self.conf, "w") as f:
            f.write("""daemon off;
worker_processes %(workers)d;
%(user)s
pid %(d)s/nginx.pid;
error_log %(d)s/error.log notice;
events { worker_connections %(conns)d; }
http {
    client_body_temp_path %(d)s/tmp/client_body;
    proxy_temp_path %(d)s/tmp/proxy;
    fastcgi_temp_path %(d)s/tmp/fastcgi;
    uwsgi_temp_path %(d)s/tmp/uwsgi;
    scgi_temp_path %(d)s/tmp/scgi;
    access_log %(d)s/access.log;
    include %(d)s/site.conf;
}
""" % {"d": d, "workers": self.workers, "conns": self.connections,
       "user": "user root;" if hasattr(os, "geteuid") and os.geteuid() == 0 else ""})
        base = [NGINX, "-e", self.err_path, "-p", d, "-c", self.conf]
        check = subprocess.run(base[:1] + ["-t"] + base[1:], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               timeout=30)
        if check.returncode != 0:
            raise ServerStartError("nginx -t refused the configuration: %s"
                                   % check.stderr.decode("utf-8", "replace").strip().replace("\n", " | ")[-400:])
        cmd = base if self.cpus is None else ["taskset", "-c", self.cpus] + base
        with open(os.path.join(d, "stderr.log"), "wb") as err:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        return self

    def wait_ready(self, ctl, bound=10.0):
        """Until GET /healthz through it answers 200 and its workers are up; bounded."""
        deadline = now() + bound
        while now() < deadline:
            if self.proc.poll() is not None:
                raise ServerStartError("nginx exited with status %s: %s" % (self.proc.returncode, self.error_tail()))
            try:
                ctl.timeout = 2.0
                if ctl.request(build_request("GET", "/healthz", host=ctl.host))[0] == 200:
                    self.worker_list = proc_children(self.proc.pid)
                    if len(self.worker_list) >= self.workers:
                        return
            except (OSError, EOFError, ProtocolError):
                ctl.close()
            finally:
                ctl.timeout = CTL_TIMEOUT_S
            time.sleep(0.05)
        raise ServerStartError("nginx: no 200 for /healthz within %.0f s: %s" % (bound, self.error_tail()))

    def cpu(self):
        """CPU seconds of the master and its workers (None without /proc)."""
        total = proc_cpu_seconds(self.proc.pid)
        if total is None:
            return None
        for w in self.worker_list:
            total += proc_cpu_seconds(w) or 0.0
        return total

    def error_tail(self, n=400):
        try:
            with open(self.err_path, "rb") as f:
                data = f.read()
        except OSError:
            return ""
        lines = [x for x in data.decode("utf-8", "replace").splitlines()
                 if "[error]" in x or "[crit]" in x or "[alert]" in x or "[emerg]" in x]
        return " | ".join(lines)[-n:]

    def stop(self):
        p = self.proc
        if p is None:
            return None
        workers = proc_children(p.pid) or self.worker_list
        terminate(p, "nginx")
        for w in workers:                                   # only if the master had to be killed
            try:
                with open("/proc/%d/stat" % w, "rb") as f:
                    if b"(nginx)" not in f.read(64):
                        continue
                os.kill(w, 9)
            except (OSError, ValueError):
                pass
        return p.returncode


def shard_layout(ctx, k):
    """Where the k shards, nginx and the load generator run: (shard CPU lists, nginx's, ours, text).

    2 CPUs: 1 shard: the shard on the first, nginx and the load generator on the second; 2 shards: one
    shard on each, nginx and the load generator unpinned (on both: they compete with the shards, which
    is what 2 cores give). 3 CPUs: shards on the first two, nginx and load on the third; 4 or more:
    nginx and the load generator on CPUs of their own, the same in both runs. Not pinned: nothing is.
    """
    cpus = ctx.cpus
    if not cpus:
        return [None] * k, None, None, "not pinned"
    c = [str(x) for x in cpus]
    if len(c) >= 4:
        shards, ng, ld = c[:k], c[2], c[3]
    elif len(c) == 3:
        shards, ng, ld = c[:k], c[2], c[2]
    elif k == 1:
        shards, ng, ld = c[:1], c[1], c[1]
    else:
        shards, ng, ld = c[:2], ",".join(c), ",".join(c)
    if ng == ld:
        front = "nginx and load generator on CPU%s %s" % ("s" if "," in ng else "", ng)
        if k == 2 and len(c) == 2:
            front = "nginx and load generator unpinned (CPUs %s)" % ng
    else:
        front = "nginx on CPU %s, load generator on CPU %s" % (ng, ld)
    text = "%s on CPU %s; %s" % ("shard" if k == 1 else "shards", " and ".join(shards), front)
    return shards, ng, {int(x) for x in ld.split(",")}, text


def proc_stat_cpus():
    """{cpu: (user+nice+system, irq+softirq, steal)} seconds, from /proc/stat ({} without it)."""
    out = {}
    try:
        with open("/proc/stat", "rb") as f:
            for line in f:
                if line.startswith(b"cpu") and line[3:4].isdigit():
                    parts = line.split()
                    v = [int(x) for x in parts[1:9]]
                    out[int(parts[0][3:])] = ((v[0] + v[1] + v[2]) / float(CLK_TCK), (v[5] + v[6]) / float(CLK_TCK),
                                              v[7] / float(CLK_TCK))
    except (OSError, ValueError, IndexError):
        pass
    return out


def shard_snapshot(servers, nginx):
    return {"t": now(), "shards": [s.cpu() for s in servers], "nginx": nginx.cpu(), "load": self_cpu(),
            "cpus": proc_stat_cpus()}


def shard_cpu(s0, s1, cpus, count=None):
    """CPU between two snapshots: % of a core for each shard, nginx, the load generator, everything else
    on `cpus` (other processes and steal: the noise), irq/softirq; and per item of `count` (us)."""
    dt = max(1e-9, s1["t"] - s0["t"])
    out = {}
    if None in s0["shards"] or None in s1["shards"] or s0["nginx"] is None or s1["nginx"] is None:
        return out
    shards = [b - a for a, b in zip(s0["shards"], s1["shards"])]
    ng, ld = s1["nginx"] - s0["nginx"], s1["load"] - s0["load"]
    out["shard_cpu_pct"] = [rnd(x / dt * 100.0, 1) for x in shards]
    out["nginx_cpu_pct"] = rnd(ng / dt * 100.0, 1)
    out["load_cpu_pct"] = rnd(ld / dt * 100.0, 1)
    cs = [x for x in (cpus or sorted(s1["cpus"])) if x in s0["cpus"] and x in s1["cpus"]]
    if cs and dt >= 0.1:
        work = sum(s1["cpus"][x][0] - s0["cpus"][x][0] for x in cs)
        irq = sum(s1["cpus"][x][1] - s0["cpus"][x][1] for x in cs)
        steal = sum(s1["cpus"][x][2] - s0["cpus"][x][2] for x in cs)
        out["others_cpu_pct"] = rnd(max(0.0, work + steal - sum(shards) - ng - ld) / dt * 100.0, 1)
        out["steal_cpu_pct"] = rnd(steal / dt * 100.0, 1)
        out["irq_cpu_pct"] = rnd(irq / dt * 100.0, 1)
        out["cpus_counted"] = len(cs)
    if count:
        out["shard_us_per_post"] = rnd(sum(shards) / count * 1e6, 1)
        out["nginx_us_per_post"] = rnd(ng / count * 1e6, 1)
        out["load_us_per_post"] = rnd(ld / count * 1e6, 1)
    return out


def shard_stats(ctl, ports):
    """Each shard's /stats, through the README block's /shards/<port>/stats location."""
    out = []
    for p in ports:
        status, obj = ctl.get_json("/shards/%d/stats" % p)
        if status != 200 or not isinstance(obj, dict):
            raise ProtocolError("GET /shards/%d/stats through nginx answered %s" % (p, status))
        out.append(obj)
    return out


def shard_rooms(ctl, ports, host):
    """8 room names split evenly over the shards (4 + 4): the first of room-0, room-1, ... on each shard,
    by the X-Chat-Shard header of a GET ?timeout=0 (which opens no room). nginx's consistent hash covers
    the shards' addresses, and their ports are picked at random, so fixed names would split differently
    from run to run (2 + 6 in one): an uneven split measures the names' luck, not the shards."""
    k, want = len(ports), len(SHARD_ROOMS) // len(ports)
    addr = {"%s:%d" % (HOST, p): i for i, p in enumerate(ports)}
    picked = [[] for _ in ports]
    for j in range(SHARD_CANDIDATES):
        room = "room-%d" % j
        status, _ = ctl.request(build_request("GET", "/rooms/%s/messages?timeout=0" % room, host=host))
        m = re.search(rb"(?im)^x-chat-shard:\s*(\S+)", ctl.last_head)
        i = addr.get(m.group(1).decode("ascii", "replace")) if m else None
        if status != 200 or i is None:
            raise ProtocolError("GET /rooms/%s/messages?timeout=0: %s, X-Chat-Shard %r" % (
                room, status, m.group(1) if m else None))
        if len(picked[i]) < want:
            picked[i].append(room)
        if all(len(x) >= want for x in picked):
            break
    rooms = sorted((r for x in picked for r in x), key=lambda r: int(r.split("-")[1]))
    if len(rooms) < want * k:
        raise ProtocolError("no even split of %d rooms in %d names: %s" % (want * k, SHARD_CANDIDATES, picked))
    return rooms


def shard_post_run(ctx, port, tls, host, rooms, snap):
    """Closed-loop posting through nginx over TLS from ctx.shard_clients keep-alive clients, client i to
    room i % 8; a client whose answer says Connection: close (nginx's keepalive_requests, 1000 by
    default) opens a new connection, as a browser would: its next request's latency includes the new
    handshake. CPU snapshots at the first answer from the start and from the end of the window."""
    clients, seconds, warmup = ctx.shard_clients, ctx.shard_seconds, ctx.post_warmup
    loop = Loop()
    nrooms = len(rooms)
    reqs = [post_request(room, "benchmark message", host=host) for room in rooms]
    st = State(t_start=0.0, t_end=0.0, lat=[], bad=0, done=0, ok=0, per_room=[0] * nrooms, reconnects=0,
               s0=None, s1=None, statuses={})

    def on_resp(c, status, body, t):
        if status == 201:
            st.ok += 1
            st.per_room[c.tag % nrooms] += 1
            if st.t_start <= t <= st.t_end:
                st.lat.append(t - c.t_sent)
        else:
            st.bad += 1
            st.statuses[str(status)] = st.statuses.get(str(status), 0) + 1
            if st.bad <= 3:
                log("shards: POST answered %s %r" % (status, body[:160]))
        if st.s0 is None and t >= st.t_start:
            st.s0 = snap()
        if st.s1 is None and t >= st.t_end:
            st.s1 = snap()
        if status is None or t >= st.t_end:
            st.done += 1
            return
        if c.closing:
            c.close()
            st.reconnects += 1
            try:
                c = loop.connect_tls(port, tls, on_resp, tag=c.tag)
            except OSError as e:
                st.bad += 1
                st.done += 1
                log("shards: reconnect failed: %s" % e)
                return
        c.send(reqs[c.tag % nrooms])

    conns = [loop.connect_tls(port, tls, on_resp, tag=i) for i in range(clients)]
    st.t_start = now() + warmup
    st.t_end = st.t_start + seconds
    for c in conns:
        c.send(reqs[c.tag % nrooms])
    loop.run(lambda: st.done >= clients, warmup + seconds + 15)
    if st.s0 is None:
        st.s0 = snap()
    if st.s1 is None:
        st.s1 = snap()
    loop.close_all()
    lat = sorted(st.lat)
    return {"requests": len(lat), "answered": st.ok, "rps": round(len(lat) / seconds, 1),
            "p50_ms": ms(percentile(lat, 50)), "p99_ms": ms(percentile(lat, 99)),
            "max_ms": ms(lat[-1]) if lat else None, "post_errors": st.bad + (clients - st.done),
            "statuses": st.statuses, "reconnects": st.reconnects, "tls_errors": loop.tls_errors,
            "per_room": st.per_room, "s0": st.s0, "s1": st.s1}


def shard_fanout(ctx, port, tls, host, rooms, ctl, ports, home, snap, cpus):
    """ctx.shard_waiters long polls through nginx, waiter j on room j % 8 (so on every shard), then one
    POST to each of the 8 rooms at once, from 8 keep-alive connections: time from just before the first
    POST is written until every waiter has its answer, per shard too."""
    n, nrooms, k = ctx.shard_waiters, len(rooms), len(ports)
    res = {"fanout_waiters": n}
    errors = 0
    cursors = {}
    for room in rooms:
        status, body = ctl.request(build_request("GET", "/rooms/%s/messages?tail=1" % room, host=host))
        msgs = json.loads(body.decode("utf-8")) if status == 200 else None
        if not msgs:
            raise ProtocolError("GET /rooms/%s/messages?tail=1 answered %s %r" % (room, status, body[:100]))
        cursors[room] = msgs[-1]["id"]
    loop = Loop()
    st, count_answer, _ = fanout_callbacks()
    st.shard_last, st.posts, st.post_bad, st.post_max = [None] * k, 0, 0, None

    def on_wait(c, status, body, t):
        answered = len(st.lat)
        count_answer(c, status, body, t)
        if len(st.lat) > answered:      # a good answer: note its shard's latest
            i = home.get(rooms[c.tag % nrooms])
            if i is not None:
                st.shard_last[i] = max(st.shard_last[i] or 0.0, st.lat[-1])
        elif st.t0 is not None and st.bad <= 3:
            log("shards fan-out: waiter answered %s %r" % (status, body[:120]))

    def on_post(c, status, body, t):
        st.posts += 1
        st.post_max = t - st.t0
        if status != 201:
            st.post_bad += 1
            log("shards fan-out: POST answered %s %r" % (status, body[:120]))

    try:
        base = [x.get("waiters", 0) for x in shard_stats(ctl, ports)]
        posters = [loop.connect_tls(port, tls, on_post, tag=i) for i in range(nrooms)]
        conns = []
        s_park = snap()
        t_park = now()
        deadline = t_park + ctx.park_timeout
        connect_errors = 0
        while len(conns) < n and now() < deadline and connect_errors <= 10:
            batch = []
            for _ in range(min(TLS_BATCH, n - len(conns))):
                room = rooms[len(conns) % nrooms]
                try:
                    c = loop.connect_tls(port, tls, on_wait, tag=len(conns))
                except OSError as e:
                    connect_errors += 1
                    log("shards fan-out: connect failed: %s" % e)
                    break
                c.send(poll_request(room, cursors[room], SHARD_POLL_S, host=host))
                conns.append(c)
                batch.append(c)
            loop.run(lambda: all(c.dead or not c.hs for c in batch), max(0.1, deadline - now()))
        errors += connect_errors
        parked, ok = [0] * k, False
        while True:
            sts = shard_stats(ctl, ports)
            parked = [x.get("waiters", 0) - b for x, b in zip(sts, base)]
            if sum(parked) >= outstanding(conns) == n:
                ok = True
                break
            if now() >= deadline:
                break
            loop.run(None, 0.02)
        res["fanout_park_s"] = rnd(now() - t_park)
        res["fanout_parked"] = parked
        res["fanout_park_errors"] = connect_errors + st.early + loop.tls_errors
        if not ok:
            log("shards fan-out: parked %s of %d (outstanding %d)" % (parked, n, outstanding(conns)))
            errors += 1
        live = outstanding(conns)
        s0 = snap()
        st.t0 = now()
        for i, p in enumerate(posters):
            p.send(post_request(rooms[i], "fan-out", host=host))
        loop.run(lambda: st.got >= live and st.posts >= nrooms, ctx.fanout_bound)
        s1 = snap()
        lat = sorted(st.lat)
        res["fanout_answered"] = len(lat)
        res["fanout_all_ms"] = ms(lat[-1]) if lat and len(lat) == n else None
        res["fanout_p50_ms"] = ms(percentile(lat, 50))
        res["fanout_p99_ms"] = ms(percentile(lat, 99))
        res["fanout_shard_all_ms"] = [ms(x) for x in st.shard_last]
        res["fanout_posts_max_ms"] = ms(st.post_max) if st.posts >= nrooms else None
        cpu = shard_cpu(s0, s1, cpus)
        dt = s1["t"] - s0["t"]
        res["fanout_cpu_ms"] = {"shards": [rnd(x * dt * 10.0, 1) for x in cpu.get("shard_cpu_pct", [])],
                                "nginx": rnd((cpu.get("nginx_cpu_pct") or 0) * dt * 10.0, 1),
                                "load": rnd((cpu.get("load_cpu_pct") or 0) * dt * 10.0, 1)}
        res["fanout_others_cpu_pct"] = shard_cpu(s_park, s1, cpus).get("others_cpu_pct")   # parking too: >= 0.1 s
        if len(lat) < live:
            log("shards fan-out: %d of %d answered within %.0f s" % (len(lat), live, ctx.fanout_bound))
        errors += (live - len(lat)) + st.bad + st.post_bad + (nrooms - st.posts) + (n - live)
    finally:
        loop.close_all()
    res["fanout_errors"] = errors
    return res


def scenario_shards(ctx, k, block, commands):
    """Posts over 8 rooms through the README's sharding nginx block (TLS) to k shards, then a fan-out."""
    res = {"scenario": "shards", "shards": k, "clients": ctx.shard_clients, "seconds": ctx.shard_seconds,
           "rooms": len(SHARD_ROOMS), "waiters": ctx.shard_waiters, "tls": True, "db": "file",
           "nginx_workers": ctx.shard_nginx_workers}
    d = os.path.join(ctx.tmpdir, "shards-%d" % k)
    os.makedirs(d)
    if getattr(ctx, "shard_cert", None) is None:
        name = re.search(r"^\s*server_name\s+([^;\s]+)", block, re.M)
        cdir = os.path.join(ctx.tmpdir, "shards-tls")
        os.makedirs(cdir)
        ctx.shard_cert = make_certificate(cdir, name.group(1) if name else "localhost")
    cert, key = ctx.shard_cert
    shard_cpus, nginx_cpus, load_cpus, res["layout"] = shard_layout(ctx, k)
    used = sorted(ctx.cpus) if ctx.cpus else None
    servers, nginx, ctl = [], None, None
    old_affinity = os.sched_getaffinity(0) if load_cpus and hasattr(os, "sched_getaffinity") else None
    errors = 0
    try:
        for i in range(k):
            srv = Server(ctx, args=shard_args(commands[i], os.path.join(d, "shard-%d.db" % (i + 1))),
                         cpus=shard_cpus[i]).start()
            servers.append(srv)
        ports = [s.port for s in servers]
        res["shard_ports"] = ports
        listen = free_port()
        site, name = shard_site(block, ports, listen, cert, key)
        with open(os.path.join(d, "site.from-readme.conf"), "w") as f:
            f.write(site)
        conns_needed = 2 * (ctx.shard_waiters + ctx.shard_clients + 64)
        nginx = Nginx(os.path.join(d, "nginx"), site, ctx.shard_nginx_workers, max(4096, conns_needed),
                      nginx_cpus).start()
        if old_affinity is not None:
            os.sched_setaffinity(0, load_cpus)
        tls_ctx = ssl.create_default_context(cafile=cert)  # verifies the certificate and the name
        tls = (tls_ctx, name)
        ctl = Ctl(listen, tls=tls, host=name)
        nginx.wait_ready(ctl)

        rooms = list(SHARD_ROOMS) if k == 1 else shard_rooms(ctl, ports, name)
        res["room_names"] = rooms
        # Each room's home: post once, see which shard's /stats posts counter rose (and X-Chat-Shard).
        home, header_mismatch = {}, 0
        for room in rooms:
            before = [x.get("posts", 0) for x in shard_stats(ctl, ports)]
            ctl.post(room, "home of " + room)
            m = re.search(rb"(?im)^x-chat-shard:\s*(\S+)", ctl.last_head)
            after = [x.get("posts", 0) for x in shard_stats(ctl, ports)]
            grew = [b - a for a, b in zip(before, after)]
            if sorted(grew) != [0] * (k - 1) + [1]:
                raise ProtocolError("one POST to %s raised the shards' posts by %s" % (room, grew))
            home[room] = grew.index(1)
            if not m or m.group(1).decode("ascii", "replace") != "%s:%d" % (HOST, ports[home[room]]):
                header_mismatch += 1
        res["rooms_per_shard"] = [sum(1 for r in rooms if home[r] == i) for i in range(k)]
        res["x_chat_shard_mismatch"] = header_mismatch
        errors += header_mismatch

        def snap():
            return shard_snapshot(servers, nginx)

        log("shards: %d shard%s, %s; %d clients over %d rooms for %.1f s" %
            (k, "" if k == 1 else "s", res["layout"], ctx.shard_clients, len(rooms), ctx.shard_seconds))
        before = [x.get("posts", 0) for x in shard_stats(ctl, ports)]
        r = shard_post_run(ctx, listen, tls, name, rooms, snap)
        after = [x.get("posts", 0) for x in shard_stats(ctl, ports)]
        s0, s1 = r.pop("s0"), r.pop("s1")
        per_room = r.pop("per_room")
        res.update(r)
        res.update(shard_cpu(s0, s1, used, r["requests"]))
        res["posts_per_shard"] = [b - a for a, b in zip(before, after)]
        res["posts_per_shard_expected"] = [sum(n for room, n in zip(rooms, per_room) if home[room] == i)
                                           for i in range(k)]
        res["rooms_on_one_shard"] = res["posts_per_shard"] == res["posts_per_shard_expected"]
        errors += res["post_errors"] + (0 if res["rooms_on_one_shard"] else 1)
        if k > 1:
            one = [x for x in ctx.results if x.get("scenario") == "shards" and x.get("shards") == 1 and x.get("rps")]
            if one and res.get("rps"):
                res["rps_1_shard"] = one[-1]["rps"]
                res["ratio_to_1_shard"] = rnd(res["rps"] / one[-1]["rps"], 2)

        log("shards: fan-out, %d waiters over %d rooms" % (ctx.shard_waiters, len(rooms)))
        f = shard_fanout(ctx, listen, tls, name, rooms, ctl, ports, home, snap, used)
        res.update(f)
        errors += f["fanout_errors"]
        if k > 1:
            one = [x for x in ctx.results if x.get("scenario") == "shards" and x.get("shards") == 1]
            if one and one[-1].get("fanout_all_ms") and res.get("fanout_all_ms"):
                res["fanout_all_ms_1_shard"] = one[-1]["fanout_all_ms"]
        if nginx.proc.poll() is not None:
            raise ProtocolError("nginx exited with status %s: %s" % (nginx.proc.returncode, nginx.error_tail()))
        res["nginx_errors_logged"] = nginx.error_tail()
    finally:
        if ctl is not None:
            ctl.close()
        if nginx is not None:
            res["nginx_exit"] = nginx.stop()
        res["server_exit"] = [s.stop() for s in servers]
        if old_affinity is not None:
            os.sched_setaffinity(0, old_affinity)
    res["errors"] = errors
    return res


# ---------------------------------------------------------------------------------------------------
# backup: the OS-lock server against the previous EXCLUSIVE-locking one; posting while a backup and
# while Litestream copy the file (issue 23)

BACKUP_BASELINE_COMMIT = "fceeaa2"      # the last commit whose server held its file in EXCLUSIVE locking mode
BACKUP_POST_RATIO_TARGET = 0.95         # new / old posts per second, 64 clients, file store
BACKUP_MAX_MS_TARGET = 100.0            # a post's longest answer while a backup or Litestream reads the file


def baseline_server(ctx, given=None, commit=BACKUP_BASELINE_COMMIT):
    """(path of a previous server, None) or (None, why not): `given` (default --backup-baseline) if it is not
    "git", else `commit`'s chat_server.py by git show."""
    given = ctx.backup_baseline if given is None else given
    if given != "git":
        return (given, None) if os.path.exists(given) else (None, "%s does not exist" % given)
    out = os.path.join(ctx.tmpdir, "chat_server_%s.py" % commit)
    try:
        r = subprocess.run(["git", "-C", os.path.dirname(ctx.server_path), "show",
                            "%s:chat_server.py" % commit], capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        return None, "git show failed: %s" % e
    if r.returncode:
        return None, "git show %s:chat_server.py: %s" % (commit, r.stderr.decode()[:200].strip())
    with open(out, "wb") as f:
        f.write(r.stdout)
    return out, None


def litestream_path():
    """litestream: $CHAT_LITESTREAM, on PATH, or .ci's private virtual environment (as the tests look)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for c in (os.environ.get("CHAT_LITESTREAM"), shutil.which("litestream"),
              os.path.join(here, "..", ".ci", ".venv-litestream", "bin", "litestream")):
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return os.path.abspath(c)
    return None


def build_big_database(ctx, path, mib):
    """A chat database of about `mib` MiB, written with sqlite3 directly (rows of 7.5 KB of random base64
    text, which does not compress), from a message the server stored as a template. Bounded: refuses
    unless three times its size is free (the database, a backup of it, Litestream's snapshot)."""
    free = shutil.disk_usage(os.path.dirname(path)).free
    if free < 3 * mib * 1024 * 1024:
        raise ProtocolError("%d MiB free in %s, %d needed" % (free >> 20, os.path.dirname(path), 3 * mib))
    srv = Server(ctx, db=path, cpus=None).start()
    try:
        Ctl(srv.port).post("big", "template")
    finally:
        srv.stop()
    import base64
    import sqlite3
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        columns = [row[1] for row in conn.execute("PRAGMA table_info(messages)")]
        template = list(conn.execute("SELECT %s FROM messages" % ", ".join(columns)).fetchone())
        sql = "INSERT INTO messages (%s) VALUES (%s)" % (", ".join(columns), ", ".join("?" * len(columns)))
        i_id, i_body = columns.index("id"), columns.index("body")
        start_ms = int((time.time() - 7 * 86400) * 1000)        # a week ago: older than anything posted now
        conn.execute("BEGIN")
        for i in range(mib * 1024 * 1024 // 8400):     # a row takes about 8.4 KB of the file
            row = list(template)
            value = ((start_ms + i) << 80) | (0x7 << 76) | (0b10 << 62) | i
            text = "%032x" % value
            row[i_id] = "%s-%s-%s-%s-%s" % (text[:8], text[8:12], text[12:16], text[16:20], text[20:])
            row[i_body] = base64.b64encode(os.urandom(5625)).decode()
            conn.execute(sql, row)
        conn.execute("COMMIT")
    finally:
        conn.close()
    return os.path.getsize(path)


def timed_posting(port, clients, until, bound):
    """Closed-loop posting from `clients` keep-alive connections until until() (checked in the loop) or
    `bound` s; returns ([(time answered, latency)], errors)."""
    loop = Loop()
    req = post_request("post", "benchmark message")
    samples, st = [], State(bad=0, stop=False, done=0)

    def on_resp(c, status, body, t):
        if status != 201:
            st.bad += 1
            if st.bad <= 3:
                log("POST answered %s %r" % (status, body[:120]))
        else:
            samples.append((t, t - c.t_sent))
        if not st.stop and not c.dead:
            c.send(req)
        else:
            st.done += 1

    conns = [loop.connect(port, on_resp) for _ in range(clients)]
    for c in conns:
        c.send(req)

    def check():
        if not st.stop and until():
            st.stop = True
        return st.stop and st.done >= clients

    loop.run(check, bound)
    st.stop = True
    loop.run(lambda: st.done >= clients, 10)
    loop.close_all()
    return samples, st.bad + (clients - st.done)


def latency_row(samples, t0, t1):
    """p50/p99/max and count of the answers given between t0 and t1."""
    lat = sorted(x for t, x in samples if t0 <= t <= t1)
    return {"posts": len(lat), "rps": round(len(lat) / max(t1 - t0, 1e-9), 1),
            "p50_ms": ms(percentile(lat, 50)), "p99_ms": ms(percentile(lat, 99)),
            "max_ms": ms(lat[-1]) if lat else None}


def scenario_backup_posting(ctx):
    """Posting at --backup-post-clients on the file store: this server against the previous commit's
    (EXCLUSIVE locking), a fresh server and file each, rows alternating, --backup-rounds each."""
    res = {"scenario": "backup", "part": "posting", "clients": ctx.backup_post_clients}
    old_path, why = baseline_server(ctx)
    if why:
        res["skipped"] = "no previous server to compare with: %s" % why
        return res
    runs = {"old": [], "new": []}
    for rnd_no in range(ctx.backup_rounds):
        for kind in (("old", "new") if rnd_no % 2 == 0 else ("new", "old")):
            srv = Server(ctx, db=os.path.join(ctx.tmpdir, "backup-post-%s-%d.db" % (kind, rnd_no)))
            if kind == "old":
                srv.path = old_path
            srv.start()
            try:
                Ctl(srv.port).post("post", "start")
                r = post_run(srv.port, ctx.backup_post_clients, ctx.backup_post_seconds, ctx.post_warmup)
            finally:
                srv.stop()
            log("backup: posting, %s server, round %d: %.0f posts/s, p99 %s ms, max %s ms" %
                (kind, rnd_no + 1, r["rps"], r["p99_ms"], r["max_ms"]))
            runs[kind].append(r)
    for kind, rows in runs.items():
        res[kind] = {"rps": [r["rps"] for r in rows], "p99_ms": [r["p99_ms"] for r in rows],
                     "max_ms": [r["max_ms"] for r in rows], "errors": sum(r["errors"] for r in rows)}
        res[kind + "_rps"] = median([r["rps"] for r in rows])
        res[kind + "_p99_ms"] = median([r["p99_ms"] for r in rows if r["p99_ms"] is not None])
        res[kind + "_max_ms"] = max(r["max_ms"] for r in rows if r["max_ms"] is not None)
    res["ratio"] = rnd(res["new_rps"] / res["old_rps"], 3)
    res["baseline"] = "%s (%s)" % (BACKUP_BASELINE_COMMIT, old_path)
    res["errors"] = res["old"]["errors"] + res["new"]["errors"]
    return res


def scenario_backup_latency(ctx):
    """A database of --backup-db-mib; posting at --backup-clients: alone, then while `chat_server.py backup`
    copies it, then while Litestream takes its first snapshot and replicates (file replica)."""
    res = {"scenario": "backup", "part": "latency", "clients": ctx.backup_clients, "db_mib": ctx.backup_db_mib}
    db = os.path.join(ctx.tmpdir, "big.db")
    t = now()
    res["db_bytes"] = build_big_database(ctx, db, ctx.backup_db_mib)
    res["build_s"] = rnd(now() - t, 1)
    log("backup: built a %d MiB database in %.1f s" % (res["db_bytes"] >> 20, res["build_s"]))
    srv = Server(ctx, db=db).start()
    litestream = None
    errors = 0
    try:
        Ctl(srv.port).post("post", "start")
        t0 = now()
        samples, bad = timed_posting(srv.port, ctx.backup_clients, lambda: now() - t0 >= ctx.backup_seconds,
                                     ctx.backup_seconds + 10)
        errors += bad
        res["alone"] = latency_row(samples, t0 + ctx.post_warmup, now())

        out = os.path.join(ctx.tmpdir, "big-copy.db")
        backup = subprocess.Popen([sys.executable, ctx.server_path, "backup", "--db", db, out],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        t0 = now()
        st = State(t_end=None)

        def backup_done():
            if st.t_end is None and backup.poll() is not None:
                st.t_end = now()
            return st.t_end is not None
        samples, bad = timed_posting(srv.port, ctx.backup_clients, backup_done, 600)
        errors += bad
        backup_done()
        stdout, stderr = backup.communicate(timeout=60)
        res["backup_s"] = rnd((st.t_end or now()) - t0, 2)
        res["backup_exit"] = backup.returncode
        res["backup_said"] = (stdout or stderr).decode("utf-8", "replace").strip()[:300]
        if backup.returncode != 0:
            errors += 1
        res["during_backup"] = latency_row(samples, t0, st.t_end or now())
        if os.path.exists(out):
            os.remove(out)

        binary = litestream_path()
        if binary is None:
            res["litestream"] = "skipped: no litestream ($CHAT_LITESTREAM, PATH, .ci/.venv-litestream)"
        else:
            replica = os.path.join(ctx.tmpdir, "replica")
            config = os.path.join(ctx.tmpdir, "litestream.yml")
            with open(config, "w") as f:
                f.write("dbs:\n  - path: %s\n    busy-timeout: 5s\n    replica:\n      type: file\n"
                        "      path: %s\n      sync-interval: 1s\n" % (db, replica))
            log_path = os.path.join(ctx.tmpdir, "litestream.log")
            with open(log_path, "wb") as lf:
                litestream = subprocess.Popen([binary, "replicate", "-config", config], stdout=lf,
                                              stderr=subprocess.STDOUT)
            snapshot_dir = os.path.join(replica, "ltx", "9")
            t0 = now()
            st = State(t_end=None)

            def snapshot_done():
                if st.t_end is None and os.path.isdir(snapshot_dir) and os.listdir(snapshot_dir):
                    st.t_end = now()
                return st.t_end is not None or litestream.poll() is not None
            samples, bad = timed_posting(srv.port, ctx.backup_clients, snapshot_done, 600)
            errors += bad
            res["litestream_snapshot_s"] = rnd((st.t_end or now()) - t0, 2)
            res["during_litestream_snapshot"] = latency_row(samples, t0, st.t_end or now())
            t0 = now()
            samples, bad = timed_posting(srv.port, ctx.backup_clients,
                                         lambda: now() - t0 >= 2 * ctx.backup_seconds, 2 * ctx.backup_seconds + 10)
            errors += bad
            res["while_litestream_replicates"] = latency_row(samples, t0 + ctx.post_warmup, now())
            litestream.terminate()      # it ships what it has not shipped yet before it exits: give it time
            try:
                litestream.wait(60)
            except subprocess.TimeoutExpired:
                log("litestream pid %d ignored SIGTERM for 60 s: killing it" % litestream.pid)
                litestream.kill()
                litestream.wait(5)
            res["litestream_exit"] = litestream.returncode
            with open(log_path, "rb") as lf:
                text = lf.read().decode("utf-8", "replace")
            res["litestream_errors"] = [line[:200] for line in text.splitlines() if "level=ERROR" in line][:5]
            res["litestream_locked"] = text.count("database is locked")
    finally:
        if litestream is not None and litestream.poll() is None:
            terminate(litestream, "litestream")
        res["server_exit"] = srv.stop()
    res["errors"] = errors
    return res


# ---------------------------------------------------------------------------------------------------
# Identity (issue 21): what a signed token costs a post, and what a flood of refused tokens costs the others

IDENTITY_US_TARGET = 10.0               # server CPU per post, JWT over the shared token
IDENTITY_P99_RATIO_TARGET = 1.20        # JWT posters' p99 with 2,000 refused tokens a second / without
IDENTITY_SHARED_TOKEN = "bench-shared-token-0123456789"
IDENTITY_BAD_KINDS = ("alg none", "wrong secret", "expired", "malformed")


def b64url(data):
    import base64
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def mint(secret, claims, header=None, digest="sha256"):
    """A JWT as PyJWT makes one ({"alg":"HS256","typ":"JWT"}, compact JSON), signed with hmac."""
    import hashlib
    import hmac
    head = b64url(json.dumps(header or {"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    body = b64url(json.dumps(claims, separators=(",", ":")).encode())
    signature = hmac.new(secret, ("%s.%s" % (head, body)).encode("ascii"), getattr(hashlib, digest)).digest()
    return "%s.%s.%s" % (head, body, b64url(signature))


def bad_tokens(secret, count):
    """`count` distinct refused tokens, the kinds of IDENTITY_BAD_KINDS in turn."""
    t = int(time.time())
    tokens = []
    for i in range(count):
        claims = {"sub": "intruder-%d" % i, "iat": t, "exp": t + 3600}
        kind = IDENTITY_BAD_KINDS[i % len(IDENTITY_BAD_KINDS)]
        if kind == "alg none":
            tokens.append("%s.%s." % (b64url(b'{"alg":"none","typ":"JWT"}'),
                                      b64url(json.dumps(claims, separators=(",", ":")).encode())))
        elif kind == "wrong secret":
            tokens.append(mint(b"not-the-server-secret-but-32-bytes-or-more", claims))
        elif kind == "expired":
            tokens.append(mint(secret, dict(claims, exp=t - 3600)))
        else:
            good = mint(secret, claims)
            tokens.append(good[:len(good) // 2] + "!" + good[len(good) // 2 + 1:])    # not base64url
    return tokens


def authorized_post(room, token):
    body = json.dumps({"body": "benchmark message"}).encode("utf-8")
    head = "POST /rooms/%s/messages HTTP/1.1\r\nHost: %s\r\n" % (room, HOST)
    if token:
        head += "Authorization: Bearer %s\r\n" % token
    head += "Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
    return head.encode("ascii") + body


def identity_run(port, requests, seconds, warmup, bad=None, bad_rate=0.0, bad_conns=32, expect=401):
    """Closed-loop posting, client i sending requests[i], for `seconds` after `warmup`; with `bad`, a paced
    `bad_rate` per second of GETs with those refused tokens on `bad_conns` other keep-alive connections
    (one outstanding each; a request due while all are busy is counted as late, not sent), each answered
    `expect` (401; 200 for the control run with valid tokens)."""
    loop = Loop()
    st = State(t_start=0.0, t_end=0.0, lat=[], bad=0, ok=0, done=0, refused=0, other=0, sent_bad=0, late=0,
               stop=False)
    clients = len(requests)

    def on_post(c, status, body, t):
        if status != 201:
            st.bad += 1
            if st.bad <= 3:
                log("identity: POST answered %s %r" % (status, body[:160]))
        else:
            st.ok += 1
            if st.t_start <= t <= st.t_end:
                st.lat.append(t - c.t_sent)
        if t < st.t_end and not c.dead:
            c.send(c.tag)
        else:
            st.done += 1

    def on_refused(c, status, body, t):
        if status == expect:
            st.refused += 1
        else:
            st.other += 1
            if st.other <= 3:
                log("identity: a refused token answered %s %r" % (status, body[:160]))

    conns = [loop.connect(port, on_post, tag=req) for req in requests]
    idle = [loop.connect(port, on_refused) for _ in range(bad_conns)] if bad else []
    gets = [build_request("GET", "/rooms/jwt/messages?tail=1", host=HOST).replace(
        b"\r\n\r\n", ("\r\nAuthorization: Bearer %s\r\n\r\n" % token).encode("ascii")) for token in (bad or ())]
    t0 = now()
    st.t_start = t0 + warmup
    st.t_end = st.t_start + seconds
    for c in conns:
        c.send(c.tag)
    sel = loop.sel
    deadline = st.t_end + 10
    while st.done < clients and now() < deadline:
        if gets:
            t = now()
            due = int((min(t, st.t_end) - t0) * bad_rate) - st.sent_bad - st.late
            for _ in range(max(0, due)):
                c = next((x for x in idle if not x.dead and x.pending == 0), None)
                if c is None:
                    st.late += 1
                    continue
                c.send(gets[(st.sent_bad + st.late) % len(gets)])
                st.sent_bad += 1
        for key, mask in sel.select(0.0005 if gets else 0.05):
            c = key.data
            if mask & selectors.EVENT_WRITE:
                c.on_write()
            if mask & selectors.EVENT_READ:
                c.on_read()
    loop.close_all()
    lat = sorted(st.lat)
    return {"answered": st.ok, "rps": round(len(lat) / seconds, 1), "p50_ms": ms(percentile(lat, 50)),
            "p99_ms": ms(percentile(lat, 99)), "max_ms": ms(lat[-1]) if lat else None,
            "errors": st.bad + (clients - st.done) + st.other, "refused": st.refused,
            "refused_per_s": round(st.refused / (warmup + seconds), 1), "late": st.late}


def scenario_identity(ctx):
    """One server with --jwt-secret-file, --token and --anonymous-rooms: posting at --identity-clients with a
    JWT each, with the shared token, with none, in rounds (order rotated); then the JWT posters alone
    against the JWT posters beside --identity-bad-rate refused tokens a second, alternating."""
    secret = os.urandom(32)
    path = os.path.join(ctx.tmpdir, "identity.secret")
    with open(path, "wb") as f:
        f.write(secret)
    args = ["--host", HOST, "--port", "0", "--quiet", "--db", ":memory:", "--max-timeout", "300",
            "--allow-host", HOST, "--jwt-secret-file", path, "--token", IDENTITY_SHARED_TOKEN,
            "--anonymous-rooms", "anon"]
    srv = Server(ctx, args=args).start()
    ctx.server_lines.add(srv.first_line)
    # Anonymous clients on a server of their own: with --token set, --anonymous-rooms is not honoured
    # (anonymous requests get 401 whatever the room; see the README's "who may do what").
    anon = Server(ctx, args=args[:args.index("--token")] + args[args.index("--token") + 2:]).start()
    n = ctx.identity_clients
    t = int(time.time())
    jwts = [mint(secret, {"sub": "bench-%d" % i, "name": "Bench %d" % i, "iat": t, "exp": t + 86400,
                          "rooms": {"read": ["jwt"], "post": ["jwt"]}}) for i in range(n)]
    servers = {"jwt": srv, "shared": srv, "none": anon}
    kinds = {"jwt": [authorized_post("jwt", token) for token in jwts],
             "shared": [authorized_post("shared", IDENTITY_SHARED_TOKEN)] * n,
             "none": [authorized_post("anon", None)] * n}
    res = {"scenario": "identity", "clients": n, "seconds": ctx.identity_seconds, "rounds": ctx.identity_rounds,
           "bad_rate": ctx.identity_bad_rate, "bad_kinds": list(IDENTITY_BAD_KINDS)}
    rows = {kind: [] for kind in kinds}
    errors = 0
    try:
        order = list(kinds)
        for rnd_no in range(ctx.identity_rounds):
            for kind in order[rnd_no % 3:] + order[:rnd_no % 3]:
                on = servers[kind]
                cpu0 = on.cpu()
                r = identity_run(on.port, kinds[kind], ctx.identity_seconds, ctx.post_warmup)
                r["us_per_post"] = rnd((on.cpu() - cpu0) / r["answered"] * 1e6, 1) if r["answered"] else None
                errors += r["errors"]
                rows[kind].append(r)
                log("identity: %s, round %d: %.0f posts/s, p99 %s ms, %s us of server CPU per post" %
                    (kind, rnd_no + 1, r["rps"], r["p99_ms"], r["us_per_post"]))
        for kind, rs in rows.items():
            res[kind] = {key: [r[key] for r in rs] for key in ("rps", "p99_ms", "us_per_post")}
            res[kind + "_rps"] = median(res[kind]["rps"])
            res[kind + "_p99_ms"] = median(res[kind]["p99_ms"])
            res[kind + "_us_per_post"] = median(res[kind]["us_per_post"])
        if res["jwt_us_per_post"] is not None and res["shared_us_per_post"] is not None:
            res["jwt_over_shared_us"] = rnd(res["jwt_us_per_post"] - res["shared_us_per_post"], 1)
        # The control: as many requests a second with valid tokens (GETs of the posters' room, 200), so
        # that what any request costs a saturated core is told apart from what a refused token costs.
        extra = {"without": (None, 401), "with": (bad_tokens(secret, 400), 401), "valid": (jwts, 200)}
        flood = {key: [] for key in extra}
        order = list(extra)
        for rnd_no in range(ctx.identity_rounds):
            for key in order[rnd_no % 3:] + order[:rnd_no % 3]:
                tokens, expect = extra[key]
                cpu0, t0 = srv.cpu(), now()
                r = identity_run(srv.port, kinds["jwt"], ctx.identity_seconds, ctx.post_warmup,
                                 bad=tokens, bad_rate=ctx.identity_bad_rate, expect=expect)
                r["cpu_s"] = srv.cpu() - cpu0
                r["server_cpu_pct"] = rnd(r["cpu_s"] / (now() - t0) * 100.0, 1)
                errors += r["errors"]
                flood[key].append(r)
                log("identity: JWT posters, %s, round %d: %.0f posts/s, p99 %s ms, %s extra requests/s, "
                    "%d late, server CPU %s %%" % ({"without": "alone", "with": "beside refused tokens",
                                                    "valid": "beside valid-token GETs"}[key], rnd_no + 1, r["rps"],
                                                   r["p99_ms"], r["refused_per_s"], r["late"], r["server_cpu_pct"]))
        alone_us = median([r["cpu_s"] / r["answered"] for r in flood["without"] if r["answered"]])
        for key, rs in flood.items():
            if key != "without" and alone_us:
                # Server CPU per extra request: the run's CPU less its posts at the cost they had alone.
                for r in rs:
                    r["us_per_extra"] = rnd((r["cpu_s"] - r["answered"] * alone_us) / max(1, r["refused"]) * 1e6, 1)
                res[key + "_us_per_request"] = median([r["us_per_extra"] for r in rs])
            res["flood_" + key] = {k: [r[k] for r in rs] for k in ("rps", "p99_ms", "refused_per_s", "late",
                                                                   "server_cpu_pct")}
            res["flood_%s_p99_ms" % key] = median(res["flood_" + key]["p99_ms"])
            res["flood_%s_rps" % key] = median(res["flood_" + key]["rps"])
        res["refused_per_s"] = median(res["flood_with"]["refused_per_s"])
        if res["flood_without_p99_ms"]:
            res["p99_ratio"] = rnd(res["flood_with_p99_ms"] / res["flood_without_p99_ms"], 3)
            res["valid_p99_ratio"] = rnd(res["flood_valid_p99_ms"] / res["flood_without_p99_ms"], 3)
    finally:
        srv.stop()
        anon.stop()
    res["errors"] = errors
    return res


# ---------------------------------------------------------------------------------------------------
# Rooms (issue 22): GET /rooms with 1,000 rooms, before= paging through 100,000 stored messages, and the
# cost of presence to a room with 10,000 parked polls, against the server from before presence existed

ROOMS_BASELINE_COMMIT = "16298ec"       # chat_server.py as it was before 141b154 added rooms and presence
ROOMS_LIST_P99_TARGET_MS = 5.0          # GET /rooms with 1,000 rooms
ROOMS_PAGE_TARGET_MS = 5.0              # each before= page of 100
ROOMS_PRESENCE_TOLERANCE = 0.05         # posting rate and fan-out time with presence, against without
ROOMS_PRESENCE_ROOM = "presence"
ROOMS_SCROLL_ROOM = "scroll"


def rooms_server_args(ctx, db, max_rooms):
    """The bench's usual server flags, with --max-rooms."""
    return ["--host", HOST, "--port", "0", "--quiet", "--db", db, "--max-waiters", str(ctx.max_waiters),
            "--max-connections", str(ctx.max_connections), "--max-timeout", "300", "--allow-host", HOST,
            "--max-rooms", str(max_rooms)]


def latency_summary(lat, target_ms=None):
    """p50/p99/max/mean in ms of a list of seconds, and how many exceeded target_ms."""
    lat = sorted(lat)
    out = {"n": len(lat), "p50_ms": ms(percentile(lat, 50)), "p99_ms": ms(percentile(lat, 99)),
           "max_ms": ms(lat[-1]) if lat else None, "mean_ms": ms(sum(lat) / len(lat)) if lat else None}
    if target_ms is not None:
        out["over_target"] = sum(1 for x in lat if x * 1000.0 > target_ms)
    return out


def scenario_rooms_list(ctx, db_kind):
    """One message posted to each of --rooms-count rooms, then --rooms-requests GET /rooms?limit=1000 from
    one keep-alive client, one at a time: latency of each (after --rooms-warmup not counted)."""
    n = ctx.rooms_count
    db = ":memory:" if db_kind == "memory" else os.path.join(ctx.tmpdir, "rooms-list-%d.db" % (Server.count + 1))
    srv = Server(ctx, args=rooms_server_args(ctx, db, max(2000, 2 * n))).start()
    ctx.server_lines.add(srv.first_line)
    ctl = Ctl(srv.port)
    res = {"scenario": "rooms", "part": "list", "db": db_kind, "rooms": n, "requests": ctx.rooms_requests}
    errors = 0
    try:
        t0 = now()
        names = ["room-%05d" % i for i in range(n)]
        for name in names:
            ctl.post(name, "hello %s" % name)
        res["fill_s"] = rnd(now() - t0)
        limit = min(1000, n)
        req = build_request("GET", "/rooms?limit=%d" % limit)
        status, body = ctl.request(req)
        if status != 200:
            raise ProtocolError("GET /rooms answered %s: %r" % (status, body[:200]))
        rooms = json.loads(body.decode("utf-8"))
        res["answer_bytes"] = len(body)
        res["listed"] = len(rooms)
        latest = [r["latest"] for r in rooms]
        if len(rooms) != limit or latest != sorted(latest, reverse=True) or \
                {r["name"] for r in rooms} != set(names[-limit:]):
            errors += 1
            log("rooms list: %d rooms listed, expected the %d newest, newest activity first" % (len(rooms), limit))
        for _ in range(ctx.rooms_warmup):
            ctl.request(req)
        lat = []
        cpu0, t0 = srv.cpu(), now()
        for _ in range(ctx.rooms_requests):
            t = now()
            status, body = ctl.request(req)
            lat.append(now() - t)
            if status != 200:
                errors += 1
        cpu1, t1 = srv.cpu(), now()
        res.update(latency_summary(lat, ROOMS_LIST_P99_TARGET_MS))
        if cpu0 is not None:
            res["server_us_per_request"] = rnd((cpu1 - cpu0) / len(lat) * 1e6, 1)
        res["requests_per_s"] = rnd(len(lat) / (t1 - t0), 1)
    finally:
        ctl.close()
        res["server_exit"] = srv.stop()
    res["errors"] = errors
    return res


def build_scroll_database(ctx, path, n):
    """A database file whose room ROOMS_SCROLL_ROOM holds `n` messages (a week old, one a millisecond),
    written with sqlite3 directly in one transaction: the server creates the file (schema version 3) and
    stores one message to another room, whose row is the template; the rooms table gets the room's count,
    latest and last_activity, as the server keeps them. Returns the template's id (the newest id issued)."""
    srv = Server(ctx, db=path, cpus=None).start()
    try:
        newest = Ctl(srv.port).post("template", "template")
    finally:
        srv.stop()
    import sqlite3
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version != 3:
            raise ProtocolError("the server wrote schema version %d; this builder knows version 3" % version)
        columns = [row[1] for row in conn.execute("PRAGMA table_info(messages)")]
        template = list(conn.execute("SELECT %s FROM messages" % ", ".join(columns)).fetchone())
        sql = "INSERT INTO messages (%s) VALUES (%s)" % (", ".join(columns), ", ".join("?" * len(columns)))
        i_id, i_room, i_at, i_body = (columns.index(c) for c in ("id", "room", "created_at", "body"))
        start_ms = int((time.time() - 7 * 86400) * 1000)
        filler = " scrolling back through a long conversation, one page at a time"

        def rows():
            for i in range(n):
                t_ms = start_ms + i
                value = (t_ms << 80) | (0x7 << 76) | (0b10 << 62) | i
                text = "%032x" % value
                row = list(template)
                row[i_id] = "%s-%s-%s-%s-%s" % (text[:8], text[8:12], text[12:16], text[16:20], text[20:])
                row[i_room] = ROOMS_SCROLL_ROOM
                row[i_at] = "%s.%03dZ" % (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t_ms // 1000)), t_ms % 1000)
                row[i_body] = "message %06d%s" % (i, filler)
                yield row
        conn.execute("BEGIN")
        conn.executemany(sql, rows())
        last = conn.execute("SELECT id, created_at FROM messages WHERE room = ? ORDER BY id DESC LIMIT 1",
                            (ROOMS_SCROLL_ROOM,)).fetchone()
        conn.execute("INSERT OR REPLACE INTO rooms (name, floor, count, latest, last_activity) VALUES (?, NULL, ?, ?, ?)",
                     (ROOMS_SCROLL_ROOM, n, last[0], last[1]))
        conn.execute("COMMIT")
    finally:
        conn.close()
    return newest


def scenario_rooms_scroll(ctx):
    """A file of --rooms-messages in one room; page back from its newest to its oldest with before= and
    limit=--rooms-page from one keep-alive client, one page at a time: each page's latency."""
    n, limit = ctx.rooms_messages, ctx.rooms_page
    path = os.path.join(ctx.tmpdir, "rooms-scroll.db")
    res = {"scenario": "rooms", "part": "scroll", "db": "file", "messages": n, "limit": limit}
    t0 = now()
    newest = build_scroll_database(ctx, path, n)
    res["build_s"] = rnd(now() - t0)
    res["db_mib"] = rnd(os.path.getsize(path) / 1048576.0, 1)
    srv = Server(ctx, db=path).start()
    ctx.server_lines.add(srv.first_line)
    ctl = Ctl(srv.port)
    errors = 0
    try:
        status, rooms = ctl.get_json("/rooms")
        listed = [r for r in rooms or [] if r.get("name") == ROOMS_SCROLL_ROOM] if status == 200 else []
        res["listed_count"] = listed[0].get("count") if listed else None
        if res["listed_count"] != n:
            errors += 1
            log("rooms scroll: GET /rooms says %s messages in %s, %d stored" % (res["listed_count"], ROOMS_SCROLL_ROOM, n))
        before, lat, got, misordered = newest, [], 0, 0
        cpu0 = srv.cpu()
        for _ in range(n // limit + 2):         # bounded: one more than needed, for the empty answer at the start
            req = build_request("GET", "/rooms/%s/messages?before=%s&limit=%d" % (ROOMS_SCROLL_ROOM, before, limit))
            t = now()
            status, body = ctl.request(req)
            dt = now() - t
            if status != 200:
                errors += 1
                log("rooms scroll: before=%s answered %s %r" % (before, status, body[:200]))
                break
            msgs = json.loads(body.decode("utf-8"))
            if not msgs:
                res["start_ms"] = ms(dt)        # the empty page that says "no older messages"
                break
            lat.append(dt)
            ids = [m["id"] for m in msgs]
            if ids != sorted(ids) or ids[-1] >= before or len(set(ids)) != len(ids):
                misordered += 1
            got += len(ids)
            before = ids[0]
        cpu1 = srv.cpu()
        res["pages"] = len(lat)
        res["received"] = got
        res["misordered_pages"] = misordered
        res.update(latency_summary(lat, ROOMS_PAGE_TARGET_MS))
        res["first_page_ms"] = ms(lat[0]) if lat else None
        if cpu0 is not None and lat:
            res["server_us_per_page"] = rnd((cpu1 - cpu0) / len(lat) * 1e6, 1)
        if got != n or misordered:
            errors += 1
            log("rooms scroll: %d of %d messages received, %d pages out of order" % (got, n, misordered))
    finally:
        ctl.close()
        res["server_exit"] = srv.stop()
    res["errors"] = errors
    return res


def named_poll(room, after, i):
    """A long poll of follower i, which names itself for presence (?name=; the server before presence
    ignores it): each is its own follower, as 10,000 browsers would be, though all come from one address."""
    return build_request("GET", "/rooms/%s/messages?after=%s&timeout=%d&name=f%d" % (room, after, LONG_POLL_S, i))


def presence_run(ctx, path, kind):
    """A fresh server (`path`); --rooms-followers named long polls parked on one room. (1) Fan-out: one POST,
    time until all are answered, --rooms-fanout-rounds rounds (all re-park in between). (2) Posting:
    --rooms-posters keep-alive clients post to that room as fast as answered for --rooms-seconds, while every
    follower polls again (after the last id it got) as soon as it is answered."""
    srv = Server(ctx)
    srv.path = path
    srv.start()
    ctx.server_lines.add(srv.first_line)
    ctl = Ctl(srv.port)
    loop = Loop()
    room, n = ROOMS_PRESENCE_ROOM, ctx.rooms_followers
    res = {"kind": kind}
    errors = 0
    try:
        cursor = ctl.post(room, "start")
        st, on_wait, on_post = fanout_callbacks()
        poster = loop.connect(srv.port, on_post)
        t_park = now()
        conns, cerr, ok = park(ctx, srv.port, ctl, loop, n, lambda i: named_poll(room, cursor, i), on_wait, st,
                               timeout=ctx.park_timeout)
        res["park_s"] = rnd(now() - t_park)
        errors += cerr + st.early
        if not ok or outstanding(conns) != n:
            raise ProtocolError("only %d of %d followers parked" % (outstanding(conns), n))
        if kind == "new":
            status, pres = ctl.get_json("/rooms/%s/presence" % room)
            res["present"] = pres.get("count") if status == 200 else status
            if res["present"] != n:
                errors += 1
                log("presence: /presence says %s followers, %d parked" % (res["present"], n))
        rounds, posts = [], []
        for r in range(ctx.rooms_fanout_rounds):
            if r:
                st.t0 = None
                for c in conns:
                    c.send(named_poll(room, cursor, c.tag))
                ok, _ = wait_parked(ctl, loop, lambda: outstanding(conns), ctx.repark_bound)
                if not ok:
                    raise ProtocolError("round %d: followers did not re-park" % r)
            st.got, st.lat, st.post_t = 0, [], None
            cpu0 = srv.cpu()
            st.t0 = now()
            poster.send(post_request(room, "fan-out %d" % r))
            if not loop.run(lambda: st.got >= n and st.post_t is not None, ctx.fanout_bound):
                raise ProtocolError("round %d: %d of %d followers answered" % (r, st.got, n))
            if st.post_status != 201:
                raise ProtocolError("POST answered %s" % st.post_status)
            cursor = json.loads(st.post_body.decode("utf-8"))["id"]
            lat = sorted(st.lat)
            errors += n - len(lat)
            rounds.append(lat[-1] if len(lat) == n else None)
            posts.append(st.post_t - st.t0)
            settle_cpu(srv, 1.0)
            res.setdefault("fanout_cpu_us_per_follower", []).append(
                rnd((srv.cpu() - cpu0) / n * 1e6, 1) if cpu0 is not None else None)
        st.t0 = None
        res["fanout_rounds_ms"] = [ms(x) for x in rounds]
        res["fanout_ms"] = ms(median(rounds))
        res["fanout_post_ms"] = ms(median(posts))
        res["fanout_cpu_us"] = median(res["fanout_cpu_us_per_follower"])
        # (2) posting to the room while its followers keep following.
        for c in conns:
            c.send(named_poll(room, cursor, c.tag))
        ok, _ = wait_parked(ctl, loop, lambda: outstanding(conns), ctx.repark_bound)
        if not ok:
            raise ProtocolError("followers did not re-park before posting")
        ps = State(stop=False, t_start=0.0, t_end=0.0, lat=[], bad=0, done=0, ok=0, answers=0, delivered=0,
                   fbad=0, behind=0)
        mark = b'{"id":"'

        def on_follow(c, status, body, t):
            # A follower that fell more than the room's memory behind (410) skips to the newest message and
            # follows on from there, as a client that reconnects would: counted, not an error.
            if status == 410:
                ps.behind += 1
            elif status != 200:
                ps.fbad += 1
                if ps.fbad <= 3:
                    log("presence: follower answered %s %r" % (status, body[:120]))
                return
            i = body.rfind(mark)
            if ps.t_start <= t <= ps.t_end and status == 200:
                ps.answers += 1
                ps.delivered += body.count(mark)
            if ps.stop or c.dead:
                return
            if i >= 0 and status == 200:
                c.send(named_poll(room, body[i + 7:i + 43].decode("ascii"), c.tag))
            else:
                c.send(build_request("GET", "/rooms/%s/messages?tail=1&name=f%d" % (room, c.tag)))

        req = post_request(room, "posting beside %d followers" % n)

        def on_posted(c, status, body, t):
            if status != 201:
                ps.bad += 1
                if ps.bad <= 3:
                    log("presence: POST answered %s %r" % (status, body[:120]))
            else:
                ps.ok += 1
                if ps.t_start <= t <= ps.t_end:
                    ps.lat.append(t - c.t_sent)
            if t < ps.t_end and not c.dead:
                c.send(req)
            else:
                ps.done += 1

        for c in conns:
            c.on_resp = on_follow
        posters = [loop.connect(srv.port, on_posted) for _ in range(ctx.rooms_posters)]
        others = srv.others()
        cpu0, t0, me0 = srv.cpu(), now(), self_cpu()
        ps.t_start = t0 + ctx.post_warmup
        ps.t_end = ps.t_start + ctx.rooms_seconds
        for c in posters:
            c.send(req)
        loop.run(lambda: ps.done >= len(posters), ctx.post_warmup + ctx.rooms_seconds + 30)
        cpu1, t1, me1 = srv.cpu(), now(), self_cpu()
        ps.stop = True
        lat = sorted(ps.lat)
        res["posts_rps"] = round(len(lat) / ctx.rooms_seconds, 1)
        res["post_p50_ms"], res["post_p99_ms"] = ms(percentile(lat, 50)), ms(percentile(lat, 99))
        res["post_max_ms"] = ms(lat[-1]) if lat else None
        res["answers_per_s"] = round(ps.answers / ctx.rooms_seconds, 1)
        res["delivered_per_s"] = round(ps.delivered / ctx.rooms_seconds, 1)
        if cpu0 is not None:
            res["server_cpu_pct"] = rnd((cpu1 - cpu0) / (t1 - t0) * 100.0, 1)
            res["server_us_per_post"] = rnd((cpu1 - cpu0) / max(1, ps.ok) * 1e6, 1)
        res["bench_cpu_pct"] = rnd((me1 - me0) / (t1 - t0) * 100.0, 1)
        res["others_cpu_pct"] = others.pct()
        res["fell_behind"] = ps.behind         # 410s: followers that skipped to the newest message
        errors += ps.bad + ps.fbad + (len(posters) - ps.done) + st.bad
        res["dropped_by_server"] = loop.dropped
    finally:
        loop.close_all()
        ctl.close()
        res["server_exit"] = srv.stop()
    res["errors"] = errors
    return res


def scenario_rooms_presence(ctx):
    """presence_run on this server and on the one before presence, alternating, --rooms-runs each."""
    res = {"scenario": "rooms", "part": "presence", "followers": ctx.rooms_followers, "posters": ctx.rooms_posters,
           "seconds": ctx.rooms_seconds, "runs": ctx.rooms_runs}
    old_path, why = baseline_server(ctx, ctx.rooms_baseline, ROOMS_BASELINE_COMMIT)
    if why:
        res["skipped"] = "no server without presence to compare with: %s" % why
        return res
    res["baseline"] = "%s (%s)" % (ROOMS_BASELINE_COMMIT if ctx.rooms_baseline == "git" else "given", old_path)
    rows = {"old": [], "new": []}
    errors = 0
    for run_no in range(ctx.rooms_runs):
        for kind in (("old", "new") if run_no % 2 == 0 else ("new", "old")):
            r = guarded({"kind": kind}, presence_run, ctx, old_path if kind == "old" else ctx.server_path, kind)
            r["run"] = run_no + 1
            errors += r.get("errors", 0) + (1 if r.get("exception") else 0)
            rows[kind].append(r)
            log("rooms presence: %s server, run %d: fan-out to %d in %s ms (rounds %s), %s posts/s (p99 %s ms), "
                "%s answers/s (%s fell behind); server CPU %s %%, bench CPU %s %%, others %s %%" %
                (kind, run_no + 1, ctx.rooms_followers, r.get("fanout_ms"), r.get("fanout_rounds_ms"),
                 r.get("posts_rps"), r.get("post_p99_ms"), r.get("answers_per_s"), r.get("fell_behind"),
                 r.get("server_cpu_pct"),
                 r.get("bench_cpu_pct"), r.get("others_cpu_pct")))
    keys = ("fanout_ms", "fanout_post_ms", "fanout_cpu_us", "posts_rps", "post_p99_ms", "answers_per_s",
            "delivered_per_s", "fell_behind", "server_cpu_pct", "server_us_per_post", "bench_cpu_pct", "others_cpu_pct")
    for kind, rs in rows.items():
        res[kind] = {k: [r.get(k) for r in rs] for k in keys + ("fanout_rounds_ms", "park_s")}
        for k in keys:
            res["%s_%s" % (kind, k)] = median(res[kind][k])
    res["present"] = [r.get("present") for r in rows["new"]]
    for k in ("posts_rps", "fanout_ms", "answers_per_s"):
        ratios = [rnd(n[k] / o[k], 3) if n.get(k) and o.get(k) else None for n, o in zip(rows["new"], rows["old"])]
        res["ratio_" + k] = ratios
        res["ratio_%s_median" % k] = median(ratios)
    res["errors"] = errors
    return res


# ---------------------------------------------------------------------------------------------------
# Targets and the table


def num(x, fmt=None):
    """A float for the table: 3 significant digits, whole numbers from 1000 up; None as n/a."""
    if x is None:
        return "n/a"
    if fmt:
        return fmt % x
    return "%.0f" % x if abs(x) >= 1000 else "%.3g" % x


def targets_for(r, results):
    """Rows (measure, value text, target text, PASS/MISS/'') for one scenario result."""
    rows = []

    def row(measure, value, unit="", target=None, ok=None, fmt=None):
        vt = "n/a" if value is None else (num(value, fmt) if isinstance(value, float) else str(value)) + unit
        res = "" if target is None else ("PASS" if ok else "MISS")
        rows.append((measure, vt, target or "", res))

    sc = r["scenario"]
    if r.get("skipped"):
        rows.append(("skipped", r["skipped"][:70], "", "SKIP"))
        return rows
    if sc == "edge" and "complete_followers" in r:
        n = r["followers"]
        row("followers with every post once, in order", r["complete_followers"], "", "%d" % n,
            r["complete_followers"] == n)
        row("all followers have a post, median", r["all_have_ms_median"], " ms", "<= 1000 ms at 20,000",
            r["all_have_ms_median"] is not None and r["all_have_ms_median"] <= 1000)
        row("all followers have a post, max", r["all_have_ms_max"], " ms")
        row("the first follower has it, median", r["first_has_ms_median"], " ms")
        row("server connections, most", r["server_connections_max"], "", "<= 5",
            r["server_connections_max"] is not None and r["server_connections_max"] <= 5)
        row("server CPU per post", r["server_cpu_us_per_post"], " us")
        row("edge RSS per follower", r["edge_kib_per_follower"], " KiB")
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
    elif sc == "post" and r.get("phase") == "fanout":
        n = r["waiters"]
        row("fan-out: parked / errors", "%s / %s" % (r.get("parked"), r.get("park_errors")), "", "%d / 0" % n,
            r.get("parked") == n and not r.get("park_errors"))
        row("fan-out: all answered", r.get("all_ms"), " ms")
        row("fan-out: server's CPU taken by others", r.get("others_cpu_pct"), " %", fmt="%.0f")
        row("fan-out: all re-poll at once: re-parked", r.get("repark_s"), " s")
        row("fan-out: leave: new /healthz", r.get("leave_healthz_ms"), " ms")
        row("fan-out: leave: connections back", r.get("connections_back_s"), " s")
    elif sc == "post":
        c, db, phase = r["clients"], r["db"], r.get("phase", "fresh")

        def peer(db_, phase_):
            for x in results:
                if x.get("scenario") == "post" and x.get("db") == db_ and x.get("phase") == phase_ \
                        and x.get("clients") == c and x.get("rps"):
                    return x
            return None

        rps = r.get("rps")
        mem = peer("memory", phase) if db == "file" and c == 64 else None
        if db == "memory" and c == 16 and phase == "fresh":
            row("req/s", rps, "", ">= 11000", rps is not None and rps >= 11000, fmt="%.0f")
        elif mem:
            need = 0.8 * mem["rps"]
            row("req/s", rps, "", ">= %.0f (80%% of memory)" % need, rps is not None and rps >= need, fmt="%.0f")
        else:
            row("req/s", rps, "", fmt="%.0f")
        fresh = peer(db, "fresh") if phase == "after" and c == 64 else None
        if fresh:
            need = 0.9 * fresh["rps"]
            row("req/s against fresh", rps, "", ">= %.0f (90%% of fresh)" % need, rps is not None and rps >= need,
                fmt="%.0f")
        big = c == 64
        row("p99", r.get("p99_ms"), " ms", "<= 30 ms" if big else None,
            r.get("p99_ms") is not None and r["p99_ms"] <= 30)
        row("max", r.get("max_ms"), " ms", "<= 100 ms" if big else None,
            r.get("max_ms") is not None and r["max_ms"] <= 100)
        key = db == "memory" and c == 16 and phase == "fresh"
        row("server CPU / post", r.get("server_us_per_post"), " us", "<= 90 us" if key else None,
            r.get("server_us_per_post") is not None and r["server_us_per_post"] <= 90)
        if big or key:
            row("server's CPU taken by others", r.get("others_cpu_pct"), " %", fmt="%.0f")
    elif sc == "stream" and r.get("part") == "fanout":
        n = r["streams"]
        row("opened / errors", "%s / %s" % (r.get("opened"), r.get("open_errors")), "", "%d / 0" % n,
            r.get("opened") == n and not r.get("open_errors"))
        row("all have the event", r.get("all_ms"), " ms", "<= 150 ms" if n == 10000 else None,
            r.get("all_ms") is not None and r["all_ms"] <= 150)
        row("p50", r.get("p50_ms"), " ms")
        row("POST answered", r.get("post_ms"), " ms")
        row("server CPU / event, to last event", r.get("cpu_us_per_event_delivered"), " us")
        row("server CPU / event, all (settled)", r.get("cpu_us_per_event"), " us")
        row("server's CPU taken by others", r.get("others_cpu_pct"), " %", fmt="%.0f")
        poll = r.get("poll_rss_kib_per_waiter")
        row("RSS / stream", r.get("rss_kib_per_stream"), " KiB",
            "<= %.3g KiB (parked poll)" % poll if poll is not None else None,
            r.get("rss_kib_per_stream") is not None and poll is not None and r["rss_kib_per_stream"] <= poll)
        row("RSS / parked poll, for comparison", poll, " KiB")
        row("streams cut (/stats streams_cut)", r.get("streams_cut"), "", "0", r.get("streams_cut") == 0)
    elif sc == "stream":
        row("posts sent / planned (late, errors)", "%s / %s (%s, %s)" % (r.get("posts_sent"), r.get("posts_planned"),
                                                                        r.get("posts_late"), r.get("post_errors")))
        row("POST answered p99 / max", "%s / %s ms" % (num(r.get("post_p99_ms")), num(r.get("post_max_ms"))), "")
        row("events delivered / expected", "%s / %s" % (r.get("delivered"), r.get("expected")), "")
        row("delivered events/s", r.get("events_per_s"), "", fmt="%.0f")
        row("delay post sent -> received, p50", r.get("delay_p50_ms"), " ms")
        row("delay p99", r.get("delay_p99_ms"), " ms")
        row("delay max", r.get("delay_max_ms"), " ms")
        row("server CPU", r.get("server_cpu_pct"), " % of a core", fmt="%.0f")
        row("server CPU / event", r.get("cpu_us_per_event"), " us")
        row("server's CPU taken by others", r.get("others_cpu_pct"), " %", fmt="%.0f")
        row("reopened with Last-Event-ID / caught up", "%s / %s events (max %s ms)" %
            (r.get("reopened"), r.get("catchup_events"), num(r.get("catchup_max_ms"))), "")
        row("lost/dup/reordered", "%s/%s/%s" % (r.get("lost"), r.get("duplicated"), r.get("reordered")),
            "", "0/0/0", r.get("ordering_errors") == 0)
        row("not delivered by the end (10 s)", r.get("undelivered_at_end"), "", "0", r.get("undelivered_at_end") == 0)
        row("streams cut (/stats) while our %s were closed" % r.get("closed_by_us"),
            r.get("streams_cut_while_ours_closed"))
        row("streams cut (/stats) at other times", r.get("streams_cut_other"), "", "0", r.get("streams_cut_other") == 0)
    elif sc == "shards":
        k = r["shards"]

        def each(xs, fmt="%.0f", sep=" + "):
            return "n/a" if not xs or None in xs else sep.join(fmt % x for x in xs)

        row("layout", r.get("layout"))
        row("rooms per shard", each(r.get("rooms_per_shard"), "%d"))
        row("each room on one shard: /stats posts", "%s (expected %s)" % (
            each(r.get("posts_per_shard"), "%d"), each(r.get("posts_per_shard_expected"), "%d")), "",
            "= expected", r.get("rooms_on_one_shard") is True)
        row("posts/s through nginx", r.get("rps"), "", fmt="%.0f")
        if k > 1:
            row("posts/s, %d shards / 1 shard" % k, None if r.get("ratio_to_1_shard") is None else
                "%.2f x (%.0f / %.0f)" % (r["ratio_to_1_shard"], r["rps"], r["rps_1_shard"]))
        row("p50 / p99 / max", "%s / %s / %s ms" % (num(r.get("p50_ms")), num(r.get("p99_ms")), num(r.get("max_ms"))))
        row("CPU: shard%s" % ("" if k == 1 else "s"), each(r.get("shard_cpu_pct")), " % of a core")
        row("CPU: nginx (%d worker%s)" % (r.get("nginx_workers", 1), "" if r.get("nginx_workers", 1) == 1 else "s"),
            r.get("nginx_cpu_pct"), " % of a core", fmt="%.0f")
        row("CPU: load generator (TLS client)", r.get("load_cpu_pct"), " % of a core", fmt="%.0f")
        row("CPU: irq/softirq (loopback)", r.get("irq_cpu_pct"), " % of a core", fmt="%.0f")
        row("CPU taken by others (not ours; steal %s %%)" % num(r.get("steal_cpu_pct"), "%.0f"),
            r.get("others_cpu_pct"), " % of a core", fmt="%.0f")
        row("CPU / post: shard%s, nginx, load gen" % ("" if k == 1 else "s"), "%s, %s, %s us" % (
            num(r.get("shard_us_per_post"), "%.0f"), num(r.get("nginx_us_per_post"), "%.0f"),
            num(r.get("load_us_per_post"), "%.0f")))
        row("reconnects (nginx keepalive_requests)", r.get("reconnects"))
        row("posts failed", r.get("post_errors"), "", "0", r.get("post_errors") == 0)
        n = r.get("fanout_waiters")
        row("fan-out: %s waiters parked" % n, each(r.get("fanout_parked"), "%d"), "", "%s / 0 errors" % n,
            sum(r.get("fanout_parked") or [0]) == n and not r.get("fanout_park_errors"))
        row("fan-out: 1 POST per room: all answered", r.get("fanout_all_ms"), " ms")
        if k > 1:
            row("fan-out: all answered, per shard", each(r.get("fanout_shard_all_ms"), "%.3g", " / "), " ms")
            if r.get("fanout_all_ms_1_shard"):
                row("fan-out: all answered, 1 shard for comparison", r.get("fanout_all_ms_1_shard"), " ms")
        row("fan-out: p50 / p99", "%s / %s ms" % (num(r.get("fanout_p50_ms")), num(r.get("fanout_p99_ms"))))
        row("fan-out: the 8 POSTs answered (last)", r.get("fanout_posts_max_ms"), " ms")
        fc = r.get("fanout_cpu_ms") or {}
        row("fan-out: CPU shard%s / nginx / load gen" % ("" if k == 1 else "s"), "%s / %s / %s ms" % (
            each(fc.get("shards"), "%.0f"), num(fc.get("nginx"), "%.0f"), num(fc.get("load"), "%.0f")))
        row("fan-out: CPU taken by others (parking + fan-out)", r.get("fanout_others_cpu_pct"), " % of a core",
            fmt="%.0f")
        row("fan-out: failed", r.get("fanout_errors"), "", "0", r.get("fanout_errors") == 0)
    elif sc == "identity":
        for kind, what in (("none", "no token (anonymous room)"), ("shared", "the shared --token"),
                           ("jwt", "a JWT each")):
            x = r.get(kind) or {}
            row("%s: posts/s, p99" % what, "%s, %s ms (medians of %s; %s ms)" % (
                num(r.get(kind + "_rps"), "%.0f"), num(r.get(kind + "_p99_ms")),
                ", ".join("%.0f" % v for v in x.get("rps", [])), ", ".join(num(v) for v in x.get("p99_ms", []))))
            row("%s: server CPU / post" % what, "%s us (%s)" % (num(r.get(kind + "_us_per_post"), "%.0f"),
                                                               ", ".join(num(v, "%.0f") for v in x.get("us_per_post", []))))
        extra = r.get("jwt_over_shared_us")
        row("JWT over the shared token, CPU / post", extra, " us", "<= %.0f us" % IDENTITY_US_TARGET,
            extra is not None and extra <= IDENTITY_US_TARGET, fmt="%.1f")
        for key, what in (("without", "JWT posters alone"), ("with", "beside refused tokens"),
                          ("valid", "beside valid-token GETs (control)")):
            x = r.get("flood_" + key) or {}
            row("%s: posts/s, p99" % what, "%s, %s ms (%s ms)" % (
                num(r.get("flood_%s_rps" % key), "%.0f"), num(r.get("flood_%s_p99_ms" % key)),
                ", ".join(num(v) for v in x.get("p99_ms", []))))
        x = r.get("flood_with") or {}
        row("refused tokens: 401s / s, late", "%s (%s), late %s" % (
            num(r.get("refused_per_s"), "%.0f"), ", ".join(num(v, "%.0f") for v in x.get("refused_per_s", [])),
            ", ".join(str(v) for v in x.get("late", []))), "", ">= %.0f / s" % (0.95 * r.get("bad_rate", 0)),
            (r.get("refused_per_s") or 0) >= 0.95 * r.get("bad_rate", 0))
        row("server CPU / refused token; / valid-token GET", "%s / %s us" % (
            num(r.get("with_us_per_request"), "%.0f"), num(r.get("valid_us_per_request"), "%.0f")))
        row("p99 beside valid-token GETs / alone (control)", r.get("valid_p99_ratio"), "", fmt="%.3f")
        ratio = r.get("p99_ratio")
        row("p99 with refused tokens / without", ratio, "", "<= %.2f" % IDENTITY_P99_RATIO_TARGET,
            ratio is not None and ratio <= IDENTITY_P99_RATIO_TARGET, fmt="%.3f")
    elif sc == "rooms" and r.get("part") == "list":
        row("rooms listed / answer", "%s / %s KiB" % (r.get("listed"), num((r.get("answer_bytes") or 0) / 1024.0)))
        row("GET /rooms p50 / max", "%s / %s ms" % (num(r.get("p50_ms")), num(r.get("max_ms"))))
        row("GET /rooms p99", r.get("p99_ms"), " ms", "<= %.0f ms" % ROOMS_LIST_P99_TARGET_MS,
            r.get("p99_ms") is not None and r["p99_ms"] <= ROOMS_LIST_P99_TARGET_MS)
        row("requests over 5 ms", "%s of %s" % (r.get("over_target"), r.get("n")))
        row("server CPU / request", r.get("server_us_per_request"), " us")
    elif sc == "rooms" and r.get("part") == "scroll":
        row("database built", "%s MiB in %s s" % (num(r.get("db_mib")), num(r.get("build_s"))))
        row("pages / messages received", "%s / %s" % (r.get("pages"), r.get("received")), "", "%d / %d" % (
            -(-r["messages"] // r["limit"]), r["messages"]),
            r.get("received") == r["messages"] and not r.get("misordered_pages"))
        row("page p50 / p99", "%s / %s ms" % (num(r.get("p50_ms")), num(r.get("p99_ms"))))
        row("page max", r.get("max_ms"), " ms", "<= %.0f ms" % ROOMS_PAGE_TARGET_MS,
            r.get("max_ms") is not None and r["max_ms"] <= ROOMS_PAGE_TARGET_MS)
        row("pages over 5 ms", r.get("over_target"), "", "0", r.get("over_target") == 0)
        row("server CPU / page", r.get("server_us_per_page"), " us")
    elif sc == "rooms" and r.get("part") == "presence":
        for kind, what in (("old", "without presence (%s)" % ROOMS_BASELINE_COMMIT), ("new", "with presence")):
            x = r.get(kind) or {}
            row("%s: fan-out to all" % what, "%s ms (%s)" % (num(r.get(kind + "_fanout_ms")), ", ".join(
                num(v) for v in x.get("fanout_ms", []))))
            row("%s: posts/s, p99" % what, "%s, %s ms (%s; %s ms)" % (
                num(r.get(kind + "_posts_rps"), "%.0f"), num(r.get(kind + "_post_p99_ms")),
                ", ".join(num(v, "%.0f") for v in x.get("posts_rps", [])),
                ", ".join(num(v) for v in x.get("post_p99_ms", []))))
            row("%s: answers/s (410s); CPU server / bench" % what, "%s (%s); %s / %s %% (others %s %%)" % (
                num(r.get(kind + "_answers_per_s"), "%.0f"), num(r.get(kind + "_fell_behind"), "%.0f"), num(r.get(kind + "_server_cpu_pct"), "%.0f"),
                num(r.get(kind + "_bench_cpu_pct"), "%.0f"), num(r.get(kind + "_others_cpu_pct"), "%.0f")))
        row("presence count (new)", ", ".join(str(v) for v in r.get("present", [])), "", str(r["followers"]),
            all(v == r["followers"] for v in r.get("present", [])) and bool(r.get("present")))
        ratio = r.get("ratio_posts_rps_median")
        row("posts/s new / old (runs)", "%s (%s)" % (num(ratio, "%.3f"), ", ".join(
            num(v, "%.3f") for v in r.get("ratio_posts_rps", []))), "", ">= %.2f" % (1 - ROOMS_PRESENCE_TOLERANCE),
            ratio is not None and ratio >= 1 - ROOMS_PRESENCE_TOLERANCE)
        ratio = r.get("ratio_fanout_ms_median")
        row("fan-out time new / old (runs)", "%s (%s)" % (num(ratio, "%.3f"), ", ".join(
            num(v, "%.3f") for v in r.get("ratio_fanout_ms", []))), "", "<= %.2f" % (1 + ROOMS_PRESENCE_TOLERANCE),
            ratio is not None and ratio <= 1 + ROOMS_PRESENCE_TOLERANCE)
        row("answers/s new / old (runs)", "%s (%s)" % (num(r.get("ratio_answers_per_s_median"), "%.3f"), ", ".join(
            num(v, "%.3f") for v in r.get("ratio_answers_per_s", []))))
    elif sc == "backup" and r.get("part") == "posting":
        for kind, what in (("old", "previous server (%s, EXCLUSIVE)" % BACKUP_BASELINE_COMMIT),
                           ("new", "this server (OS lock)")):
            x = r.get(kind) or {}
            row("%s: posts/s" % what, "%s (median of %s)" % (num(r.get(kind + "_rps"), "%.0f"),
                                                          ", ".join("%.0f" % v for v in x.get("rps", []))))
            row("%s: p99 / max" % what, "%s / %s ms" % (num(r.get(kind + "_p99_ms")), num(r.get(kind + "_max_ms"))))
        ratio = r.get("ratio")
        row("posts/s, new / old", ratio, "", ">= %.2f" % BACKUP_POST_RATIO_TARGET,
            ratio is not None and ratio >= BACKUP_POST_RATIO_TARGET, fmt="%.3f")
    elif sc == "backup":
        row("database", "%s MiB (built in %s s)" % (num((r.get("db_bytes") or 0) / 1048576.0, "%.0f"),
                                                   num(r.get("build_s"))))

        def lat(key, label, target):
            x = r.get(key)
            if not isinstance(x, dict):
                row(label, x)
                return
            row(label + ": posts/s, p50 / p99", "%s, %s / %s ms" % (num(x.get("rps"), "%.0f"), num(x.get("p50_ms")),
                                                                   num(x.get("p99_ms"))))
            row(label + ": max", x.get("max_ms"), " ms", target and "<= %.0f ms" % BACKUP_MAX_MS_TARGET,
                x.get("max_ms") is not None and x["max_ms"] <= BACKUP_MAX_MS_TARGET)
        lat("alone", "posting alone", False)
        row("backup: time, exit", "%s s, %s" % (num(r.get("backup_s")), r.get("backup_exit")))
        lat("during_backup", "during the backup", True)
        if isinstance(r.get("litestream"), str):
            row("litestream", r["litestream"])
        else:
            row("Litestream: first snapshot", r.get("litestream_snapshot_s"), " s")
            lat("during_litestream_snapshot", "during its snapshot", True)
            lat("while_litestream_replicates", "while it replicates", True)
            row("Litestream: 'database is locked' / errors", "%s / %s" % (r.get("litestream_locked"),
                                                                       len(r.get("litestream_errors") or [])),
                "", "0 / 0", not r.get("litestream_locked") and not r.get("litestream_errors"))
    elif sc == "order":
        row("lost/dup/reordered", "%s/%s/%s" % (r.get("lost"), r.get("duplicated"), r.get("reordered")),
            "", "0/0/0", r.get("ordering_errors") == 0 and not r.get("errors"))
    elif sc == "adversarial":
        if r.get("aborted"):
            rows.append(("aborted", r["aborted"], "", "MISS"))
        row("RSS before the burst", r.get("rss_before_mib"), " MiB")
        peak = r.get("rss_peak_mib")
        row("RSS peak (VmHWM)", peak, " MiB", "<= %.0f MiB (README)" % README_RSS_BOUND_MIB,
            peak is not None and peak <= README_RSS_BOUND_MIB and not r.get("aborted"))
        row("RSS at the end", r.get("rss_end_mib"), " MiB")
        row("server CPU", r.get("server_cpu_s"), " s")
        if r.get("part") == "order":
            for kind in ("streams", "followers"):
                x = r.get(kind) or {}
                row("%s: lost/dup/reordered" % kind, "%s/%s/%s" % (x.get("lost"), x.get("duplicated"),
                                                                   x.get("reordered")),
                    "", "0/0/0", x and not (x.get("lost") or x.get("duplicated") or x.get("reordered")
                                            or x.get("foreign")))
                if x.get("worst"):
                    row("%s: worst" % kind, x["worst"])
            row("streams cut by the server / reconnects",
                "%s / %s" % (r.get("stream_cuts"), r.get("stream_reconnects")))
            row("every reader has the last id", r.get("drained"), "", "True", r.get("drained") is True)
        else:
            row("parked", r.get("parked"), "", str(r["clients"]), r.get("parked") == r["clients"])
            wake = r.get("other_room_wake_ms")
            row("other room's poll woken", wake if wake is not None else r.get("other_room_wake") or
                r.get("other_room_answer"), " ms" if wake is not None else "", "<= %.0f ms" % ADV_WAKE_TARGET_MS,
                wake is not None and wake <= ADV_WAKE_TARGET_MS)
            row("other room's POST answered", r.get("other_post_ms"), " ms")
            row("burst POSTs answered (last)", "%s (%s ms)" % (r.get("burst_answered"), num(r.get("burst_max_ms"))))
            if r.get("part") == "streams":
                row("streams cut (/stats)", r.get("streams_cut"))
    if r.get("ended_by_server"):
        rows.append(("streams ended by the server", str(r["ended_by_server"]), "0", "FAIL"))
    if r.get("dropped_by_server") or r.get("connections_dropped"):
        rows.append(("connections dropped by server", str(r.get("dropped_by_server") or r.get("connections_dropped")),
                     "0", "FAIL"))
    if r.get("errors"):
        rows.append(("errors", str(r["errors"]), "0", "FAIL"))
    return rows


def size_label(r):
    sc = r["scenario"]
    if sc == "edge":
        return "%d followers" % r.get("followers", 0)
    if sc in ("wake", "fanout", "idle"):
        return "%d waiter%s" % (r["waiters"], "" if r["waiters"] == 1 else "s")
    if sc == "post":
        if r.get("phase") == "fanout":
            return "%s, %s fan-out" % (r.get("db"), count_label(r.get("waiters", 0)))
        c = r.get("clients", 0)
        label = "%s, %d client%s" % (r.get("db"), c, "" if c == 1 else "s")
        if r.get("phase") == "after":
            label += ", after %s fan-out" % count_label(r.get("fanout_waiters", 0))
        return label
    if sc == "stream":
        if r.get("part") == "fanout":
            return "%d streams" % r["streams"]
        return "%d streams, %g/s x %gs" % (r["streams"], r.get("rate", 0), r.get("seconds", 0))
    if sc == "order":
        return "%dx%d, %d msgs" % (r["posters"], r["followers"], r["messages"])
    if sc == "adversarial":
        what = {"polls": "%d polls", "streams": "%d streams", "order": "order, %dx2 readers"}.get(r.get("part"), "%d")
        return (what % r.get("clients", 0)) + ", run %d" % r.get("run", 1)
    if sc == "identity":
        return "memory, %d clients" % r.get("clients", 0)
    if sc == "rooms":
        if r.get("part") == "list":
            return "%s, %d rooms" % (r.get("db"), r.get("rooms", 0))
        if r.get("part") == "scroll":
            return "file, %s msgs, %d a page" % (count_label(r.get("messages", 0)), r.get("limit", 0))
        return "%s polls, %d posters, new vs old" % (count_label(r.get("followers", 0)), r.get("posters", 0))
    if sc == "backup":
        if r.get("part") == "posting":
            return "file, %d clients, old vs new" % r.get("clients", 0)
        return "%d MiB db, %d clients" % (r.get("db_mib", 0), r.get("clients", 0))
    if sc == "shards" and r.get("shards"):
        return "%d shard%s, %d clients, %d rooms, TLS" % (r["shards"], "" if r["shards"] == 1 else "s",
                                                         r.get("clients", 0), r.get("rooms", 0))
    return ""


def count_label(n):
    """10000 -> '10k', 200 -> '200'."""
    return "%dk" % (n // 1000) if n >= 1000 and n % 1000 == 0 else str(n)


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
# Edge: one room's followers through the README's Varnish edge (issue 26; only with --only edge)

EDGE_VCL = "# /etc/varnish/chat-edge.vcl:"
VARNISHD = shutil.which("varnishd") or ("/usr/sbin/varnishd" if os.path.exists("/usr/sbin/varnishd") else None)


def edge_prerequisites():
    """(the README's VCL, its varnishd line, its server line, None), or (None, None, None, why we skip)."""
    path = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "README.md"))
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        return None, None, None, "no README.md beside bench/ (%s): the VCL comes from it" % e.strerror
    blocks = [b for b in re.findall(r"```vcl\n(.*?)```", text, re.S) if b.startswith(EDGE_VCL)]
    varnishd = [l.strip() for l in text.splitlines() if l.strip().startswith("varnishd ")]
    server = [l.strip() for l in text.splitlines() if l.strip().startswith("python3 chat_server.py") and "--edge-cache" in l]
    if len(blocks) != 1 or not varnishd or not server:
        return None, None, None, "README.md: the edge's VCL, varnishd line or server line is missing"
    if not VARNISHD:
        return None, None, None, "varnishd is not installed (apt-get install varnish)"
    return blocks[0], varnishd[0], server[0], None


def edge_follower_proc(port, path, first, count, sources, conn, after0):
    """One process of followers: `count` keep-alive long polls through the edge, each recording the ids it gets."""
    try:
        os.sched_setaffinity(0, range(os.cpu_count() or 1))
    except (AttributeError, OSError):
        pass
    sel = selectors.DefaultSelector()
    got, seqs, statuses, errors = {}, [], {}, 0

    def request(after):
        return ("GET %s?after=%s HTTP/1.1\r\nHost: chat.example.org\r\n\r\n" % (path, after)).encode()
    for i in range(count):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((sources[(first + i) % len(sources)], 0))
        s.connect((HOST, port))
        s.setblocking(False)
        st = [s, bytearray(), after0, []]
        seqs.append(st[3])
        sel.register(s, selectors.EVENT_READ, st)
        s.send(request(after0))
    conn.send(("ready", count))
    while True:
        if conn.poll() and conn.recv() == "stop":
            break
        for key, _ in sel.select(0.05):
            st = key.data
            s, buf = st[0], st[1]
            try:
                data = s.recv(262144)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:
                errors += 1
                sel.unregister(s)
                s.close()
                continue
            buf += data
            while True:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    break
                head = bytes(buf[:end]).decode("latin-1")
                m = re.search(r"(?im)^content-length:\s*(\d+)", head)
                length = int(m.group(1)) if m else 0
                if len(buf) < end + 4 + length:
                    break
                status = int(head[9:12])
                statuses[status] = statuses.get(status, 0) + 1
                body = bytes(buf[end + 4:end + 4 + length])
                del buf[:end + 4 + length]
                t = time.time()
                if status == 200:
                    items = json.loads(body)
                    for msg in items:
                        st[3].append(msg["id"])
                        g = got.get(msg["id"])
                        if g is None:
                            got[msg["id"]] = [1, t, t]
                        else:
                            g[0] += 1
                            g[2] = t
                    if items:
                        st[2] = items[-1]["id"]
                s.send(request(st[2]))
        if got:
            conn.send(("got", got))
            got = {}
    conn.send(("done", seqs, errors, statuses))


def edge_rss_kib(pid):
    """RSS of varnishd's manager and its child (the cache process), in KiB."""
    total = proc_rss_kib(pid) or 0
    for child in proc_children(pid):
        total += proc_rss_kib(child) or 0
    return total


def scenario_edge(ctx, n, posts, vcl, varnishd_line, server_line):
    import http.client
    import multiprocessing
    d = tempfile.mkdtemp(prefix="bench-edge-")
    os.chmod(d, 0o755)
    sport, eport = free_port(), free_port()
    args = shlex.split(server_line)[2:]
    set_flag(args, "--port", str(sport))
    set_flag(args, "--db", ":memory:")
    srv = subprocess.Popen([sys.executable, ctx.server_path, "--quiet"] + args, stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL)
    edge = None
    pipes, procs = [], []
    try:
        if b"serving on" not in srv.stdout.readline():
            raise ProtocolError("the server did not start")
        with open(os.path.join(d, "chat-edge.vcl"), "w") as f:
            f.write(vcl.replace('.port = "8080";', '.port = "%d";' % sport))
        vargs = shlex.split(varnishd_line)
        set_flag(vargs, "-a", "%s:%d" % (HOST, eport))
        set_flag(vargs, "-f", os.path.join(d, "chat-edge.vcl"))
        edge = subprocess.Popen([VARNISHD] + vargs[1:] + ["-F", "-n", os.path.join(d, "varnish")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                preexec_fn=lambda: os.sched_setaffinity(0, range(os.cpu_count() or 1)))
        t0 = now()
        while True:
            try:
                socket.create_connection((HOST, eport), 1).close()
                break
            except OSError:
                if now() - t0 > 30 or edge.poll() is not None:
                    raise ProtocolError("varnishd did not start")
                time.sleep(0.1)

        def post(i):
            c = http.client.HTTPConnection(HOST, sport, timeout=CTL_TIMEOUT_S)
            c.request("POST", "/rooms/edge/messages", json.dumps({"body": "edge %d" % i}),
                      {"Content-Type": "application/json", "Host": "chat.example.org"})
            r = c.getresponse()
            mid = json.loads(r.read())["id"]
            c.close()
            return mid

        def stats():
            c = http.client.HTTPConnection(HOST, sport, timeout=CTL_TIMEOUT_S)
            c.request("GET", "/stats", headers={"Host": "chat.example.org"})
            s = json.loads(c.getresponse().read())
            c.close()
            return s
        first = post(-1)
        time.sleep(1.0)
        rss0 = edge_rss_kib(edge.pid)
        sources = ["127.0.%d.%d" % (k // 250, 1 + k % 250) for k in range(1, 2 + n // 4000)]   # 4,000 ports each
        workers = max(1, min(8, (n + 9999) // 10000))
        per = (n + workers - 1) // workers
        for w in range(workers):
            a, b = multiprocessing.Pipe()
            p = multiprocessing.Process(target=edge_follower_proc,
                                        args=(eport, "/rooms/edge/messages", w * per, min(per, n - w * per),
                                              sources, b, first))
            p.start()
            pipes.append(a)
            procs.append(p)
        for a in pipes:
            if not a.poll(300) or a.recv()[0] != "ready":
                raise ProtocolError("followers did not connect")
        time.sleep(3.0)
        rss1 = edge_rss_kib(edge.pid)
        got = {}

        def pump(wait):
            for a in pipes:
                while a.poll(wait if a is pipes[0] else 0):
                    m = a.recv()
                    for k, (c, t1, t2) in m[1].items():
                        g = got.setdefault(k, [0, t1, t2])
                        if g[0]:
                            g[1], g[2] = min(g[1], t1), max(g[2], t2)
                        g[0] += c
                    wait = 0
        cpu0 = proc_cpu_seconds(srv.pid)
        all_have, first_has, conns, ids = [], [], [], []
        for i in range(posts):
            t = time.time()
            mid = post(i)
            ids.append(mid)
            end = now() + 30
            while now() < end and got.get(mid, [0])[0] < n:
                pump(0.02)
            g = got.get(mid)
            if g and g[0] >= n:
                all_have.append(g[2] - t)
                first_has.append(g[1] - t)
            conns.append(stats().get("connections", 0))
            time.sleep(0.2)
        cpu = proc_cpu_seconds(srv.pid) - cpu0
        seqs, errors, statuses = [], 0, {}
        for a in pipes:
            a.send("stop")
        for a in pipes:
            while True:
                m = a.recv()
                if m[0] == "done":
                    seqs += m[1]
                    errors += m[2]
                    for k, v in m[3].items():
                        statuses[k] = statuses.get(k, 0) + v
                    break
        complete = sum(1 for s in seqs if s == ids)
        all_have.sort()
        first_has.sort()
        spread = sorted(b - a for a, b in zip(first_has, all_have))
        return {"scenario": "edge", "followers": n, "posts": posts, "complete_followers": complete,
                "errors": (n - complete) + errors, "answers_by_status": {str(k): v for k, v in statuses.items()},
                "all_have_ms_median": ms(median(all_have)) if all_have else None,
                "all_have_ms_p90": ms(percentile(all_have, 90)) if all_have else None,
                "all_have_ms_max": ms(all_have[-1]) if all_have else None,
                "first_has_ms_median": ms(median(first_has)) if first_has else None,
                "posts_missing": posts - len(all_have),
                "server_connections_max": max(conns) if conns else None,
                "server_cpu_us_per_post": rnd(cpu / posts * 1e6, 0),
                "edge_rss_kib_idle": rss0, "edge_rss_kib_parked": rss1,
                "edge_kib_per_follower": rnd((rss1 - rss0) / n, 2) if rss0 and rss1 else None,
                "sources": len(sources), "follower_processes": workers}
    finally:
        for a in pipes:
            try:
                a.send("stop")
            except OSError:
                pass
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.terminate()
        if edge is not None:
            terminate(edge, "varnishd")
        terminate(srv, "server")
        shutil.rmtree(d, True)


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
    ctx.cpus = None                         # every CPU we may use, when pinning (the shards scenario's layout)
    ctx.pinning = "not pinned"
    if pin and hasattr(os, "sched_getaffinity") and shutil.which("taskset"):
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) >= 2:
            ctx.cpus = cpus
            ctx.server_cpu = cpus[0]
            os.sched_setaffinity(0, {cpus[1]})
            ctx.pinning = "server on CPU %d, load generator on CPU %d" % (cpus[0], cpus[1])


def main(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__[__doc__.index("Scenarios\n"):],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smallest sizes of every scenario, in about 15 s (a unit test runs it)")
    p.add_argument("--only", default=",".join(DEFAULT_SCENARIOS),
                   help="comma list of %s (default all but %s)" % (",".join(SCENARIOS), ", ".join(NAMED_ONLY)))
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
    p.add_argument("--post-seconds", type=float, help="default 3; quick 0.3")
    p.add_argument("--post-db", default="memory,file",
                   help="memory,file (default both; the file-vs-memory targets need both)")
    p.add_argument("--post-fanout", type=int,
                   help="long polls fanned out on the posting server between the fresh and the "
                        "'after' rows (default 10000; quick 200)")
    p.add_argument("--order-posters", type=int, default=4)
    p.add_argument("--order-followers", type=int, default=4)
    p.add_argument("--order-messages", type=int, help="per poster (default 200; quick 25)")
    p.add_argument("--stream-sizes", type=parse_ints, help="streams in the stream fan-out, (a) (default 10000; quick 200)")
    p.add_argument("--stream-rate-streams", type=int, help="streams in the paced run, (b) and (c) (default 1000; quick 50)")
    p.add_argument("--stream-rate-seconds", type=float, help="length of the paced run (default 10; quick 1)")
    p.add_argument("--stream-rate", type=float, default=100.0, help="posts per second in the paced run (default 100)")
    p.add_argument("--stream-reconnects", type=int,
                   help="streams closed and reopened with Last-Event-ID mid-run, (c) (default 30%% of the paced run's)")
    p.add_argument("--shard-clients", type=int, help="shards: keep-alive posting clients through nginx (default 32; quick 4)")
    p.add_argument("--shard-seconds", type=float, help="shards: length of each posting run (default 3; quick 0.3)")
    p.add_argument("--shard-waiters", type=int, help="shards: long polls in the fan-out through nginx (default 1000; quick 40)")
    p.add_argument("--shard-nginx-workers", type=int, default=1,
                   help="shards: nginx worker_processes (default 1, as the tests' private nginx)")
    p.add_argument("--adversarial-polls", type=int, help="adversarial (a): non-reading polls (default 3000; quick 100)")
    p.add_argument("--adversarial-streams", type=int,
                   help="adversarial (b): non-reading streams (default 1500; quick 50)")
    p.add_argument("--adversarial-readers", type=int,
                   help="adversarial (c): reading streams, and as many followers (default 200; quick 10)")
    p.add_argument("--adversarial-bursts", type=int, help="adversarial (c): bursts of 64 posts (default 3; quick 2)")
    p.add_argument("--adversarial-hold", type=float,
                   help="adversarial (a), (b): seconds watched after the burst (default 30, past the server's "
                        "30 s --idle-timeout for answers not read; quick 1)")
    p.add_argument("--adversarial-runs", type=int, default=1, help="adversarial: runs of each part (default 1)")
    p.add_argument("--adversarial-parts", default="polls,streams,order", help="adversarial: which parts")
    p.add_argument("--adversarial-db", default="memory", choices=("memory", "file"),
                   help="adversarial: the server's database (default memory)")
    p.add_argument("--backup-baseline", default="git",
                   help="backup: the previous server to compare posting with (default: git show %s:chat_server.py, "
                        "the last commit with EXCLUSIVE locking)" % BACKUP_BASELINE_COMMIT)
    p.add_argument("--backup-post-clients", type=int, default=64, help="backup: posting clients, old vs new (64)")
    p.add_argument("--backup-post-seconds", type=float, help="backup: each posting row, old vs new (default 3; quick 0.5)")
    p.add_argument("--backup-rounds", type=int, help="backup: posting rows per server, alternating (default 3; quick 1)")
    p.add_argument("--backup-db-mib", type=int, help="backup: the database copied (default 1024 MiB; quick 32)")
    p.add_argument("--backup-clients", type=int, default=16,
                   help="backup: posting clients while the backup and Litestream read the file (default 16)")
    p.add_argument("--backup-seconds", type=float, help="backup: posting alone, and with Litestream x2 (default 3; quick 1)")
    p.add_argument("--identity-clients", type=int, default=16, help="identity: posting clients (16)")
    p.add_argument("--identity-seconds", type=float, help="identity: each row (default 3; quick 0.3)")
    p.add_argument("--identity-rounds", type=int, help="identity: rounds of each row (default 3; quick 1)")
    p.add_argument("--identity-bad-rate", type=float, default=2000.0,
                   help="identity: refused tokens a second beside the JWT posters (2000)")
    p.add_argument("--edge-followers", type=int, help="edge: followers of one room through one Varnish (default 19000; quick 200)")
    p.add_argument("--edge-posts", type=int, help="edge: posts, each awaited by every follower (default 100; quick 5)")
    p.add_argument("--rooms-parts", default="list,scroll,presence", help="rooms: which parts (list,scroll,presence)")
    p.add_argument("--rooms-dbs", default="memory,file", help="rooms (a): the stores GET /rooms is measured on")
    p.add_argument("--rooms-count", type=int, help="rooms (a): rooms with one message each (default 1000; quick 50)")
    p.add_argument("--rooms-requests", type=int, help="rooms (a): GET /rooms timed (default 2000; quick 100)")
    p.add_argument("--rooms-warmup", type=int, default=20, help="rooms (a): GET /rooms not timed first (20)")
    p.add_argument("--rooms-messages", type=int, help="rooms (b): messages paged through (default 100000; quick 2000)")
    p.add_argument("--rooms-page", type=int, default=100, help="rooms (b): limit of each before= page (100)")
    p.add_argument("--rooms-followers", type=int, help="rooms (c): parked polls on one room (default 10000; quick 200)")
    p.add_argument("--rooms-posters", type=int, default=16, help="rooms (c): posting clients (16)")
    p.add_argument("--rooms-seconds", type=float, help="rooms (c): each posting run (default 3; quick 0.5)")
    p.add_argument("--rooms-fanout-rounds", type=int, help="rooms (c): fan-outs per server (default 5; quick 2)")
    p.add_argument("--rooms-runs", type=int, help="rooms (c): runs of each server, alternating (default 3; quick 1)")
    p.add_argument("--rooms-baseline", default="git",
                   help="rooms (c): the server without presence (default: git show %s:chat_server.py)"
                        % ROOMS_BASELINE_COMMIT)
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
    ctx.post_seconds = a.post_seconds or (0.3 if q else 3.0)
    ctx.post_warmup = 0.1 if q else 0.3
    ctx.post_dbs = [x for x in a.post_db.split(",") if x in ("memory", "file")]
    ctx.post_fanout = a.post_fanout or (200 if q else 10000)
    ctx.stream_sizes = a.stream_sizes or ([200] if q else [10000])
    ctx.stream_rate_streams = a.stream_rate_streams or (50 if q else 1000)
    ctx.stream_rate_seconds = a.stream_rate_seconds or (1.0 if q else 10.0)
    ctx.stream_rate = a.stream_rate if a.stream_rate > 0 else 100.0
    ctx.stream_reconnects = (a.stream_reconnects if a.stream_reconnects is not None
                             else max(1, ctx.stream_rate_streams * 3 // 10))
    ctx.order_posters, ctx.order_followers = a.order_posters, a.order_followers
    ctx.order_messages = a.order_messages or (25 if q else 200)
    ctx.order_bound = 10.0 if q else 30.0
    ctx.batch = max(1, a.batch)
    ctx.shard_clients = max(1, a.shard_clients or (4 if q else 32))
    ctx.shard_seconds = a.shard_seconds or (0.3 if q else 3.0)
    ctx.shard_waiters = max(1, a.shard_waiters or (40 if q else 1000))
    ctx.shard_nginx_workers = max(1, a.shard_nginx_workers)
    ctx.adv_polls = max(1, a.adversarial_polls or (100 if q else 3000))
    ctx.adv_streams = max(1, a.adversarial_streams or (50 if q else 1500))
    ctx.adv_readers = max(1, a.adversarial_readers or (10 if q else 200))
    ctx.adv_bursts = max(1, a.adversarial_bursts or (2 if q else 3))
    ctx.adv_hold = a.adversarial_hold if a.adversarial_hold is not None else (1.0 if q else 30.0)
    ctx.adv_runs = max(1, a.adversarial_runs)
    ctx.adv_parts = [x for x in a.adversarial_parts.split(",") if x in ("polls", "streams", "order")]
    ctx.adv_db = a.adversarial_db
    ctx.adv_order_bound = 20.0 if q else 60.0
    ctx.backup_baseline = a.backup_baseline
    ctx.backup_post_clients = max(1, a.backup_post_clients)
    ctx.backup_post_seconds = a.backup_post_seconds or (0.5 if q else 3.0)
    ctx.backup_rounds = max(1, a.backup_rounds or (1 if q else 3))
    ctx.backup_db_mib = max(1, a.backup_db_mib or (32 if q else 1024))
    ctx.backup_clients = max(1, a.backup_clients)
    ctx.backup_seconds = a.backup_seconds or (1.0 if q else 3.0)
    ctx.identity_clients = max(1, a.identity_clients)
    ctx.identity_seconds = a.identity_seconds or (0.3 if q else 3.0)
    ctx.identity_rounds = max(1, a.identity_rounds or (1 if q else 3))
    ctx.identity_bad_rate = max(0.0, a.identity_bad_rate)
    ctx.rooms_parts = [x for x in a.rooms_parts.split(",") if x in ("list", "scroll", "presence")]
    ctx.rooms_dbs = [x for x in a.rooms_dbs.split(",") if x in ("memory", "file")]
    ctx.rooms_count = max(1, a.rooms_count or (50 if q else 1000))
    ctx.rooms_requests = max(1, a.rooms_requests or (100 if q else 2000))
    ctx.rooms_warmup = max(0, a.rooms_warmup)
    ctx.rooms_messages = max(1, a.rooms_messages or (2000 if q else 100000))
    ctx.rooms_page = max(1, min(1000, a.rooms_page))
    ctx.rooms_followers = max(1, a.rooms_followers or (200 if q else 10000))
    ctx.rooms_posters = max(1, a.rooms_posters)
    ctx.rooms_seconds = a.rooms_seconds or (0.5 if q else 3.0)
    ctx.rooms_fanout_rounds = max(1, a.rooms_fanout_rounds or (2 if q else 5))
    ctx.rooms_runs = max(1, a.rooms_runs or (1 if q else 3))
    ctx.rooms_baseline = a.rooms_baseline
    ctx.edge_followers = max(1, a.edge_followers or (200 if q else 19000))
    ctx.edge_posts = max(1, a.edge_posts or (5 if q else 100))
    biggest = max(ctx.fanout_sizes + ctx.wake_sizes + ctx.stream_sizes +
                  [ctx.idle_waiters, ctx.post_fanout, ctx.stream_rate_streams,
                   2 * ctx.shard_waiters if "shards" in a.only else 0,
                   ctx.rooms_followers + ctx.rooms_posters + 10 if "rooms" in a.only else 0,
                   max(ctx.adv_polls, ctx.adv_streams, 4 * ctx.adv_readers) + 100 if "adversarial" in a.only else 0])
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
    ctx.results = results                   # the stream scenario takes the parked-poll RSS from here
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
                try:
                    for r in scenario_post(ctx):
                        emit(r)
                except Exception as e:                      # each row is guarded; this is start-up or worse
                    emit({"scenario": "post", "db": ",".join(ctx.post_dbs), "phase": "fresh", "clients": 0,
                          "exception": "%s: %s (%s)" % (type(e).__name__, e, where(e))})
            elif sc == "order":
                run("order: %d posters x %d messages, %d followers" %
                    (ctx.order_posters, ctx.order_messages, ctx.order_followers),
                    {"scenario": "order", "posters": ctx.order_posters, "followers": ctx.order_followers,
                     "messages": ctx.order_posters * ctx.order_messages}, scenario_order, ctx)
            elif sc == "stream":
                for n in ctx.stream_sizes:
                    run("stream: %d event streams, one post" % n, {"scenario": "stream", "part": "fanout", "streams": n},
                        scenario_stream_fanout, ctx, n)
                n, k = ctx.stream_rate_streams, ctx.stream_reconnects
                run("stream: %d streams, %g posts/s for %g s, %d reconnect mid-run" %
                    (n, ctx.stream_rate, ctx.stream_rate_seconds, k),
                    {"scenario": "stream", "part": "rate", "streams": n, "rate": ctx.stream_rate,
                     "seconds": ctx.stream_rate_seconds, "reconnects": k},
                    scenario_stream_rate, ctx, n, ctx.stream_rate, ctx.stream_rate_seconds, k)
            elif sc == "shards":
                block, commands, why = shard_prerequisites()
                if why:
                    log("shards: skipped: %s" % why)
                    emit({"scenario": "shards", "shards": 0, "skipped": why})
                    continue
                for k in (1, 2):
                    run("shards: %d shard%s behind the README's nginx block (TLS), %d clients over %d rooms, "
                        "then %d waiters" % (k, "" if k == 1 else "s", ctx.shard_clients, len(SHARD_ROOMS),
                                             ctx.shard_waiters),
                        {"scenario": "shards", "shards": k, "clients": ctx.shard_clients,
                         "seconds": ctx.shard_seconds, "rooms": len(SHARD_ROOMS), "waiters": ctx.shard_waiters},
                        scenario_shards, ctx, k, block, commands)
            elif sc == "backup":
                run("backup: posting at %d clients on the file store, this server against %s's (EXCLUSIVE "
                    "locking), %d rounds" % (ctx.backup_post_clients, BACKUP_BASELINE_COMMIT, ctx.backup_rounds),
                    {"scenario": "backup", "part": "posting", "clients": ctx.backup_post_clients},
                    scenario_backup_posting, ctx)
                run("backup: posting at %d clients on a %d MiB database: alone, during a backup, during "
                    "Litestream" % (ctx.backup_clients, ctx.backup_db_mib),
                    {"scenario": "backup", "part": "latency", "clients": ctx.backup_clients,
                     "db_mib": ctx.backup_db_mib}, scenario_backup_latency, ctx)
            elif sc == "edge":
                vcl, varnishd_line, server_line, why = edge_prerequisites()
                if why:
                    log("edge: skipped: %s" % why)
                    emit({"scenario": "edge", "followers": 0, "skipped": why})
                    continue
                run("edge: %d followers of one room through the README's Varnish edge, %d posts" %
                    (ctx.edge_followers, ctx.edge_posts),
                    {"scenario": "edge", "followers": ctx.edge_followers, "posts": ctx.edge_posts},
                    scenario_edge, ctx, ctx.edge_followers, ctx.edge_posts, vcl, varnishd_line, server_line)
            elif sc == "rooms":
                if "list" in ctx.rooms_parts:
                    for db_kind in ctx.rooms_dbs:
                        run("rooms: GET /rooms with %d rooms (%s), %d requests" % (ctx.rooms_count, db_kind,
                                                                                  ctx.rooms_requests),
                            {"scenario": "rooms", "part": "list", "db": db_kind, "rooms": ctx.rooms_count},
                            scenario_rooms_list, ctx, db_kind)
                if "scroll" in ctx.rooms_parts:
                    run("rooms: before= paging through %d stored messages, %d a page (file)" %
                        (ctx.rooms_messages, ctx.rooms_page),
                        {"scenario": "rooms", "part": "scroll", "db": "file", "messages": ctx.rooms_messages,
                         "limit": ctx.rooms_page}, scenario_rooms_scroll, ctx)
                if "presence" in ctx.rooms_parts:
                    run("rooms: presence: %d parked polls on one room, fan-out and %d posters, this server against "
                        "%s's, %d runs each" % (ctx.rooms_followers, ctx.rooms_posters, ROOMS_BASELINE_COMMIT,
                                                ctx.rooms_runs),
                        {"scenario": "rooms", "part": "presence", "followers": ctx.rooms_followers,
                         "posters": ctx.rooms_posters}, scenario_rooms_presence, ctx)
            elif sc == "identity":
                run("identity: %d clients posting with a JWT each, the shared token, none; then beside %g refused "
                    "tokens a second" % (ctx.identity_clients, ctx.identity_bad_rate),
                    {"scenario": "identity", "clients": ctx.identity_clients}, scenario_identity, ctx)
            elif sc == "adversarial":
                sizes = {"polls": ctx.adv_polls, "streams": ctx.adv_streams, "order": ctx.adv_readers}
                what = {"polls": "%d non-reading polls on distinct (after, limit), a burst of 64 x 10,000 '\"'",
                        "streams": "%d non-reading streams on distinct cursors, a burst of 64 x 10,000 '\"'",
                        "order": "%%d reading streams and followers, %d bursts" % ctx.adv_bursts}
                for run_no in range(1, ctx.adv_runs + 1):
                    for part in ctx.adv_parts:
                        n = sizes[part]
                        run("adversarial %s, run %d/%d: %s" % (part, run_no, ctx.adv_runs, what[part] % n),
                            {"scenario": "adversarial", "part": part, "clients": n, "run": run_no},
                            scenario_adversarial, ctx, part, n, run_no)
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
