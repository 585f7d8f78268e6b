#!/usr/bin/env python3
"""A long-polling chat server in one file, using only the Python standard library.

Copy this file anywhere and run ``python3 chat_server.py``; talk to it with curl or
open http://127.0.0.1:8080/ in a browser.  The API is the one of the blog post "How
to implement HTTP Long Polling in Go": ``POST /messages`` with ``{"body": "..."}``
and ``GET /messages?after=<id>``, which waits until a newer message exists and
answers ``[]`` when its timeout passes.  Unlike the post, ``after`` is honoured, ids
are time-ordered UUIDs (version 7 layout) so "newer" is a plain comparison, and
waiters sleep on a ``threading.Event`` instead of polling.  The same cursor also
drives Server-Sent Events (``Accept: text/event-stream``).

How the pieces fit (in the order data flows through this file):

    Configuration        constants with units, the flag ranges, Config
    Messages and cursors IdClock, Message, and what a cursor can mean (CursorGone, ...)
    Message store        MessageStore with its byte budget; Database (SQLite, WAL, import)
                         and the OwnerLock that lets one server own a file
    Backup               an online copy of a running server's database
    Waiter registry      parked polls and open event streams, one Event each
    Presence             who follows each room (polls, streams), for /rooms/<room>/presence
    Housekeeper          one thread: hang-ups, heartbeats, pruning, WAL checkpoints
    HTTP server          ChatServer, its thread pool, and the fan-out writer: a post
                         writes the shared answer to every parked socket itself
    Request reading      the strict HTTP/1.1 parser: request line, headers, body
    Access policy        Host allow-list, Origin checks, token, rate limit
    Identity             signed tokens (JWT, HS256) and a proxy's user: who posts, which rooms
    HTTP handler         routes; turns store and policy outcomes into statuses
    Event stream         the text/event-stream framing of the same outcomes
    Metrics              /stats and /metrics from one set of counters
    Web page             the chat page served at /
    Command line         flags checked at start-up, main(), the commands (backup, token)
    Client               Client for Python programs, and the follow and post commands

Exactly one party answers each parked poll: whoever removes it from the registry (a
post, its own timeout, the housekeeper when the client hangs up, or shutdown).

In a program: ``server = make_server(port=0, db="chat.db")`` (the command line's
defaults), ``server.start()`` serves it on a thread, ``server.post(room, body)`` stores
a message and wakes its followers, ``server.stop()`` ends it.  To talk to a server:
``Client("http://127.0.0.1:8080/", room="lobby")`` with ``post()`` and ``follow()``.

SPDX-License-Identifier: MIT

Copyright (c) 2026 the chat_server.py authors

Permission is hereby granted, free of charge, to any person obtaining a copy of this
software and associated documentation files (the "Software"), to deal in the Software
without restriction, including without limitation the rights to use, copy, modify,
merge, publish, distribute, sublicense, and/or sell copies of the Software, and to
permit persons to whom the Software is furnished to do so, subject to the following
conditions:

The above copyright notice and this permission notice shall be included in all copies
or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED,
INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A
PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT
HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF
CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR
THE USE OR OTHER DEALINGS IN THE SOFTWARE.
"""

import sys

# Before any other import: on an older Python one of them would fail with a traceback.
if sys.version_info < (3, 8):
    sys.stderr.write("chat_server.py needs Python 3.8 or newer (this is %s)\n" % sys.version.split()[0])
    sys.exit(2)

import _thread
import argparse
import base64
import bisect
import collections
import contextlib
import email.utils
import errno
import hashlib
import heapq
import hmac
import http.client
import ipaddress
import json
import math
import os
import random
import re
import selectors
import signal
import socket
import subprocess
import threading
import time
import traceback
import urllib.parse
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

try:
    import sqlite3
except ImportError:  # some minimal Python builds leave it out
    sqlite3 = None

try:
    import resource
except ImportError:  # Windows
    resource = None

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

try:
    import msvcrt
except ImportError:  # POSIX
    msvcrt = None

try:
    import ctypes
except ImportError:  # some minimal Python builds leave it out
    ctypes = None

__version__ = "1.2"
__license__ = "MIT"
__all__ = ["ChatServer", "ChatHandler", "Client", "Config", "MessageStore", "Database", "make_server", "main"]


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_DB = "chat.db"
DEFAULT_ROOM = "default"

# -- what one request may be (the request-size limits follow nginx's defaults) --

#: Largest request body, in bytes (the seed's 10,000), however it is framed: 413 past it.
MAX_BODY_BYTES = 10000
#: Longest request line (nginx: large_client_header_buffers 8k); 414 past it.
MAX_REQUEST_LINE_BYTES = 8192
#: Longest header line, and all header lines together; 431 past either, before the rest is read.
MAX_HEADER_LINE_BYTES = 8192
MAX_HEADER_BYTES = 32768
#: Most header lines in one request; 431 past it.
MAX_HEADERS = 100
#: Longest chunk-size line of a chunked body (the size and its extensions).
MAX_CHUNK_LINE_BYTES = 1024
#: Longest author name, in characters.
MAX_AUTHOR_CHARS = 64
#: The optional per-browser `client` id: this many characters of [A-Za-z0-9_-].
MIN_CLIENT_CHARS, MAX_CLIENT_CHARS = 8, 64
#: Deepest JSON nesting accepted in a request body.
MAX_JSON_DEPTH = 16

# -- what one answer may be --

#: Long-poll wait when the request names none, and the most a request may ask for (seconds).
#: 50 s stays clear of the 60 s that proxies such as nginx wait by default.
DEFAULT_TIMEOUT_S = 10.0
MAX_TIMEOUT_S = 50.0
#: Waits are shortened by up to this fraction (at most 1 s) so clients polling in lockstep spread out.
TIMEOUT_JITTER = 0.1
#: Messages per answer when the request names no limit, and the most it may ask for.
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
#: Bytes of messages in one answer; an answer stops before it would pass this (the client
#: follows the cursor for the rest).  At least one message is always sent.
MAX_ANSWER_BYTES = 1024 * 1024
#: Bytes of answers being written to clients at once; past it, answers shrink to one message,
#: so clients that do not read cannot make the server hold their answers without bound.
MAX_UNSENT_BYTES = 64 * 1024 * 1024

# -- what the server keeps --

#: Messages of each room held in memory (with no database, that is all the history there is).
HISTORY_PER_ROOM = 1000
#: MiB of messages held in memory across all rooms; past it the oldest leave memory
#: (they stay in the database; without one they are gone, and cursors before them get 410).
MEMORY_MIB = 256
#: Rooms held at once (with a database: rooms in memory; the others stay on disk).  A post
#: that would open one more takes the place of the room quiet for longest, if that room has
#: had no post for ROOM_QUIET_S; otherwise it gets 503.  So a burst of posts to new rooms
#: cannot lock the server's rooms for longer than that.
MAX_ROOMS = 100
ROOM_QUIET_S = 600.0
#: Parked polls and open event streams at once; past it, 503 with Retry-After.
MAX_WAITERS = 12000
#: Open connections at once; also capped by the open-files limit less FD_RESERVE.
MAX_CONNECTIONS = 15000
FD_RESERVE = 64
#: Client addresses tracked by the rate limit; past it, the longest-quiet one is forgotten.
MAX_RATE_KEYS = 65536

# -- timing --

#: A request's line, headers and body must all arrive within this many seconds of its first byte.
REQUEST_TIMEOUT_S = 10.0
#: A keep-alive connection with no request for this many seconds is closed; so is one
#: whose client does not read its answer for this long.
IDLE_TIMEOUT_S = 30.0
#: Seconds a client is told to wait (Retry-After) when the server is full.
RETRY_AFTER_S = 1
#: An event stream with nothing to send gets a comment line this often (the HTML
#: standard's advice: proxies drop connections that stay silent).
HEARTBEAT_S = 15.0
#: Event-stream clients are told to reconnect after a random delay in this range (ms),
#: so a restart does not bring every browser back in the same instant.
STREAM_RETRY_MS = (2000, 6000)
#: Threads kept for reuse exit after this long idle (plus up to half again, so they leave spread out).
THREAD_IDLE_S = 60.0
#: The housekeeper's tick: new parked sockets are watched for hang-ups from the next tick on.
HOUSEKEEPING_INTERVAL_S = 0.5
#: How often history is pruned (when --retain-count or --retain-days is set) and the WAL checkpointed.
UPKEEP_INTERVAL_S = 30.0
#: How long a write waits for another process's lock on the database (Litestream checkpoints
#: with short write locks, and asks applications for this: "PRAGMA busy_timeout = 5000").
BUSY_TIMEOUT_S = 5.0
#: After a checkpoint the WAL file is cut back to this size when it is next reset.
WAL_SIZE_LIMIT_BYTES = 64 * 1024 * 1024
#: Rows deleted per transaction when pruning, and the pause between two, so posts are
#: never held up for long.
PRUNE_BATCH_ROWS = 500
PRUNE_PAUSE_S = 0.005

# -- the process --

#: Listen backlog: bursts of thousands of connections must not be dropped (the stdlib's is 5).
LISTEN_BACKLOG = 4096
#: Answers larger than this are written after their head instead of being copied into one
#: buffer with it (TCP_NODELAY is on, so the second write is not held back).
SEPARATE_BODY_BYTES = 65536
#: Bytes asked of each recv() while a request arrives; what is left over stays for the next
#: request.
RECV_BYTES = 16384
#: Bytes asked of the first recv(), which waits for a request and is held by every idle
#: keep-alive connection; a head longer than this takes a second recv().
IDLE_RECV_BYTES = 1024
#: Thread stack size; only touched pages cost memory, this bounds address space per thread.
THREAD_STACK_BYTES = 512 * 1024
#: The GIL switch interval.  Every thread waiting for the GIL wakes once per interval;
#: with thousands woken at once (a fan-out, or clients leaving together) the stdlib's
#: 5 ms made that a storm that stalled the server for over 20 s (bench/bench.py,
#: fanout 10000).  Our threads let go of the GIL at every I/O long before 1 s.
SWITCH_INTERVAL_S = 1.0
#: select() on Windows handles at most 512 sockets; past that, hung-up waiters go at their timeout.
SELECT_WATCH_LIMIT = 500
#: Buckets of the process's futex hash on Linux 6.16 and later, which gives a process only
#: 16 buckets on a 2-CPU machine: with 10,000 threads asleep (the pool after a fan-out)
#: every lock hand-off then walked ~600 waiters, and a post cost twice the CPU (measured:
#: a futex wake 2.5 us fresh, 53-67 us after a 10k fan-out, 2.5 us again with 16384).
FUTEX_HASH_SLOTS = 16384

#: The numeric options, with the range each must be in (checked at start-up) and what 0 means.
OPTION_RANGES = {
    "port": (0, 65535, "0 picks a free port"),
    "max_timeout": (1.0, 3600.0, None),
    "history": (1, 1000000, None),
    "memory_mib": (1, 1048576, None),
    "max_rooms": (1, 1000000, None),
    "retain_count": (0, 10 ** 9, "0 keeps every message"),
    "retain_days": (0.0, 36500.0, "0 keeps every message"),
    "max_waiters": (1, 1000000, None),
    "max_connections": (1, 1000000, None),
    "request_timeout": (0.1, 3600, None),
    "idle_timeout": (0.1, 3600, None),
    "rate": (0.0, 1000000.0, "0 turns the limit off"),
    "burst": (0, 1000000, "0 means twice the rate"),
    "edge_cache": (0, 3600, "0: every answer is no-store"),
}

#: One encoder for every answer: json.dumps() with options builds a new one per call.
JSON_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
STATUS_LINES = {status: "HTTP/1.1 %d %s\r\n" % (status, status.phrase) for status in HTTPStatus}

ROOM_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}\Z")
CLIENT_ID = re.compile(r"[A-Za-z0-9_-]{%d,%d}\Z" % (MIN_CLIENT_CHARS, MAX_CLIENT_CHARS))
ZERO_ID = "00000000-0000-0000-0000-000000000000"


class Config:
    """Every tunable of a server, with its default; unknown names and out-of-range values fail fast."""

    host = DEFAULT_HOST
    port = DEFAULT_PORT
    db = ":memory:"
    quiet = False
    max_timeout = MAX_TIMEOUT_S
    history = HISTORY_PER_ROOM
    memory_mib = MEMORY_MIB
    max_rooms = MAX_ROOMS
    retain_count = 0          # 0: keep every message in the database
    retain_days = 0.0         # 0: no age limit
    max_waiters = MAX_WAITERS
    max_connections = MAX_CONNECTIONS
    request_timeout = REQUEST_TIMEOUT_S
    idle_timeout = IDLE_TIMEOUT_S
    rate = 0.0                # posts per second per client address; 0: no limit
    edge_cache = 0            # seconds a shared cache may keep a poll's answer of messages; 0: none
    burst = 0                 # posts allowed at once before --rate applies; 0: max(1, 2 x rate)
    trust_proxy = False       # take the client address from X-Forwarded-For
    token = None              # bearer token required on the API
    jwt_secret = None         # bytes: signed tokens (JWT, HS256) name their users
    user_header = None        # a trusted proxy's header naming the user (X-Remote-User)
    proxy_addresses = ("127.0.0.0/8", "::1")    # where that proxy connects from
    anonymous_rooms = ()      # with identity: the rooms anonymous clients may use (patterns)
    cors_origin = None        # origin allowed to call the API from a browser
    allow_hosts = ()          # extra names accepted in Host (see AccessPolicy); "*" for any

    def __init__(self, **options):
        for name, value in options.items():
            if not hasattr(Config, name) or name.startswith("_"):
                raise TypeError("unknown option %r" % name)
            if name in OPTION_RANGES:
                value = check_range(name, value)
            setattr(self, name, value)
        if self.burst <= 0:
            self.burst = max(1, int(2 * self.rate))
        self.allow_hosts = tuple(check_allowed_host(name) for name in self.allow_hosts)
        if self.cors_origin is not None:
            self.cors_origin = check_origin_option(self.cors_origin)
        if self.token is not None:
            self.token = check_token(self.token)
        if self.jwt_secret is not None:
            self.jwt_secret = check_jwt_secret(bytes(self.jwt_secret))
        if self.user_header is not None:
            self.user_header = check_header_name(self.user_header)
        self.proxy_addresses = tuple(check_network(value) for value in self.proxy_addresses)
        self.anonymous_rooms = check_room_patterns(list(self.anonymous_rooms), "an --anonymous-rooms pattern")

    @property
    def identity(self):
        """True if posts name verified users: signed tokens or a trusted proxy's header."""
        return self.jwt_secret is not None or self.user_header is not None

    @property
    def memory_bytes(self):
        return int(self.memory_mib * 1024 * 1024)


def check_range(name, value):
    """`value` if it is a finite number within OPTION_RANGES[name]; ValueError naming the range."""
    low, high, zero = OPTION_RANGES[name]
    integral = isinstance(low, int)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and integral and value != int(value):
        ok = False
    if not ok or not low <= value <= high:
        raise ValueError("must be %s from %s to %s%s, not %r"
                         % ("a whole number" if integral else "a number", low, high,
                            " (%s)" % zero if zero else "", value))
    return int(value) if integral else float(value)


_HOST_NAME = re.compile(r"(?:[a-z0-9](?:[a-z0-9_-]{0,61}[a-z0-9])?)(?:\.[a-z0-9](?:[a-z0-9_-]{0,61}[a-z0-9])?)*\Z")


def check_allowed_host(name):
    """An --allow-host value in canonical form: '*', a DNS name, or an IP address literal."""
    text = str(name).strip().lower().rstrip(".")
    if text == "*":
        return text
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        if not _HOST_NAME.match(text) or len(text) > 253:
            raise ValueError("must be a host name or an IP address (no port, no scheme), "
                             "or * for any; got %r" % str(name)[:100]) from None
        return text
    return "[%s]" % address.compressed if address.version == 6 else address.compressed


#: Ports a browser leaves out of an Origin, by scheme.
DEFAULT_PORTS = {"http": 80, "https": 443}


def check_origin_option(value):
    """A --cors-origin value: '*' or scheme://host[:port] written as browsers write it in
    Origin (lower case, ASCII, no default port), so that it can match one."""
    text = str(value).strip()
    if text == "*":
        return text
    if not text.isascii():
        raise ValueError("must be written in ASCII as browsers send it: an internationalised name "
                         "in its xn-- form (https://xn--r8jz45g.jp, not https://例え.jp); got %r" % text[:100])
    parts = urllib.parse.urlsplit(text)
    try:
        port = parts.port
    except ValueError:
        port = -1
    host = split_host(parts.netloc.rpartition("@")[2]) if parts.netloc else None
    if parts.scheme not in DEFAULT_PORTS or host is None or parts.path not in ("", "/") \
            or parts.query or parts.fragment or "@" in parts.netloc or port == 0 or port == -1:
        raise ValueError("must be an origin such as https://chat.example.org (scheme, host, "
                         "optional port; no path), or *; got %r" % text[:100])
    name = host[0]
    if port is None or port == DEFAULT_PORTS[parts.scheme]:
        return "%s://%s" % (parts.scheme, name)
    return "%s://%s:%d" % (parts.scheme, name, port)


def check_network(value):
    """A --proxy-address value: an IP address or network (CIDR), as an ip_network."""
    try:
        return ipaddress.ip_network(str(value).strip(), strict=False)
    except ValueError:
        raise ValueError("must be an IP address or a network such as 10.0.0.0/8, got %r" % str(value)[:80]) from None


def check_header_name(value):
    """A --user-header value: a header field name, in lower case."""
    text = str(value)
    if not re.match(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}\Z", text) or text.lower() in SINGLE_FIELDS:
        raise ValueError("must be a header name such as X-Remote-User, got %r" % text[:80])
    return text.lower()


def check_token(value):
    """A --token value: 1 to 256 visible ASCII characters (it travels in a header)."""
    text = str(value)
    if not re.match(r"[\x21-\x7e]{1,256}\Z", text):
        raise ValueError("must be 1 to 256 visible ASCII characters (no spaces)")
    return text


# ---------------------------------------------------------------------------
# Messages and cursors
# ---------------------------------------------------------------------------

class CursorGone(Exception):
    """Messages after the cursor are no longer kept; `oldest` is the oldest id still kept."""

    def __init__(self, oldest):
        super().__init__(oldest)
        self.oldest = oldest


class CursorAhead(Exception):
    """The cursor is newer than any id this server has issued; `latest` is the newest it has."""

    def __init__(self, latest):
        super().__init__(latest)
        self.latest = latest


class RoomLimitReached(Exception):
    """A post would open a room beyond --max-rooms."""


class StorageError(Exception):
    """The database could not be opened, or a message could not be written to it."""


class IdClock:
    """Issues time-ordered UUIDs (version 7 layout) that strictly increase.

    The 12 bits after the millisecond timestamp count within a millisecond, so ids
    keep increasing when many are issued at once and when the wall clock steps back
    (the last millisecond is reused until the clock catches up).  Callers hold a lock.
    """

    def __init__(self, last_id=None):
        self._ms, self._seq = 0, 0
        if last_id:
            value = uuid.UUID(last_id).int
            self._ms, self._seq = value >> 80, (value >> 64) & 0xFFF

    def next_id(self):
        ms = int(time.time() * 1000)
        if ms > self._ms:
            self._ms, self._seq = ms, random.getrandbits(10)   # leaves room to count up
        elif self._seq < 0xFFF:
            self._seq += 1
        else:
            self._ms, self._seq = self._ms + 1, 0
        value = (self._ms << 80) | (0x7 << 76) | (self._seq << 64) | (0b10 << 62) | random.getrandbits(62)
        return _uuid_text(value)


def _uuid_text(value):
    text = "%032x" % value
    return "%s-%s-%s-%s-%s" % (text[:8], text[8:12], text[12:16], text[16:20], text[20:])


def first_id_at(seconds):
    """The smallest id that the IdClock can issue at time `seconds` (for age cut-offs)."""
    return _uuid_text((int(seconds * 1000) << 80) | (0x7 << 76) | (0b10 << 62))


_UUID_TEXT = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\Z")


def parse_cursor(text):
    """The canonical id for `text`, or None for "from the oldest"; ValueError unless it is a
    UUID in its usual 8-4-4-4-12 form (what this server issues)."""
    if text is None or text == "":
        return None
    if not _UUID_TEXT.match(text):
        raise ValueError(text)
    cursor = text.lower()
    return None if cursor == ZERO_ID else cursor


def client_tag(client):
    """The opaque tag stored and shown for a post's `client` id.

    It is a hash, so a reader who sees the tag cannot post as that browser; the page
    learns its own tag from the answer to its first post.
    """
    digest = hashlib.sha256(b"chat-client:" + client.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest[:12]).decode("ascii")


#: What one message held in memory costs beyond its JSON, body and author strings: the
#: object, its id and time strings, its tag, and its slots in the room's lists (bytes).
MESSAGE_OVERHEAD_BYTES = 480


class Message:
    """One chat message and its JSON encoding, made once and shared by every answer.

    The log is append-only: an edit or a delete is a later message that names an
    earlier one (`edits`, `deletes`), and the earlier one is then kept as it is now:
    with its new body and `edited_at`, or erased (`deleted`, no author, no body).
    """

    __slots__ = ("id", "room", "created_at", "author", "body", "client", "user", "edits", "deletes",
                 "edited_at", "deleted", "json", "size", "stored", "error", "lead", "opens_room")

    def __init__(self, id, room, created_at, author, body, client=None, user=None, edits=None, deletes=None,
                 edited_at=None, deleted=False):
        self.id, self.room, self.created_at = id, room, created_at
        self.author, self.body, self.client, self.user = author, body, client, user
        self.edits, self.deletes, self.edited_at, self.deleted = edits, deletes, edited_at, bool(deleted)
        self.json = JSON_ENCODER.encode(self.as_dict()).encode()
        self.size = len(self.json) + sys.getsizeof(body) + MESSAGE_OVERHEAD_BYTES + (
            sys.getsizeof(author) if author else 0)
        self.stored = None      # with a database: a lock released once its commit is over
        self.error = None
        self.lead = False       # handed the group commit by the poster before it
        self.opens_room = False

    def as_dict(self):
        if self.deleted:
            return {"id": self.id, "room": self.room, "created_at": self.created_at, "deleted": True}
        message = {"id": self.id, "room": self.room, "created_at": self.created_at, "author": self.author,
                   "body": self.body if not self.deletes else None, "client": self.client, "user": self.user}
        if self.edits:
            message["edits"] = self.edits
        elif self.deletes:
            message["deletes"] = self.deletes
        if self.edited_at:
            message["edited_at"] = self.edited_at
        return message

    def edited(self, edit):
        """This message as `edit` (a later message that edits it) leaves it."""
        return Message(self.id, self.room, self.created_at, self.author, edit.body, self.client, self.user,
                       self.edits, self.deletes, edit.created_at)

    def erased(self):
        """This message deleted: its id and time stay, its author and text go."""
        return Message(self.id, self.room, self.created_at, None, "", None, None, self.edits, None, None, True)


def encode_list(messages):
    """A JSON array of already-encoded messages, ending in a newline."""
    return b"[" + b",".join(m.json for m in messages) + b"]\n"


def within_answer(messages, newest=False):
    """The longest run of `messages` (from the start, or from the end with `newest`) that fits
    MAX_ANSWER_BYTES; never fewer than one."""
    total, count = 0, 0
    for message in (reversed(messages) if newest else messages):
        total += len(message.json) + 1
        if total > MAX_ANSWER_BYTES and count:
            break
        count += 1
    if count == len(messages):
        return messages
    return messages[len(messages) - count:] if newest else messages[:count]


# ---------------------------------------------------------------------------
# Message store
# ---------------------------------------------------------------------------

class Room:
    """The recent messages of one room, oldest first, and what fell out of memory."""

    __slots__ = ("name", "ids", "messages", "evicted", "gone", "dropped", "active")

    def __init__(self, name, messages=(), gone=None, evicted=None):
        self.name = name
        self.active = time.monotonic()  # its last post (or when it was loaded)
        self.ids = [m.id for m in messages]
        self.messages = list(messages)
        self.evicted = evicted  # newest id no longer in memory (None: memory holds all there is)
        self.gone = gone        # newest id no longer anywhere
        self.dropped = 0        # messages that fell out of memory since start


class MessageStore:
    """Messages by room, the recent ones in memory within a byte budget, optionally backed by a Database.

    Ids are issued under one lock in the order messages become visible.  With a
    database, a message is visible (and a post answered) only once it is committed;
    concurrent posts share one commit.  Readers never touch the disk for recent
    messages, so waking a waiter never waits on it.  A room exists while it has
    messages, in memory or in the database; the rooms held in memory count against
    `max_rooms` (at the limit, one quiet for `room_quiet` seconds gives its place up).
    """

    def __init__(self, history=HISTORY_PER_ROOM, max_rooms=MAX_ROOMS, database=None,
                 memory_bytes=MEMORY_MIB * 1024 * 1024, room_quiet=ROOM_QUIET_S):
        self.history, self.max_rooms, self.database = history, max_rooms, database
        self.memory_bytes, self.room_quiet = memory_bytes, room_quiet
        self._lock = threading.Lock()       # rooms, ids, counters, the commit queue
        self._upkeep = threading.Lock()     # held while pruning or checkpointing
        self._closing = False
        self._rooms = {}        # name -> Room, the one with the oldest post first
        self._room_count = 0    # rooms in _rooms
        # Every room with messages: [count, newest id, its created_at], kept where messages
        # are written and removed, so listing the rooms never scans the messages.
        self._summaries = database.room_summaries() if database else {}
        self._opening = {}      # room -> posts queued that would open it
        self._pending = []      # messages waiting for the group commit
        self._committing = False
        self._forgotten = None  # without a database: newest id of any room dropped whole
        self._stamp = (None, "")
        self.latest = database.last_id() if database else None
        self._clock = IdClock(self.latest)
        self.bytes = 0
        self.posts = 0
        self.dropped = 0

    # -- writing --

    def add(self, room_name, body, author=None, client=None, user=None, edits=None, deletes=None):
        """Store a message and return it once it is visible (`user`: the verified id of its
        poster, whose name is `author`; None for an anonymous post).  With `edits` or
        `deletes` (an earlier message's id, checked by the caller) it is an edit or delete.

        RoomLimitReached if it would open a room past max_rooms; StorageError if the
        database could not take it (nothing is then stored, and no room is opened).
        """
        if self.database is not None:
            self._load_room(room_name)      # outside the lock: reads the disk once per room
        tag = client_tag(client) if client else None
        with self._lock:
            created_at = self._created_at(time.time())
            opens = room_name not in self._rooms
            if opens and room_name not in self._opening and \
                    self._room_count + len(self._opening) >= self.max_rooms and not self._retire_quietest_room():
                raise RoomLimitReached(self.max_rooms)
            message = Message(self._clock.next_id(), room_name, created_at, author, body, tag, user, edits, deletes)
            if self.database is None:
                self._publish([message])
                return message
            if opens:
                message.opens_room = True
                self._opening[room_name] = self._opening.get(room_name, 0) + 1
            message.stored = threading.Lock()
            message.stored.acquire()
            self._pending.append(message)
            lead, self._committing = not self._committing, True
        if not lead:
            message.stored.acquire()    # released once stored, or to hand us the commit
            lead = message.lead
        if lead:
            self._commit_one_batch()
        if message.error:
            raise StorageError("the message was not stored: %s" % message.error)
        return message

    def _commit_one_batch(self):
        # Group commit with a hand-off.  The poster that finds nobody committing commits
        # everything queued so far in one transaction (one fsync), then hands the next
        # batch to the oldest poster still queued.  It never commits more than one batch:
        # a leader that kept committing for everybody until the queue ran dry would keep
        # its own client waiting for as long as others kept posting (seconds, under load).
        with self._lock:
            batch, self._pending = self._pending, []
        error = "an internal error (see the server's log)"
        try:
            self.database.insert(batch)
            error = None
        except StorageError as exc:
            error = str(exc)
        finally:    # even after a bug, so that the posters queued behind are not stuck
            self._hand_off(batch, error)

    def _hand_off(self, batch, error):
        with self._lock:
            if error is None:
                self._publish(batch)
            for message in batch:
                message.error = error
                if message.opens_room:
                    left = self._opening.pop(message.room) - 1
                    if left:
                        self._opening[message.room] = left
            successor = self._pending[0] if self._pending else None
            if successor is None:
                self._committing = False
            else:
                successor.lead = True
        for message in batch:
            if not message.lead:        # a leader's lock was released when it was handed the lead
                message.stored.release()
        if successor is not None:
            successor.stored.release()

    def _created_at(self, now):
        # RFC 3339 UTC with milliseconds; strftime is a noticeable share of a post, so once a second.
        whole = int(now)
        if self._stamp[0] != whole:
            self._stamp = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
        return "%s.%03dZ" % (self._stamp[1], int(now * 1000) % 1000)

    def _publish(self, messages):
        # Called with self._lock held: make committed messages visible, in id order.
        touched = set()
        for message in messages:
            room = self._rooms.get(message.room)
            if room is None:
                # With a database, older messages of the room (if any) are on disk, and none
                # is newer than the newest id issued so far.
                room = Room(message.room, gone=self._forgotten,
                            evicted=self.latest if self.database is not None else self._forgotten)
                self._rooms[message.room] = room
                self._room_count += 1
            if room.ids and room.ids[-1] >= message.id:
                continue        # already loaded from the database
            if message.edits or message.deletes:
                self._apply_relation(room, message)
            if room not in touched:
                del self._rooms[room.name]      # to the end: the rooms stay in order of their last post
                self._rooms[room.name] = room
                room.active = time.monotonic()
            room.ids.append(message.id)
            room.messages.append(message)
            summary = self._summaries.setdefault(room.name, [0, None, None])
            summary[0] += 1
            summary[1], summary[2] = message.id, message.created_at
            self.bytes += message.size
            self.latest = message.id
            self.posts += 1
            touched.add(room)
        for room in touched:
            if len(room.ids) > self.history:
                self._evict(room, len(room.ids) - self.history)
        if self.bytes > self.memory_bytes:
            self._shrink_to_budget()

    def _evict(self, room, count):
        # Called with self._lock held: the room's `count` oldest messages leave memory.
        self.bytes -= sum(m.size for m in room.messages[:count])
        room.evicted = room.ids[count - 1]
        if self.database is None:
            room.gone = room.evicted
        room.dropped += count
        self.dropped += count
        del room.ids[:count], room.messages[:count]
        if self.database is None:       # with a database they are still there, and counted
            self._summaries[room.name][0] -= count
        if not room.ids and self.database is None:
            # Nothing left of it: it stops counting against max_rooms, and cursors from
            # before what it lost still get 410 (see newer()).
            del self._rooms[room.name]
            del self._summaries[room.name]
            self._room_count -= 1
            self._forgotten = max(self._forgotten or room.gone, room.gone)

    def _apply_relation(self, room, message):
        # Called with self._lock held: the messages in memory become what the database
        # made them in the same commit (Database._apply_relations).
        target = message.edits or message.deletes
        for index in range(len(room.ids) - 1, -1, -1):
            old = room.messages[index]
            if old.id == target and message.edits and not old.deleted:
                new = old.edited(message)
            elif message.deletes and (old.id == target or old.edits == target) and not old.deleted:
                new = old.erased()
            else:
                continue
            room.messages[index] = new
            self.bytes += new.size - old.size
            if old.id == target and message.edits:
                break

    def message(self, room_name, message_id):
        """The message `message_id` of the room as it is now, or None if the room has no such message."""
        with self._lock:
            room = self._rooms.get(room_name)
            if room is not None:
                index = bisect.bisect_left(room.ids, message_id)
                if index < len(room.ids) and room.ids[index] == message_id:
                    return room.messages[index]
                if room.evicted is None or message_id > room.evicted or self.database is None:
                    return None
            elif self.database is None:
                return None
        return self.database.message(room_name, message_id)

    def _retire_quietest_room(self):
        # Called with self._lock held, at max_rooms: the room quiet for longest leaves
        # memory if it has been quiet for room_quiet seconds.  With a database it stays
        # on disk (and comes back when used); without one its messages are gone, as
        # when the byte budget evicts them, and cursors into it get 410.
        room = next(iter(self._rooms.values()), None)
        if room is None or time.monotonic() - room.active < self.room_quiet:
            return False
        if self.database is None:
            self._evict(room, len(room.ids))
        else:
            self.bytes -= sum(m.size for m in room.messages)
            del self._rooms[room.name]
            self._room_count -= 1
        return True

    def _shrink_to_budget(self):
        # Called with self._lock held: evict the oldest messages of all rooms until the
        # budget is met with a little to spare, so this runs once per many posts.
        target = self.memory_bytes - self.memory_bytes // 64
        oldest = [(room.ids[0], room.name) for room in self._rooms.values() if room.ids]
        heapq.heapify(oldest)
        counts = collections.Counter()
        freed = 0
        while oldest and self.bytes - freed > target:
            _, name = heapq.heappop(oldest)
            room = self._rooms[name]
            index = counts[name]
            freed += room.messages[index].size
            counts[name] = index + 1
            if index + 1 < len(room.ids):
                heapq.heappush(oldest, (room.ids[index + 1], name))
        for name, count in counts.items():
            self._evict(self._rooms[name], count)

    def _load_room(self, name):
        # With a database: bring a room's newest messages into memory before its first
        # post, so that the post's waiters are answered from memory.
        if name in self._rooms:
            return
        messages, floor = self.database.load_room(name, self.history)
        if not messages:
            return      # a new room (perhaps pruned to nothing earlier)
        evicted = self.database.id_before(name, messages[0].id) if len(messages) == self.history else None
        with self._lock:
            if name in self._rooms:
                return
            if self._room_count >= self.max_rooms:
                self._retire_quietest_room()    # else over the limit for a while: it exists already
            self._rooms[name] = Room(name, messages, gone=floor, evicted=evicted or floor)
            self._room_count += 1
            self.bytes += sum(m.size for m in messages)
            if self.bytes > self.memory_bytes:
                self._shrink_to_budget()

    # -- reading --

    def newer(self, room_name, after, limit, newest=False):
        """Up to `limit` messages of the room with id > `after` (None: from the oldest kept),
        oldest first and within MAX_ANSWER_BYTES.

        With `newest`, the room's last `limit` messages instead.  CursorGone if messages
        after `after` are no longer kept; CursorAhead if `after` is newer than any id this
        server has issued.
        """
        with self._lock:
            latest = self.latest
            if after is not None and (latest is None or after > latest):
                raise CursorAhead(latest)
            room = self._rooms.get(room_name)
            if self.database is None:
                gone = room.gone if room is not None else self._forgotten
                if after is not None and gone is not None and after < gone:
                    raise CursorGone(room.ids[0] if room is not None else None)
                if room is None:
                    return []
                if newest:
                    return within_answer(room.messages[-limit:], newest=True)
                start = 0 if after is None else bisect.bisect_right(room.ids, after)
                return within_answer(room.messages[start:start + limit])
            if room is not None:
                if newest and (room.evicted is None or len(room.ids) >= limit):
                    return within_answer(room.messages[-limit:], newest=True)
                if room.evicted is None or (after is not None and after >= room.evicted):
                    start = 0 if after is None else bisect.bisect_right(room.ids, after)
                    return within_answer(room.messages[start:start + limit])
        # Older than memory holds: the database, up to what is already visible.
        floor = self.database.floor(room_name)
        if after is not None and floor is not None and after < floor:
            raise CursorGone(self.database.oldest_id(room_name))
        if newest:
            return within_answer(self.database.read_newest(room_name, latest, limit), newest=True)
        return within_answer(self.database.read(room_name, after, latest, limit))

    def older(self, room_name, before, limit):
        """Up to `limit` messages of the room with id < `before`, oldest first, within
        MAX_ANSWER_BYTES (the ones nearest `before` kept).

        [] at the start of the room; CursorGone if what is older was removed (pruned, or
        left memory without a database); CursorAhead if `before` is newer than any id
        this server has issued.
        """
        with self._lock:
            latest = self.latest
            if latest is None or before > latest:
                raise CursorAhead(latest)
            room = self._rooms.get(room_name)
            if room is not None:
                end = bisect.bisect_left(room.ids, before)
                if end >= limit or room.evicted is None or self.database is None:
                    if not end and room.gone is not None:
                        raise CursorGone(room.ids[0] if room.ids else None)
                    return within_answer(room.messages[max(0, end - limit):end], newest=True)
            elif self.database is None:
                if self._forgotten is not None:
                    raise CursorGone(None)
                return []
        messages = self.database.read_older(room_name, before, limit)
        if not messages and self.database.floor(room_name) is not None:
            raise CursorGone(self.database.oldest_id(room_name))
        return within_answer(messages, newest=True)

    def rooms(self, readable, limit):
        """The rooms with messages for which readable(name) is true, newest activity first, at
        most `limit`: [{"name", "latest", "count", "last_activity"}]."""
        with self._lock:
            found = [(summary[1], name, summary) for name, summary in self._summaries.items()
                     if summary[0] > 0 and readable(name)]
        found.sort(reverse=True)
        return [{"name": name, "latest": summary[1], "count": summary[0], "last_activity": summary[2]}
                for _, name, summary in found[:limit]]

    def newest_in(self, room_name):
        """The newest id of a room that a reader can see (None if it has none in memory)."""
        with self._lock:
            room = self._rooms.get(room_name)
            if room is None:
                return None
            return room.ids[-1] if room.ids else room.evicted

    def oldest_id(self, room_name):
        """The oldest id kept of a room (None if it has none)."""
        with self._lock:
            room = self._rooms.get(room_name)
            if room is not None and (room.evicted is None or self.database is None):
                return room.ids[0] if room.ids else None
        return self.database.oldest_id(room_name) if self.database is not None else None

    def latest_id(self):
        """The newest id issued so far (None on an empty server): a cursor meaning "from now on"."""
        with self._lock:
            return self.latest

    def stats(self):
        with self._lock:
            return {"rooms": self._room_count,
                    "messages": sum(len(r.ids) for r in self._rooms.values()),
                    "memory_bytes": self.bytes,
                    "dropped": self.dropped,
                    "posts": self.posts}

    # -- upkeep --

    def prune(self, retain_count, retain_days):
        """Delete database history beyond the retention rules; cursors before it get CursorGone.

        Deletes in small transactions of their own, so posts go on meanwhile.
        """
        if self.database is None or not (retain_count or retain_days):
            return
        cutoff = first_id_at(time.time() - retain_days * 86400) if retain_days else None
        with self._upkeep:
            if self._closing:
                return
            emptied = self.database.prune(retain_count, cutoff, self._drop_to_floor, lambda: self._closing)
        with self._lock:
            for name, empty in emptied.items():
                room = self._rooms.get(name)
                if empty and room is not None and not room.ids:
                    del self._rooms[name]
                    self._room_count -= 1

    def _drop_to_floor(self, name, floor, removed):
        # The database has just committed `floor` for the room: memory forgets the same
        # messages at once, before their rows are deleted.
        with self._lock:
            summary = self._summaries.get(name)
            if summary is not None:
                summary[0] -= removed
                if summary[0] <= 0:
                    del self._summaries[name]
            room = self._rooms.get(name)
            if room is None:
                return
            keep = bisect.bisect_right(room.ids, floor)
            if keep:
                self.bytes -= sum(m.size for m in room.messages[:keep])
                del room.ids[:keep], room.messages[:keep]
            room.gone = floor
            if room.evicted is None or room.evicted < floor:
                room.evicted = floor

    def checkpoint(self):
        if self.database is not None:
            with self._upkeep:
                if not self._closing:
                    self.database.checkpoint()

    def close(self):
        """Close the database, once a prune running meanwhile has stopped (after its batch)."""
        self._closing = True
        if self.database is not None:
            with self._upkeep:
                self.database.close()


class Database:
    """The SQLite file behind a MessageStore: one connection, used under one lock.

    One server owns a file: it holds an OS lock on the side file PATH.lock for its
    whole life (see OwnerLock), so a second server on the same file is refused
    instead of missing the first one's posts, and a crashed server's lock goes with
    its process.  Other programs may read the file at any time (sqlite3, the backup
    command, Litestream): WAL with its shared-memory index, a busy timeout for their
    short locks, and checkpoints that never wait for a reader nor reset the WAL under
    one.  synchronous=FULL: a commit is on disk before its posts are answered, so an
    answered post survives a crash of the process and of the machine.  If the file
    cannot be written when the server starts (a full disk, a read-only file or mount),
    it is still read: `unwritable` says why, and posts fail until a write succeeds.
    """

    SCHEMA_VERSION = 3
    SCHEMA = """
        CREATE TABLE messages (
            id TEXT PRIMARY KEY,            -- time-ordered UUID: sorting by id is sorting by time
            room TEXT NOT NULL,
            created_at TEXT NOT NULL,
            author TEXT,
            body TEXT NOT NULL,
            client TEXT,                    -- the poster's client tag (version 2)
            user TEXT,                      -- the poster's verified user id (version 3)
            edits TEXT,                     -- the message this one edits, or deletes (version 3)
            deletes TEXT,
            edited_at TEXT,                 -- this message as edited: when (version 3)
            deleted INTEGER                 -- this message erased: 1 (version 3)
        ) WITHOUT ROWID;
        CREATE INDEX messages_by_room ON messages (room, id);
        CREATE TABLE rooms (
            name TEXT PRIMARY KEY,
            floor TEXT,                     -- newest id pruned from this room
            count INTEGER NOT NULL DEFAULT 0,   -- messages above the floor (version 3)
            latest TEXT,                    -- its newest message's id and time (version 3)
            last_activity TEXT
        ) WITHOUT ROWID;
    """
    MIGRATIONS = {1: ["ALTER TABLE messages ADD COLUMN client TEXT"],
                  2: ["ALTER TABLE messages ADD COLUMN user TEXT",
                      "ALTER TABLE messages ADD COLUMN edits TEXT",
                      "ALTER TABLE messages ADD COLUMN deletes TEXT",
                      "ALTER TABLE messages ADD COLUMN edited_at TEXT",
                      "ALTER TABLE messages ADD COLUMN deleted INTEGER",
                      "ALTER TABLE rooms ADD COLUMN count INTEGER NOT NULL DEFAULT 0",
                      "ALTER TABLE rooms ADD COLUMN latest TEXT",
                      "ALTER TABLE rooms ADD COLUMN last_activity TEXT",
                      "INSERT OR IGNORE INTO rooms (name) SELECT DISTINCT room FROM messages",
                      # Counted once, here; from now on where the messages are written.
                      "UPDATE rooms SET count = (SELECT count(*) FROM messages WHERE room = rooms.name "
                      "AND id > coalesce(rooms.floor, '')), latest = (SELECT max(id) FROM messages "
                      "WHERE room = rooms.name AND id > coalesce(rooms.floor, ''))",
                      "UPDATE rooms SET last_activity = (SELECT created_at FROM messages WHERE id = rooms.latest)"]}

    def __init__(self, path):
        if sqlite3 is None:
            raise StorageError("this Python was built without the sqlite3 module")
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise StorageError("directory %s does not exist" % directory)
        if os.path.isdir(path):
            raise StorageError("%s is a directory" % path)
        self.path = path
        self.unwritable = None
        self._lock = threading.Lock()
        self._conn = None
        self._owner = OwnerLock(path)
        try:
            self._owner.acquire()
            self._open()
        except sqlite3.Error as exc:
            self._abandon()
            if "locked" in str(exc):
                raise StorageError("the file is in use by another process "
                                   "(another chat_server?)") from None
            raise StorageError(str(exc)) from None
        except BaseException:
            self._abandon()
            raise

    def _abandon(self):
        if self._conn is not None:
            self._conn.close()
        self._owner.release()

    def _connect(self, read_only=False, immutable=False, exclusive=False):
        """A connection that has read the file's schema version (sqlite3.Error if it cannot)."""
        if self._conn is not None:
            self._conn.close()
        path = self.path
        if read_only:
            path = "file:%s?mode=ro%s" % (urllib.parse.quote(os.path.abspath(self.path)),
                                          "&immutable=1" if immutable else "")
        try:
            self._conn = sqlite3.connect(path, uri=read_only, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                         check_same_thread=False)
        except sqlite3.Error as exc:
            raise StorageError(str(exc)) from None
        if exclusive:
            # The WAL index then lives in this process's memory (a full disk, where no -shm
            # file can be made, can still be read), and SQLite's own lock keeps others out.
            self._conn.execute("PRAGMA locking_mode=EXCLUSIVE")
        # Read before anything writes, so a file that is not a database is left untouched.
        version = self._conn.execute("PRAGMA user_version").fetchone()[0]
        self._conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return version

    def _open(self):
        try:
            # Without an owner lock (no side file could be made) SQLite's exclusive lock
            # is what keeps a second server out.
            version = self._connect(exclusive=not self._owner.held)
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or not os.path.isfile(self.path):
                raise
            try:
                version = self._connect(exclusive=True)     # no room for the -shm file
            except sqlite3.OperationalError as exc:
                if "locked" in str(exc):
                    raise
                read_only_error = exc
            else:
                read_only_error = None
            if read_only_error is not None:
                self._open_read_only(read_only_error)
                version = self._conn.execute("PRAGMA user_version").fetchone()[0]
        conn = self._conn
        if version > self.SCHEMA_VERSION:
            raise StorageError("made by a newer chat_server (schema %d; this one knows %d)"
                               % (version, self.SCHEMA_VERSION))
        self.version = version
        if self.unwritable:
            self._set_columns()
            return
        try:
            conn.execute("BEGIN IMMEDIATE")     # takes the file's lock now
            if version == 0:
                for statement in self.SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
            else:
                for step in range(version, self.SCHEMA_VERSION):
                    for statement in self.MIGRATIONS[step]:
                        conn.execute(statement)
            conn.execute("PRAGMA user_version=%d" % self.SCHEMA_VERSION)   # a real write
            conn.execute("COMMIT")
            if conn.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower() != "wal":
                raise StorageError("cannot use write-ahead logging on this file")
        except sqlite3.Error as exc:
            if "locked" in str(exc):
                raise
            self._rollback()
            if version == 0:
                raise StorageError("cannot create the database: %s" % exc) from None
            self.unwritable = str(exc)
        else:
            self.version = self.SCHEMA_VERSION
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA journal_size_limit=%d" % WAL_SIZE_LIMIT_BYTES)
        self._set_columns()

    def _open_read_only(self, error):
        # A file that cannot be opened for writing (read-only, immutable): read it as
        # readers do.
        self.unwritable = "the file is read-only (%s)" % error
        try:
            self._connect(read_only=True)
        except sqlite3.OperationalError:
            # A read-only mount: SQLite cannot make the WAL's index beside the file, and
            # nothing can change the file there, so it is read as immutable.  A WAL left
            # by a crash is not read then: say so.
            self._connect(read_only=True, immutable=True)
            if os.path.exists(self.path + "-wal") and os.path.getsize(self.path + "-wal"):
                self.unwritable += "; its -wal file, left by a server that did not stop cleanly, cannot be read"

    def _set_columns(self):
        # Read the client column only where the file has one (a version-1 file that
        # could not be migrated is still served).
        self._columns = message_columns(self.version)

    def _rollback(self):
        if self._conn.in_transaction:
            try:
                self._conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass    # the transaction is gone either way

    def _query(self, sql, params=()):
        with self._lock:
            try:
                return self._conn.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise StorageError("the database could not be read: %s" % exc) from None

    def insert(self, messages):
        """Commit `messages` in one transaction; StorageError if it failed (nothing written)."""
        if self.version < self.SCHEMA_VERSION:
            raise StorageError("the database could not be upgraded when the server started (%s); "
                               "restart the server once the file can be written" % self.unwritable)
        rows = [(m.id, m.room, m.created_at, m.author, m.body, m.client, m.user, m.edits, m.deletes, None, None)
                for m in messages]
        rooms = {}
        for m in messages:      # in id order: the last one of a room is its newest
            rooms[m.room] = (rooms.get(m.room, (0,))[0] + 1, m.id, m.created_at, m.room)
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                self._conn.executemany("INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
                self._apply_relations(messages)
                self._conn.executemany("INSERT OR IGNORE INTO rooms (name) VALUES (?)", [(n,) for n in rooms])
                self._conn.executemany("UPDATE rooms SET count = count + ?, latest = ?, last_activity = ? "
                                       "WHERE name = ?", list(rooms.values()))
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                raise StorageError(str(exc)) from None
            self.unwritable = None

    def _apply_relations(self, messages):
        # In the transaction that stores them: an edit gives the message it edits its new
        # body; a delete erases the message (and its edits, which hold its old texts).
        for m in messages:
            if m.edits:
                self._conn.execute("UPDATE messages SET body = ?, edited_at = ? WHERE id = ? AND deleted IS NULL",
                                   (m.body, m.created_at, m.edits))
            elif m.deletes:
                self._conn.execute("UPDATE messages SET body = '', author = NULL, client = NULL, user = NULL, "
                                   "edited_at = NULL, deleted = 1 WHERE id = ? OR edits = ?", (m.deletes, m.deletes))

    def message(self, room, message_id):
        """The message `message_id` of `room` as it is now, or None."""
        rows = self._query("SELECT %s FROM messages WHERE %s AND id = ?" % (self._columns, self.KEPT), (room, message_id))
        return Message(*rows[0]) if rows else None

    def room_summaries(self):
        """{room: [messages, newest id, its created_at]} of every room with messages."""
        return {name: [count, latest, activity] for name, count, latest, activity in
                self._query("SELECT name, count, latest, last_activity FROM rooms WHERE count > 0")}

    def last_id(self):
        rows = self._query("SELECT max(id) FROM messages UNION ALL SELECT max(floor) FROM rooms")
        ids = [row[0] for row in rows if row[0]]
        return max(ids) if ids else None

    #: Rows at or below a room's floor are being pruned (or were, when a kill cut the prune
    #: short): no reader may see them, whatever instant it reads at.
    KEPT = "room = ? AND id > coalesce((SELECT floor FROM rooms WHERE name = messages.room), '')"

    def load_room(self, name, count):
        """The newest `count` messages of a room, oldest first, and its pruning floor."""
        rows = self._query("SELECT %s FROM messages WHERE %s ORDER BY id DESC LIMIT ?"
                           % (self._columns, self.KEPT), (name, count))
        return [Message(*row) for row in reversed(rows)], self.floor(name)

    def floor(self, room):
        rows = self._query("SELECT floor FROM rooms WHERE name = ?", (room,))
        return rows[0][0] if rows else None

    def id_before(self, room, message_id):
        rows = self._query("SELECT max(id) FROM messages WHERE %s AND id < ?" % self.KEPT, (room, message_id))
        return rows[0][0]

    def oldest_id(self, room):
        return self._query("SELECT min(id) FROM messages WHERE %s" % self.KEPT, (room,))[0][0]

    def read(self, room, after, upto, limit):
        rows = self._query("SELECT %s FROM messages WHERE %s AND id > ? AND id <= ? "
                           "ORDER BY id LIMIT ?" % (self._columns, self.KEPT), (room, after or "", upto or "", limit))
        return [Message(*row) for row in rows]

    def read_older(self, room, before, limit):
        rows = self._query("SELECT %s FROM messages WHERE %s AND id < ? ORDER BY id DESC LIMIT ?"
                           % (self._columns, self.KEPT), (room, before, limit))
        return [Message(*row) for row in reversed(rows)]

    def read_newest(self, room, upto, limit):
        rows = self._query("SELECT %s FROM messages WHERE %s AND id <= ? ORDER BY id DESC LIMIT ?"
                           % (self._columns, self.KEPT), (room, upto or "", limit))
        return [Message(*row) for row in reversed(rows)]

    def prune(self, retain_count, cutoff, on_floor, stopping):
        """Apply the retention rules; return {room: True if the room is now empty}.

        A room's new floor is committed first, so a cursor before it is refused and the
        rows below it are invisible from then on (see KEPT); `on_floor(room, floor)` is
        called then, and the rows go in batches of PRUNE_BATCH_ROWS, until `stopping()`
        (what is left below a floor goes at the next prune).
        """
        results = {}
        for (name,) in self._query("SELECT name FROM rooms"):
            if stopping():
                break
            cut = None
            if retain_count:
                rows = self._query("SELECT id FROM messages WHERE room = ? ORDER BY id DESC "
                                   "LIMIT 1 OFFSET ?", (name, retain_count))
                cut = rows[0][0] if rows else None
            if cutoff:
                rows = self._query("SELECT max(id) FROM messages WHERE room = ? AND id < ?", (name, cutoff))
                if rows[0][0] and (cut is None or rows[0][0] > cut):
                    cut = rows[0][0]
            if cut:
                # Inserts only add ids above the newest, so this count holds until the floor moves.
                removed = self._query("SELECT count(*) FROM messages WHERE room = ? AND id <= ? AND id > "
                                      "coalesce((SELECT floor FROM rooms WHERE name = ?), '')", (name, cut, name))[0][0]
                self._write("UPDATE rooms SET floor = ?, count = count - ? WHERE name = ?", (cut, removed, name))
                on_floor(name, cut, removed)
                while self._write("DELETE FROM messages WHERE room = ? AND id IN (SELECT id FROM messages "
                                  "WHERE room = ? AND id <= ? ORDER BY id LIMIT ?)",
                                  (name, name, cut, PRUNE_BATCH_ROWS)) == PRUNE_BATCH_ROWS and not stopping():
                    # A lock is not fair: taken again at once, it would keep a waiting
                    # poster out until the whole prune is over.
                    time.sleep(PRUNE_PAUSE_S)
                results[name] = not self._query("SELECT 1 FROM messages WHERE room = ? LIMIT 1", (name,))
        return results

    def _write(self, sql, params):
        """Run one statement in a transaction of its own; the number of rows it changed."""
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                changed = self._conn.execute(sql, params).rowcount
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                raise StorageError(str(exc)) from None
        return changed

    def checkpoint(self):
        """Copy the WAL into the database file, so the WAL never holds the history.

        PASSIVE: it never waits for a reader and never resets the WAL under one (a backup
        or Litestream holds a read transaction for as long as it copies); the WAL is
        reused from its start once every reader has moved on, and cut back to
        WAL_SIZE_LIMIT_BYTES then.
        """
        with self._lock:
            try:
                self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            except sqlite3.Error as exc:
                raise StorageError("checkpoint failed: %s" % exc) from None

    def import_room(self, source_path, room):
        """Copy one room's messages and floor from the database at `source_path`, in one
        transaction; return (count, first id, last id).  StorageError if this database
        already has the room, or the source cannot be read."""
        rows, floor = read_room_from(source_path, room)
        if not rows and floor is None:
            raise StorageError("%s has no room %r" % (source_path, room))
        with self._lock:
            try:
                if self._conn.execute("SELECT 1 FROM messages WHERE room = ? LIMIT 1", (room,)).fetchall() or \
                        self._conn.execute("SELECT 1 FROM rooms WHERE name = ?", (room,)).fetchall():
                    raise StorageError("%s already has room %r; nothing was imported" % (self.path, room))
                self._conn.execute("BEGIN IMMEDIATE")
                self._conn.executemany("INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
                self._conn.execute("INSERT INTO rooms (name, floor, count, latest, last_activity) VALUES (?, ?, ?, ?, ?)",
                                   (room, floor, len(rows), rows[-1][0] if rows else None,
                                    rows[-1][2] if rows else None))
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                raise StorageError(str(exc)) from None
        return len(rows), (rows[0][0] if rows else None), (rows[-1][0] if rows else None)

    def close(self):
        with self._lock:
            if self.unwritable is None:
                try:
                    self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error:
                    pass    # closing checkpoints again, as far as it can
            self._conn.close()
            self._owner.release()


def message_columns(version):
    """The columns of a Message, as a file of schema `version` has them (NULL where it has not)."""
    return "id, room, created_at, author, body, %s, %s" % (
        "client" if version >= 2 else "NULL",
        "user, edits, deletes, edited_at, deleted" if version >= 3 else "NULL, NULL, NULL, NULL, NULL")


def read_room_from(path, room):
    """(rows, floor) of one room in the database file at `path`, whose data is not changed
    (closing it may fold a WAL left by a stopped server into the file, as any SQLite reader does).

    StorageError if the file is missing, not a database, or held by a running server.
    """
    if sqlite3 is None:
        raise StorageError("this Python was built without the sqlite3 module")
    if not os.path.isfile(path):
        raise StorageError("%s does not exist" % path)
    owner = OwnerLock(path)
    try:
        # Held while we read, so that a server starting meanwhile is refused instead of
        # changing the room under us.
        owner.acquire()
    except StorageError:
        raise StorageError("%s is in use by a running server; stop it first" % path) from None
    try:
        conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    except sqlite3.Error as exc:
        owner.release()
        raise StorageError("%s: %s" % (path, exc)) from None
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if not 1 <= version <= Database.SCHEMA_VERSION:
            raise StorageError("%s is not a chat_server database (schema %d)" % (path, version))
        columns = message_columns(version)
        rows = conn.execute("SELECT %s FROM messages WHERE room = ? ORDER BY id" % columns, (room,)).fetchall()
        floor = conn.execute("SELECT floor FROM rooms WHERE name = ?", (room,)).fetchall()
    except sqlite3.Error as exc:
        if "locked" in str(exc):
            raise StorageError("%s is in use by a running server; stop it first" % path) from None
        raise StorageError("%s: %s" % (path, exc)) from None
    finally:
        conn.close()
        owner.release()
    return rows, (floor[0][0] if floor else None)


class OwnerLock:
    """An OS lock on PATH.lock, held by the one server that owns the database at PATH.

    fcntl.flock on POSIX, msvcrt.locking on Windows: the lock is the kernel's, so it
    goes with the process however that ends, and a stale PATH.lock left on disk means
    nothing.  Where the side file cannot be made (a read-only directory, a full disk),
    `held` stays False and the caller relies on SQLite's own locks instead.
    """

    def __init__(self, database_path):
        self.path = database_path + ".lock"
        self._file = None

    @property
    def held(self):
        return self._file is not None

    def acquire(self):
        """Take the lock; StorageError if another process holds it."""
        try:
            lock_file = open(self.path, "a+b")
        except OSError:
            return      # cannot be made here: nothing to hold
        try:
            if fcntl is not None:
                # flock, not lockf: a POSIX record lock is the process's, so a second
                # Database on the file in the same process would get it too, and closing
                # any descriptor of the file would let go of it.
                fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            elif msvcrt is not None:
                lock_file.seek(0)
                msvcrt.locking(lock_file.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            lock_file.close()
            raise StorageError("the file is in use by another process (another chat_server?)") from None
        self._file = lock_file

    def release(self):
        if self._file is not None:
            self._file.close()      # closing the file lets go of the lock
            self._file = None


# ---------------------------------------------------------------------------
# Backup
# ---------------------------------------------------------------------------

def backup_database(source, target):
    """Copy the chat database at `source` to `target`, while a server may be posting to it;
    return what the copy holds: {"messages", "rooms", "newest", "bytes"}.

    sqlite3's backup API copies every page in one step, inside one read transaction:
    the copy is the database as it was at one instant, and the server's posts go on
    meanwhile (WAL: a reader never blocks a writer).  It is written to TARGET.partial
    and renamed only once complete and checked, so nothing half-made is ever found
    under `target`.  StorageError, with nothing left under either name, if it fails.
    """
    if sqlite3 is None:
        raise StorageError("this Python was built without the sqlite3 module")
    if not os.path.isfile(source):
        raise StorageError("%s does not exist" % source)
    if os.path.abspath(target) == os.path.abspath(source):
        raise StorageError("the backup must go to another file than %s" % source)
    directory = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(directory):
        raise StorageError("directory %s does not exist" % directory)
    partial = target + ".partial"
    try:
        src = sqlite3.connect("file:%s?mode=ro" % urllib.parse.quote(os.path.abspath(source)), uri=True,
                              timeout=BUSY_TIMEOUT_S, isolation_level=None)
    except sqlite3.Error as exc:
        raise StorageError("%s: %s" % (source, exc)) from None
    try:
        try:
            version = src.execute("PRAGMA user_version").fetchone()[0]
            tables = {row[0] for row in src.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.Error as exc:
            raise StorageError("%s is not a chat_server database (%s)" % (source, exc)) from None
        if not 1 <= version <= Database.SCHEMA_VERSION or not {"messages", "rooms"} <= tables:
            raise StorageError("%s is not a chat_server database this version knows (schema %d)" % (source, version))
        _remove_quietly(partial)
        try:
            dst = sqlite3.connect(partial, isolation_level=None)
        except sqlite3.Error as exc:
            raise StorageError("%s: %s" % (partial, exc)) from None
        try:
            src.backup(dst)
            if dst.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise StorageError("the copy in %s failed its check" % partial)
            summary = {"messages": dst.execute("SELECT count(*) FROM messages").fetchone()[0],
                       "rooms": dst.execute("SELECT count(*) FROM rooms").fetchone()[0],
                       "newest": dst.execute("SELECT max(id) FROM messages").fetchone()[0]}
        except sqlite3.Error as exc:
            raise StorageError("cannot write %s: %s" % (partial, exc)) from None
        finally:
            dst.close()
        _fsync_path(partial)
        os.replace(partial, target)
        _fsync_path(directory)      # the rename itself, where the platform allows
        summary["bytes"] = os.path.getsize(target)
        return summary
    except BaseException:
        _remove_quietly(partial)
        raise
    finally:
        src.close()


def _fsync_path(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return      # a directory cannot be opened on Windows: nothing to flush there
    try:
        os.fsync(fd)
    except OSError:
        pass        # some file systems cannot fsync a directory
    finally:
        os.close(fd)


def _remove_quietly(path):
    for name in (path, path + "-wal", path + "-shm", path + "-journal"):
        try:
            os.remove(name)
        except FileNotFoundError:
            pass


# ---------------------------------------------------------------------------
# Waiter registry
# ---------------------------------------------------------------------------

# How a parked request ended, as seen by the thread that parked it.
ANSWERED, HUNG_UP, SENT_EARLY, CLOSING, SLOW = "answered", "hung up", "sent early", "closing", "slow"
_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)     # not on Windows, where the view alone suffices


#: On POSIX a socket's descriptor can be written with os.write: one system call, no socket
#: object. (A handler's socket is in timeout mode, so its descriptor is non-blocking.)
WRITE_DIRECTLY = os.name == "posix"


def write_nowait(sock_or_fd_args, data):
    """Bytes of `data` written at once to a non-blocking socket; 0 if it takes none now.

    `sock_or_fd_args` are a Waiter's view_args; OSError if the connection is gone.
    """
    if WRITE_DIRECTLY:
        try:
            return os.write(sock_or_fd_args[3], data)
        except (BlockingIOError, InterruptedError):
            return 0
    view = nonblocking_view(*sock_or_fd_args)
    try:
        return view.send(data, _DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return 0
    finally:
        view.detach()


def nonblocking_view(family, type, proto, fd):
    """A second socket object on descriptor `fd`, for a peek, or (off POSIX) a send, that never waits.

    A handler's socket is in timeout mode, which CPython implements with a
    non-blocking descriptor and a poll() before each call; the view has no timeout
    of its own, so it skips the poll and returns at once, without touching the
    handler's settings.  Detach it after use: it does not own the descriptor.
    """
    return socket.socket(family, type, proto, fd)


class Waiter:
    """One parked poll or open event stream: what it follows, its socket, and the Event
    that wakes its thread.

    A poll is answered once and leaves the registry; a stream stays, `after` moving on
    with each event written to it, until it ends (slow reader, hang-up, shutdown).
    Whoever writes to a stream holds its `lock` and checks `live` first, so events
    reach its socket one whole event after another, each once, and none after it ended.
    """

    __slots__ = ("room", "after", "limit", "connection", "fd", "view_args", "event", "outcome",
                 "unsent", "held", "stream", "live", "lock", "last_write", "presence")

    def __init__(self, room, after, limit, connection, sock, stream=False):
        self.room, self.after, self.limit, self.connection = room, after, limit, connection
        self.fd = sock.fileno()
        self.view_args = (sock.family, sock.type, sock.proto, self.fd)
        self.event = threading.Event()
        self.outcome = None
        self.unsent = b""
        self.held = 0               # bytes of `unsent` counted in the server's UnsentBudget
        self.stream = stream
        self.live = False           # a stream: caught up, so posts write to it
        self.lock = threading.Lock() if stream else None
        self.last_write = time.monotonic()
        self.presence = False       # a stream that asked for presence events (?presence=1)

    def send_nowait(self, data):
        """Write as much of `data` as the socket takes now; the rest is left in `unsent`.

        The rest is a copy: a view would keep all of `data` alive, which is more than
        the rest that the unsent budget counts.
        """
        try:
            sent = write_nowait(self.view_args, data)
        except OSError:
            self.outcome = HUNG_UP
            return
        self.unsent = data[sent:] if sent < len(data) else b""

    def send_all_nowait(self, data):
        """Write all of `data` now: None if it went, else why not (SLOW: the socket did not take
        it all, so the reader is too slow for this stream; HUNG_UP: the connection is gone)."""
        try:
            return None if write_nowait(self.view_args, data) == len(data) else SLOW
        except OSError:
            return HUNG_UP

    def peek(self):
        """After the socket turned readable: HUNG_UP, SENT_EARLY, or None if nothing is there now."""
        view = nonblocking_view(*self.view_args)
        try:
            return SENT_EARLY if view.recv(1, socket.MSG_PEEK | _DONTWAIT) else HUNG_UP
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return HUNG_UP
        finally:
            view.detach()


class WaiterRegistry:
    """Parked polls and open streams by room.  Removing a waiter from here is what
    entitles a party to answer (or end) it."""

    def __init__(self, max_waiters):
        self.max_waiters = max_waiters
        self._lock = threading.Lock()
        self._polls = {}        # room -> {waiter: None}
        self._streams = {}      # room -> {waiter: None}
        self.count = 0          # polls and streams
        self.streams = 0
        self.wakeups = 0

    def park(self, waiter):
        """Register `waiter`; False if the registry is full."""
        with self._lock:
            if self.count >= self.max_waiters:
                return False
            rooms = self._streams if waiter.stream else self._polls
            rooms.setdefault(waiter.room, {})[waiter] = None
            self.count += 1
            self.streams += waiter.stream
            return True

    def is_parked(self, waiter):
        rooms = self._streams if waiter.stream else self._polls
        with self._lock:
            return waiter in rooms.get(waiter.room, ())

    def claim(self, waiter):
        """Remove `waiter` if it is still parked; True if the caller now owns its answer."""
        rooms = self._streams if waiter.stream else self._polls
        with self._lock:
            waiters = rooms.get(waiter.room)
            if waiters is None or waiters.pop(waiter, True):
                return False
            self.count -= 1
            self.streams -= waiter.stream
            if not waiters:
                del rooms[waiter.room]
            return True

    def claim_answerable(self, room, newest):
        """Remove and return the room's polls that have news: those whose cursor is before
        `newest`, the room's newest id.

        Nothing is read or built here: the registry's lock is every room's, so its hold
        stays as short as a scan of one room's polls.
        """
        with self._lock:
            waiters = self._polls.get(room)
            if not waiters:
                return []
            claimed = [w for w in waiters if w.after is None or w.after < newest]
            if len(claimed) == len(waiters):
                del self._polls[room]
            else:
                for waiter in claimed:
                    del waiters[waiter]
            self.count -= len(claimed)
            self.wakeups += len(claimed)
            return claimed

    def streams_in(self, room):
        """The room's open streams (a snapshot)."""
        with self._lock:
            return list(self._streams.get(room, ()))

    def all_streams(self):
        with self._lock:
            return [w for waiters in self._streams.values() for w in waiters]

    def claim_all(self):
        with self._lock:
            waiters = [w for rooms in (self._polls, self._streams) for room in rooms.values() for w in room]
            self._polls.clear()
            self._streams.clear()
            self.count = self.streams = 0
            return waiters


# ---------------------------------------------------------------------------
# Presence
# ---------------------------------------------------------------------------

#: A poll counts as present for its wait and this long after it (a client between two
#: polls must not flicker away); an open stream counts as long as it is open.
PRESENCE_GRACE_S = 15.0
#: Followers remembered at once, over all rooms; past it a new one is not counted.
MAX_PRESENCE_ENTRIES = 100000
#: Streams are told of a room's presence at most this often.
PRESENCE_EVENT_INTERVAL_S = 1.0


class Presence:
    """Who follows each room: a parked poll, an open stream, or a poll answered less than its
    timeout + PRESENCE_GRACE_S ago.

    A follower is its user (identified users count once however many tabs they follow
    from) or, for anonymous ones, its address and the name it gave with ?name= (not
    verified: it is only shown).  Updated when a poll or stream starts, never by posts.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._rooms = {}        # room -> {key: [user, name, expires, open streams]}
        self._entries = 0
        self.changed = set()    # rooms whose followers changed since the housekeeper last looked

    def seen(self, room, key, user, name, until):
        """A poll of `key` in `room`: present until `until` (a monotonic time)."""
        with self._lock:
            entry = self._entry(room, key, user, name)
            if entry is not None and entry[2] < until:
                entry[2] = until

    def stream_opened(self, room, key, user, name):
        with self._lock:
            entry = self._entry(room, key, user, name)
            if entry is not None:
                entry[3] += 1

    def stream_closed(self, room, key):
        with self._lock:
            entry = self._rooms.get(room, {}).get(key)
            if entry is not None:
                entry[3] -= 1
                entry[2] = max(entry[2], time.monotonic() + PRESENCE_GRACE_S)

    def _entry(self, room, key, user, name):
        followers = self._rooms.setdefault(room, {})
        entry = followers.get(key)
        if entry is None:
            if self._entries >= MAX_PRESENCE_ENTRIES:
                return None
            entry = followers[key] = [user, name, 0.0, 0]
            self._entries += 1
            self.changed.add(room)
        elif entry[1] != name:
            entry[1] = name
            self.changed.add(room)
        return entry

    def forget_gone(self, now):
        """Drop followers whose time is up (the housekeeper calls this each tick)."""
        with self._lock:
            for room in list(self._rooms):
                followers = self._rooms[room]
                gone = [key for key, entry in followers.items() if entry[3] <= 0 and entry[2] <= now]
                for key in gone:
                    del followers[key]
                self._entries -= len(gone)
                if gone:
                    self.changed.add(room)
                if not followers:
                    del self._rooms[room]

    def count(self, room):
        with self._lock:
            return len(self._rooms.get(room, ()))

    def of(self, room):
        """{"count": followers, "users": [{"user", "name"}]}: identified users, and anonymous
        ones that gave a name, each once, by name."""
        with self._lock:
            followers = list(self._rooms.get(room, {}).values())
        users = sorted({(entry[1], entry[0] or "") for entry in followers if entry[0] or entry[1]})
        return {"count": len(followers), "users": [{"user": user or None, "name": name} for name, user in users]}

    def take_changed(self):
        with self._lock:
            changed, self.changed = self.changed, set()
            return changed


# ---------------------------------------------------------------------------
# Housekeeper
# ---------------------------------------------------------------------------

class Housekeeper(threading.Thread):
    """One background thread: notices parked clients that hang up, and runs periodic upkeep.

    A thread blocked in Event.wait never reads its socket, so on its own it would keep
    a vanished client's thread and socket until the timeout.  Parked sockets are
    registered with a selector; when one becomes readable (the client closed, or sent
    something) the waiter is claimed and woken.  Idle parked waiters cost nothing:
    the selector sleeps in the kernel.

    Only this thread touches the selector.  Handlers queue their changes and it
    applies them each tick: a selector call is a system call that lets go of the GIL,
    and made by thousands of re-parking threads under a shared lock it became a
    convoy that stalled the server.

    Upkeep: heartbeats for quiet event streams, forgetting rate-limit entries that have
    refilled, and every UPKEEP_INTERVAL_S pruning the history and checkpointing the WAL.
    """

    def __init__(self, server):
        super().__init__(name="chat-housekeeper", daemon=True)
        self.server = server
        self._selector = selectors.DefaultSelector()
        self._limited = isinstance(self._selector, selectors.SelectSelector)
        self._changes = collections.deque()     # (watch?, waiter); deque appends are thread-safe
        self._stop = threading.Event()
        self._next_upkeep = time.monotonic() + HOUSEKEEPING_INTERVAL_S
        self._next_storage_upkeep = time.monotonic() + UPKEEP_INTERVAL_S
        self._storage_upkeep = None     # the thread pruning and checkpointing, while it runs
        self._storage_failing = False

    def watch(self, waiter):
        self._changes.append((True, waiter))

    def unwatch(self, waiter):
        self._changes.append((False, waiter))

    def _apply_changes(self):
        selector = self._selector
        selector_map = selector.get_map()
        while self._changes:
            watch, waiter = self._changes.popleft()
            key = selector_map.get(waiter.fd)
            if not watch:
                if key is not None and key.data is waiter:
                    selector.unregister(waiter.fd)
                continue
            if not self.server.registry.is_parked(waiter):
                continue        # answered before we got to it
            if key is not None:
                selector.unregister(waiter.fd)  # left by a closed socket whose number was reused
            if self._limited and len(selector_map) >= SELECT_WATCH_LIMIT:
                continue        # not watched: the waiter still ends at its timeout
            try:
                selector.register(waiter.fd, selectors.EVENT_READ, waiter)
            except (ValueError, OSError):
                pass            # closed meanwhile

    def run(self):
        try:
            while not self._stop.is_set():
                self._apply_changes()
                try:
                    ready = self._selector.select(HOUSEKEEPING_INTERVAL_S)
                except OSError:
                    ready = []      # select() on a socket closed meanwhile; the next call is fresh
                woken = []
                # Preferably not while posts write their answers: answered clients send
                # their next request at once, and handling that readiness here would trade
                # the GIL with the writing thread at every send.  Only for a tick, though:
                # under a steady stream of posts, hang-ups must still be noticed.
                if ready:
                    self.server.fanouts_idle.wait(HOUSEKEEPING_INTERVAL_S)
                for key, _ in ready:
                    waiter = key.data
                    # Answered meanwhile (its client may already be sending the next
                    # request): stop watching, or the socket stays readable and select()
                    # returns at once, again and again, until the handler catches up.
                    if not self.server.registry.is_parked(waiter):
                        self._selector.unregister(waiter.fd)
                        continue
                    outcome = waiter.peek()
                    if outcome is None:
                        continue
                    self._selector.unregister(waiter.fd)
                    if self.server.registry.claim(waiter):
                        waiter.outcome = outcome
                        woken.append(waiter)
                # Set the Events only now, so that the woken threads do not compete for
                # the GIL with this loop's system calls.
                for waiter in woken:
                    waiter.event.set()
                if time.monotonic() >= self._next_upkeep:
                    self._upkeep()
        finally:
            self._selector.close()

    def _upkeep(self):
        now = time.monotonic()
        self._next_upkeep = now + HOUSEKEEPING_INTERVAL_S
        self.server.send_heartbeats(now)
        self.server.rate_limiter.forget_idle(now)
        self.server.presence.forget_gone(now)
        self.server.send_presence(now)
        if now >= self._next_storage_upkeep and not (self._storage_upkeep and self._storage_upkeep.is_alive()):
            # A prune of a large history takes seconds: on a thread of its own, so that
            # this one goes on noticing hang-ups and writing heartbeats meanwhile.
            self._next_storage_upkeep = now + UPKEEP_INTERVAL_S
            self._storage_upkeep = threading.Thread(target=self._upkeep_storage, name="chat-upkeep", daemon=True)
            self._storage_upkeep.start()

    def _upkeep_storage(self):
        config, store = self.server.config, self.server.store
        try:
            store.prune(config.retain_count, config.retain_days)
            store.checkpoint()
        except StorageError as exc:
            if not self._storage_failing:   # once, not every 30 s
                self.server.log("database upkeep failed (will retry): %s" % exc)
            self._storage_failing = True
        except Exception:
            self.server.log("database upkeep failed\n%s" % traceback.format_exc())
        else:
            self._storage_failing = False

    def stop(self):
        """Ask the thread to end at its next tick (it closes its selector itself)."""
        self._stop.set()


# ---------------------------------------------------------------------------
# HTTP server
# ---------------------------------------------------------------------------

class WorkerPool:
    """Runs each connection on its own thread, and keeps finished threads for reuse.

    Creating and destroying thousands of threads at once (a burst of clients, then
    all of them leaving) stalls the process on the GIL; reused threads avoid it, and
    idle ones leave one by one, at spread-out times.
    """

    def __init__(self, idle_seconds=THREAD_IDLE_S):
        self.idle_seconds = idle_seconds
        self._lock = threading.Lock()
        self._idle = {}         # worker -> None, most recently idle last
        self._workers = set()
        self._closed = False
        self.busy = 0

    def submit(self, function, request, client_address):
        """Run function(request, client_address) on a thread; RuntimeError if none can be had."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the pool is closed")
            worker = self._idle.popitem()[0] if self._idle else None
            self.busy += 1
        if worker is not None:
            worker.job = (function, request, client_address)
            worker.go.release()
            return
        worker = _Worker(self, (function, request, client_address))
        with self._lock:
            self._workers.add(worker)
        try:
            worker.start()
        except RuntimeError:
            with self._lock:
                self._workers.discard(worker)
                self.busy -= 1
            raise

    def work(self, worker):
        """The body of each worker thread: run its job, then wait to be handed another."""
        try:
            while True:
                function, request, client_address = worker.job
                worker.job = None
                try:
                    # Called with plain arguments, not *args: CPython 3.11+ then runs it
                    # without a new C stack frame, which a parked thread keeps paying for.
                    function(request, client_address)
                except Exception:
                    traceback.print_exc()   # process_request_thread handles its own; this is a bug
                with self._lock:
                    self.busy -= 1
                    if self._closed:
                        return
                    self._idle[worker] = None
                patience = self.idle_seconds * (1 + random.random() / 2)
                if worker.go.acquire(timeout=patience):
                    if worker.job is None:
                        return      # woken by close()
                    continue
                with self._lock:
                    if self._idle.pop(worker, True) is None:
                        return      # still idle: leave
                worker.go.acquire()  # a job was handed over as we timed out
                if worker.job is None:
                    return
        finally:
            with self._lock:
                self._workers.discard(worker)

    def stats(self):
        with self._lock:
            return {"threads": len(self._workers), "threads_busy": self.busy}

    def close(self, timeout):
        """Let idle threads go, and wait up to `timeout` s for busy ones to finish."""
        with self._lock:
            self._closed = True
            idle, self._idle = list(self._idle), {}
        for worker in idle:
            worker.go.release()
        deadline = time.monotonic() + timeout
        with self._lock:
            workers = list(self._workers)
        for worker in workers:
            worker.join(max(0.0, deadline - time.monotonic()))


class _Worker:
    """A WorkerPool thread, started with _thread rather than as a threading.Thread.

    Thread.start() waits until the new thread runs, and under load that means winning
    the GIL from every busy thread: a burst of new clients then waited behind one thread
    start after another (48 new connections beside 16 busy ones got their first answers
    after up to 106 ms, against 4.5 ms when the threads already existed).  A bare thread
    also spares each parked waiter the Thread object's own bookkeeping.  Like daemon
    threads, these end with the process; close() waits for them through `ended`.
    """

    __slots__ = ("pool", "job", "go", "ended")

    def __init__(self, pool, job):
        self.pool, self.job = pool, job
        self.go = threading.Lock()      # released to hand the thread a job (or to end it)
        self.go.acquire()
        self.ended = threading.Lock()   # released when the thread has finished
        self.ended.acquire()

    def start(self):
        _thread.start_new_thread(self._run, ())

    def _run(self):
        try:
            # Calls the pool directly, with plain arguments, for the same reason as in work().
            self.pool.work(self)
        finally:
            self.ended.release()

    def join(self, timeout):
        if self.ended.acquire(timeout=max(0.0, timeout)):
            self.ended.release()


class UnsentBudget:
    """Bytes of answers being written to clients at once, within MAX_UNSENT_BYTES."""

    #: Bytes an answer adds to each message's JSON (a comma; an event's id and data lines).
    FRAMING_BYTES = 64

    def __init__(self, limit):
        self.limit = limit
        self._lock = threading.Lock()
        self.bytes = 0

    @contextlib.contextmanager
    def hold(self, messages):
        """The longest run of `messages` from the start (at least one) whose answer fits what
        is left of the budget, held while the caller writes it."""
        sizes = [len(m.json) + self.FRAMING_BYTES for m in messages]
        wanted = sum(sizes)
        with self._lock:
            granted = max(sizes[0], min(wanted, self.limit - self.bytes))
            self.bytes += granted
        try:
            if granted < wanted:
                total, count = 0, 0
                for size in sizes:
                    total += size
                    if total > granted and count:
                        break
                    count += 1
                messages = messages[:count]
            yield messages
        finally:
            self.release(granted)

    def take(self, size):
        """Count `size` more bytes if they fit in what is left; False (nothing counted) if not."""
        with self._lock:
            if self.bytes + size > self.limit:
                return False
            self.bytes += size
            return True

    def release(self, size):
        if size:
            with self._lock:
                self.bytes -= size


class ChatServer(ThreadingHTTPServer):
    """ThreadingHTTPServer that owns the store, the waiters and the limits its handlers share."""

    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, address, config, store):
        self.config = config
        self.store = store
        self.registry = WaiterRegistry(config.max_waiters)
        self.presence = Presence()
        self._presence_sent = {}    # room -> when its streams were last told (monotonic)
        self.pool = WorkerPool()
        self.rate_limiter = RateLimiter(config.rate, config.burst)
        self.unsent = UnsentBudget(MAX_UNSENT_BYTES)
        self.statuses = collections.Counter()   # answers sent, by status code
        self.stream_events = 0      # events written to streams by the fan-out (under _lock)
        self.streams_cut = 0        # streams ended because their client read too slowly
        self.polls_cut = 0          # parked polls ended because their answer found no room
        self.started = time.monotonic()
        self.closing = False
        self._lock = threading.Lock()
        self._waking = {}           # room -> a post came during its fan-out (under _lock)
        self.fanouts_idle = threading.Event()   # no fan-out running (see Housekeeper.run)
        self.fanouts_idle.set()
        self._connections = {}      # socket -> handler (None until it has one)
        self._date = (0, "")
        self.static_headers = self._static_headers()
        self.cached_headers = self._static_headers("public, max-age=%d" % config.edge_cache)
        self.housekeeper = Housekeeper(self)
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, ChatHandler)
        self.policy = AccessPolicy(config, address[0], self.server_address[1])
        self.page = build_page(PAGE_HTML)
        self.housekeeper.start()

    def _static_headers(self, cache_control="no-store"):
        headers = "Cache-Control: %s\r\nX-Content-Type-Options: nosniff\r\n" % cache_control
        if self.config.cors_origin:
            headers += ("Access-Control-Allow-Origin: %s\r\nVary: Origin\r\n" % self.config.cors_origin)
        return headers

    def cacheable(self, room):
        """True if a poll's answer of messages in `room` may be kept by a shared cache: with
        --edge-cache, for a room that anyone may read.  Such an answer is a fact about its URL
        that later posts do not change (edits and deletes arrive as later messages)."""
        return bool(self.config.edge_cache) and not self.policy.token and self.policy.may_read(None, room)

    def render_answer(self, body, connection, cacheable, head_only=False):
        """A poll's answer of messages: `cacheable` ones public for --edge-cache seconds, with an ETag."""
        if not cacheable:
            return self.render(HTTPStatus.OK, body, connection=connection, head_only=head_only)
        return self.render(HTTPStatus.OK, body, headers={"ETag": answer_tag(body)}, connection=connection,
                           head_only=head_only, static_headers=self.cached_headers)

    def server_bind(self):
        if self.address_family == socket.AF_INET6:
            # accept IPv4 too where the host is "::" (see http.server's DualStackServer)
            try:
                self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            except (AttributeError, OSError):
                pass
        super().server_bind()

    # -- connections --

    def get_request(self):
        try:
            return super().get_request()
        except OSError as exc:
            # Out of file descriptors: the listening socket stays readable, so without a
            # pause socketserver would spin at 100% CPU retrying accept().
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                time.sleep(0.05)
            raise

    def process_request(self, request, client_address):
        with self._lock:
            full = len(self._connections) >= self.config.max_connections or self.closing
            if not full:
                self._connections[request] = None
        if full:
            self._refuse(request, "the server has too many open connections; try again shortly")
            return
        try:
            self.pool.submit(self.process_request_thread, request, client_address)
        except RuntimeError:
            with self._lock:
                self._connections.pop(request, None)
            self._refuse(request, "the server cannot start another thread; try again shortly")

    def _refuse(self, request, reason):
        data = self.render(HTTPStatus.SERVICE_UNAVAILABLE, json_bytes({"error": reason}),
                           headers={"Retry-After": str(RETRY_AFTER_S)}, connection="close")
        try:
            request.setblocking(False)
            request.send(data)
        except OSError:
            pass        # it was a courtesy; the connection is closed either way
        self.shutdown_request(request)

    def track(self, request, handler):
        with self._lock:
            if request in self._connections:
                self._connections[request] = handler

    def shutdown_request(self, request):
        with self._lock:
            self._connections.pop(request, None)
        super().shutdown_request(request)

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], ConnectionError):
            return      # the client left; nothing to fix
        self.log("error on connection from %s\n%s" % (client_address, traceback.format_exc()))

    # -- responses shared by handlers and by the fan-out --

    def http_date(self):
        second = int(time.time())
        if self._date[0] != second:
            self._date = (second, email.utils.formatdate(second, usegmt=True))
        return self._date[1]

    def render(self, status, body, content_type="application/json; charset=utf-8",
               headers=None, connection=None, head_only=False, static_headers=None):
        """A complete HTTP/1.1 response as bytes, to be sent in one write.

        `connection` is None, "close" or "keep-alive" (said to HTTP/1.0 clients that asked
        for it).  A 204 has no Content-Length (RFC 9110 8.6), nor has a `body` of None (the
        head of an event stream, which ends with its connection); HEAD gets the headers only.
        """
        length = "" if status == HTTPStatus.NO_CONTENT or body is None else "Content-Length: %d\r\n" % len(body)
        lines = [STATUS_LINES[status], "Date: %s\r\nServer: chat_server/%s\r\nContent-Type: %s\r\n%s%s"
                 % (self.http_date(), __version__, content_type, length, static_headers or self.static_headers)]
        for name, value in (headers or {}).items():
            lines.append("%s: %s\r\n" % (name, value))
        if connection:
            lines.append("Connection: %s\r\n" % connection)
        lines.append("\r\n")
        head = "".join(lines).encode("latin-1")
        return head if head_only or body is None else head + body

    def wake(self, room):
        """Answer every poll of `room` that has news and feed its streams: write to each
        socket, then wake the threads.

        Writing here, one non-blocking send per waiter with one shared answer per
        cursor, costs far less than waking thousands of threads to each build and
        send their own; the threads are woken afterwards only to read their next request.
        One fan-out runs per room at a time: a post that lands during it asks for one
        more pass instead of queueing behind it, so a burst of posts costs a pass or two,
        and rooms never wait for each other.
        """
        with self._lock:
            if room in self._waking:
                self._waking[room] = True
                return
            self._waking[room] = False
            self.fanouts_idle.clear()
        try:
            again = True
            while again:
                self._fan_out(room)
                with self._lock:
                    again = self._waking[room]
                    self._waking[room] = False
        finally:
            with self._lock:
                del self._waking[room]
                if not self._waking:
                    self.fanouts_idle.set()

    def _fan_out(self, room):
        newest = self.store.newest_in(room)
        if newest is None:
            return
        claimed = self.registry.claim_answerable(room, newest)
        if claimed:
            self._answer_polls(room, claimed)
        streams = self.registry.streams_in(room)
        if streams:
            self._feed_streams(room, streams, newest)

    def _answer_polls(self, room, claimed):
        # One answer per distinct (after, limit), built when its group's turn comes and
        # dropped after it, so a room's polls on a thousand distinct cursors hold one
        # answer at a time, not a thousand.  What a socket does not take at once stays
        # with its waiter, counted in the unsent budget; a client whose rest does not fit
        # is disconnected (it polls again with its cursor and loses nothing).
        groups = {}
        for waiter in claimed:
            groups.setdefault((waiter.after, waiter.limit), []).append(waiter)
        answered = cut = 0
        cacheable = self.cacheable(room)
        for (after, limit), waiters in groups.items():
            try:
                messages = self.store.newer(room, after, limit)
            except (CursorGone, CursorAhead, StorageError):
                messages = []   # e.g. pruned meanwhile: its next poll gets the real answer
            with self.unsent.hold(messages) as fitting:
                body = encode_list(fitting) if fitting else b"[]\n"
                responses = {}
                for waiter in waiters:
                    data = responses.get(waiter.connection)
                    if data is None:
                        data = responses[waiter.connection] = self.render_answer(
                            body, waiter.connection, cacheable and bool(fitting))
                    waiter.send_nowait(data)
                    if waiter.outcome is not None:
                        continue        # hung up: nothing was sent
                    if waiter.unsent and not self.unsent.take(len(waiter.unsent)):
                        waiter.unsent, waiter.outcome = b"", SLOW
                        cut += 1
                        continue
                    waiter.held = len(waiter.unsent)
                    waiter.outcome = ANSWERED
                    answered += 1
        if answered:
            self.count_status(HTTPStatus.OK, answered)     # not the hung up: nothing was sent to them
        if cut:
            with self._lock:
                self.polls_cut += cut
        for waiter in claimed:
            waiter.event.set()

    def _feed_streams(self, room, streams, newest):
        # Write each live stream the events after its cursor, page after page until it
        # has `newest`.  Streams are grouped by cursor (after a post, nearly all share
        # one) and a page is encoded once per group, one group at a time.  A stream that
        # does not take a page whole at once is ended at that instant (see Waiter).
        groups = {}
        for stream in streams:
            if stream.live:
                groups.setdefault(stream.after, []).append(stream)
        ended, delivered = [], 0
        for after, group in groups.items():
            while group and (after is None or after < newest):
                data, last, count = self._events_after(room, after)
                if not data:
                    if data is None:    # its cursor is no longer valid: reconnecting gets a reset
                        ended.extend((stream, HUNG_UP) for stream in group)
                    break
                now, next_group = time.monotonic(), []
                for stream in group:
                    with stream.lock:
                        if not stream.live:
                            continue    # ended meanwhile
                        if stream.after != after:
                            continue    # moved by another pass; the room's next pass serves it
                        failure = stream.send_all_nowait(data)
                        if failure is None:
                            stream.after, stream.last_write = last, now
                            next_group.append(stream)
                            delivered += count
                        else:
                            stream.live = False
                            ended.append((stream, failure))
                group, after = next_group, last
                del data
        if delivered:
            with self._lock:
                self.stream_events += delivered
        self._end_streams(ended)

    def _events_after(self, room, after):
        try:
            messages = self.store.newer(room, after, MAX_LIMIT)
        except (CursorGone, CursorAhead, StorageError):
            return None, None, 0
        if not messages:
            return b"", None, 0
        return encode_events(messages), messages[-1].id, len(messages)

    def _end_streams(self, ended):
        """End the streams of [(stream, SLOW or HUNG_UP)]; only slow readers count as cut."""
        for stream, outcome in ended:
            if self.registry.claim(stream):
                stream.outcome = outcome
                if outcome == SLOW:
                    with self._lock:
                        self.streams_cut += 1
                stream.event.set()

    def send_presence(self, now):
        """Tell the streams that asked (?presence=1) who follows their room, where that changed,
        at most once per PRESENCE_EVENT_INTERVAL_S per room."""
        later = set()
        for room in self.presence.take_changed():
            if now - self._presence_sent.get(room, -math.inf) < PRESENCE_EVENT_INTERVAL_S:
                later.add(room)
                continue
            self._presence_sent[room] = now
            streams = [s for s in self.registry.streams_in(room) if s.presence]
            if streams:
                self._write_to_streams(streams, b"event: presence\ndata: %s\n" % json_bytes(self.presence.of(room)), now)
        for room in set(self._presence_sent) - later:
            if now - self._presence_sent[room] >= PRESENCE_EVENT_INTERVAL_S:
                del self._presence_sent[room]       # forgotten once quiet, so the dict stays small
        self.presence.changed.update(later)

    def _write_to_streams(self, streams, data, now):
        slow = []
        for stream in streams:
            with stream.lock:
                if not stream.live:
                    continue
                failure = stream.send_all_nowait(data)
                if failure is None:
                    stream.last_write = now
                else:
                    stream.live = False
                    slow.append((stream, failure))
        self._end_streams(slow)

    def send_heartbeats(self, now):
        """Write a comment line to every event stream that has been quiet for HEARTBEAT_S."""
        due = [s for s in self.registry.all_streams() if s.live and now - s.last_write >= HEARTBEAT_S]
        if due:
            self._write_to_streams(due, b":\n\n", now)

    # -- for programs that embed the server --

    def post(self, room, body, author=None, user=None):
        """Store a message in `room` as a post would, wake its followers, and return it.

        The way for a program to post (the store alone would wake nobody): the same
        checks as an HTTP post's body, and RoomLimitReached or StorageError as there.
        """
        if not ROOM_NAME.match(room):
            raise ValueError("%r is not a room name" % room)
        fields = _validate_fields({"body": body, "author": author})
        message = self.store.add(room, fields["body"], fields["author"], None, user)
        self.wake(room)
        return message

    def start(self):
        """Serve on a daemon thread of its own; return self (stop() ends it)."""
        self._serving = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.2},
                                         name="chat-server", daemon=True)
        self._serving.start()
        return self

    def stop(self, timeout=5.0):
        """End serving (answering every waiter as at Ctrl-C) and close the database."""
        serving = getattr(self, "_serving", None)
        if serving is not None and serving.is_alive():
            self.shutdown()
        self.server_close()
        if serving is not None:
            serving.join(timeout)

    # -- status and shutdown --

    def stats(self):
        """Counters and gauges for /stats and /metrics."""
        with self._lock:
            connections = len(self._connections)
        stats = {"waiters": self.registry.count - self.registry.streams, "streams": self.registry.streams,
                 "connections": connections, "wakeups": self.registry.wakeups}
        stats.update(self.pool.stats())
        stats.update(self.store.stats())
        stats["stream_events"] = self.stream_events
        stats["streams_cut"] = self.streams_cut
        stats["polls_cut"] = self.polls_cut
        stats["unsent_bytes"] = self.unsent.bytes
        database = self.store.database
        stats["writable"] = database is None or database.unwritable is None
        stats["uptime"] = round(time.monotonic() - self.started, 3)
        stats["rss_bytes"] = resident_bytes()
        return stats

    def count_status(self, code, count=1):
        if not isinstance(code, int):
            return
        with self._lock:
            self.statuses[code] += count

    def status_counts(self):
        """{status code: answers sent} since start."""
        with self._lock:
            return dict(self.statuses)

    def log(self, message):
        sys.stderr.write("chat_server: %s\n" % printable(message, keep_newlines=True))

    def server_close(self):
        """Stop listening, answer every parked poll with [] and end every stream, and let the threads finish."""
        self.closing = True
        super().server_close()
        self.housekeeper.stop()
        goodbye = self.render(HTTPStatus.OK, b"[]\n", connection="close")
        waiters = self.registry.claim_all()
        for waiter in waiters:
            if not waiter.stream:
                waiter.send_nowait(goodbye)
            waiter.outcome = CLOSING
        for waiter in waiters:
            waiter.event.set()
        with self._lock:
            handlers = [h for h in self._connections.values() if h is not None]
        for handler in handlers:
            handler.interrupt_if_idle()
        self.pool.close(timeout=1.5)
        self.store.close()


def answer_tag(body):
    """The ETag of an answer: a digest of its bytes."""
    return '"%s"' % hashlib.blake2b(body, digest_size=12).hexdigest()


def resident_bytes():
    """This process's resident memory in bytes, where the platform says."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def json_bytes(obj):
    """`obj` as compact UTF-8 JSON ending in a newline (for people reading it in a terminal)."""
    return JSON_ENCODER.encode(obj).encode() + b"\n"


_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u2028-\u202e\u2066-\u2069]")


def printable(text, keep_newlines=False):
    """`text` with control and bidirectional-override characters escaped, for the logs."""
    def escape(match):
        char = match.group()
        if keep_newlines and char == "\n":
            return char
        return "\\x%02x" % ord(char) if ord(char) < 0x100 else "\\u%04x" % ord(char)
    return _UNPRINTABLE.sub(escape, text)


# ---------------------------------------------------------------------------
# Request reading
# ---------------------------------------------------------------------------

class HTTPError(Exception):
    """An answer other than success: status, message for the client, extra JSON and headers.

    `close` says the connection must end after the answer: the request's framing is
    unknown or its body unread, so the bytes after it cannot be trusted to be a request.
    """

    def __init__(self, status, message, extra=None, headers=None, close=False):
        super().__init__(message)
        self.status = HTTPStatus(status)
        self.message = message
        self.extra = extra or {}
        self.headers = headers or {}
        self.close = close


def framing_error(message, status=HTTPStatus.BAD_REQUEST):
    return HTTPError(status, message, close=True)


_METHOD = re.compile(r"[A-Z][A-Z_-]{0,19}\Z")
_TARGET = re.compile(r"[\x21-\x7e]+\Z")
_VERSION = re.compile(r"HTTP/([0-9])\.([0-9])\Z")
_ABSOLUTE = re.compile(r"https?://[^/?#]+(/|\Z)", re.I)
_FIELD_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
#: A whole header line (name, colon, value; obs-text allowed, controls but tab refused).
_FIELD_LINE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+:[^\x00-\x08\x0a-\x1f\x7f]*\Z")
_BAD_FIELD_BYTE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_DIGITS = re.compile(r"[0-9]+\Z")
_BARE_CR = re.compile(rb"\r(?!\n)")
#: Optional whitespace (RFC 9110 5.6.3): SP and HTAB only.  Python's str.strip() with no
#: argument also strips NBSP, NEL and other Unicode spaces, which header values decoded as
#: Latin-1 can hold ("chunked\xa0" must not be read as chunked: nginx answers 501).
OWS = " \t"
_CR_NOT_LF = re.compile(rb"\r[^\n]")      # in a head still arriving: a CR at its end may be half a CRLF
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(;.*)?\Z")
#: Fields that must not appear twice: a second one would be read differently by different
#: parsers (request smuggling, a confused Host or token check).
SINGLE_FIELDS = frozenset(("host", "content-length", "transfer-encoding", "content-type", "authorization",
                           "origin", "expect", "last-event-id", "sec-fetch-site"))
#: Fields that say where the body ends: read as strictly as nginx reads them.
FRAMING_FIELDS = frozenset(("content-length", "transfer-encoding"))
SAFE_METHODS = frozenset(("GET", "HEAD", "OPTIONS"))


class Request:
    """One request as read off the wire: its line, its headers (lower-case names), its framing."""

    __slots__ = ("method", "target", "version", "headers", "line", "keep_alive", "length",
                 "chunked", "expect_continue", "body_done")

    def __init__(self, method, target, version, headers, line):
        self.method, self.target, self.version, self.headers, self.line = method, target, version, headers, line
        self.keep_alive = True
        self.length = 0             # body bytes announced by Content-Length (0 when chunked)
        self.chunked = False
        self.expect_continue = False
        self.body_done = True       # nothing left of this request on the connection


def parse_head(head):
    """A Request from the bytes of a request line and its header lines (each ending in LF).

    As strict as nginx or more: HTTPError 400 (or 414, 431, 505, 501, 413) with close for
    anything that a proxy in front could read differently.
    """
    if _BARE_CR.search(head):
        raise framing_error("a bare CR in the request head")
    # Every CR is now part of a CRLF: read the head as lines ending in LF.
    lines = head.decode("latin-1").replace("\r\n", "\n").split("\n")
    lines.pop()     # after the last line end
    request_line = lines[0]
    if len(request_line) > MAX_REQUEST_LINE_BYTES:
        raise framing_error("the request line is longer than %d bytes" % MAX_REQUEST_LINE_BYTES,
                            HTTPStatus.REQUEST_URI_TOO_LONG)
    parts = request_line.split(" ")
    if len(parts) != 3:
        raise framing_error("the request line must be METHOD SP TARGET SP HTTP/1.1")
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        if _VERSION.match(version):
            raise framing_error("HTTP version %s is not supported; use HTTP/1.1" % version,
                                HTTPStatus.HTTP_VERSION_NOT_SUPPORTED)
        raise framing_error("the request line must end in HTTP/1.1 or HTTP/1.0")
    if not _METHOD.match(method):
        raise framing_error("the method must be a word in capitals, such as GET or POST")
    if not _TARGET.match(target) or not (target.startswith("/") or _ABSOLUTE.match(target)):
        raise framing_error("the request target must be a path starting with / (printable ASCII, no spaces)")
    if len(head) - len(request_line) > MAX_HEADER_BYTES + 2 * len(lines):
        raise framing_error("the headers are longer than %d bytes" % MAX_HEADER_BYTES,
                            HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)
    if len(lines) - 1 > MAX_HEADERS:
        raise framing_error("more than %d header lines" % MAX_HEADERS, HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)
    headers = {}
    for line in lines[1:]:
        if not _FIELD_LINE.match(line) or len(line) > MAX_HEADER_LINE_BYTES:
            raise _refused_field_line(line)
        name, _, value = line.partition(":")
        key = name.lower()
        value = value.strip(OWS)
        if key in headers:
            if key in SINGLE_FIELDS:
                raise framing_error("two %s headers" % name)
            headers[key] += ", " + value
        else:
            headers[key] = value
            if key in FRAMING_FIELDS and "\t" in line:
                raise framing_error("a tab in header %s" % name)    # as nginx refuses it
    request = Request(method, target, version, headers, request_line)
    _check_framing(request)
    return request


def _refused_field_line(line):
    """The HTTPError for a header line that _FIELD_LINE refused, saying why."""
    if len(line) > MAX_HEADER_LINE_BYTES:
        return framing_error("a header line is longer than %d bytes" % MAX_HEADER_LINE_BYTES,
                             HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)
    if line[:1] in (" ", "\t"):
        return framing_error("folded header lines (starting with a space) are not accepted")
    name, colon, _ = line.partition(":")
    if not colon:
        return framing_error("a header line without a colon")
    if not _FIELD_NAME.match(name):
        return framing_error("invalid header name %r (no spaces before the colon)" % name[:40])
    return framing_error("a control character in header %s" % name)


def _check_framing(request):
    # RFC 9112 6: how the body is delimited, decided before anything else is done.
    headers, http10 = request.headers, request.version == "HTTP/1.0"
    if not http10 and not headers.get("host"):
        raise framing_error("an HTTP/1.1 request needs one non-empty Host header")
    connection = headers.get("connection")
    if connection is None:
        request.keep_alive = not http10
    else:
        tokens = {t.strip(OWS) for t in connection.lower().split(",")}
        request.keep_alive = "close" not in tokens and (not http10 or "keep-alive" in tokens)
    coding, length = headers.get("transfer-encoding"), headers.get("content-length")
    if coding is not None:
        if http10:
            raise framing_error("Transfer-Encoding is not allowed in an HTTP/1.0 request")
        if length is not None:
            raise framing_error("send Content-Length or Transfer-Encoding, not both")
        codings = [c.strip(OWS).lower() for c in coding.split(",")]
        if codings != ["chunked"]:
            if "" in codings or "chunked" in codings[:-1]:
                raise framing_error("chunked must be the last and only transfer coding")
            raise framing_error("only Transfer-Encoding: chunked is supported", HTTPStatus.NOT_IMPLEMENTED)
        request.chunked, request.body_done = True, False
    elif length is not None:
        if not _DIGITS.match(length):
            raise framing_error("Content-Length must be digits only, got %r" % length[:40])
        request.length = int(length) if len(length) <= 15 else MAX_BODY_BYTES + 1
        if request.length > MAX_BODY_BYTES:
            raise framing_error("the body is %s bytes; requests may have at most %d"
                                % (length[:20], MAX_BODY_BYTES), HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        request.body_done = request.length == 0
    expect = headers.get("expect")
    if expect is not None and not http10:
        if expect.lower() != "100-continue":
            raise framing_error("the only expectation this server meets is 100-continue",
                                HTTPStatus.EXPECTATION_FAILED)
        request.expect_continue = not request.body_done


class RequestReader:
    """Reads requests off one connection, with the connection's time limits.

    Between requests a connection may stay silent for `idle_timeout` seconds; once a
    request's first byte arrives, all of it (line, headers, body) must arrive within
    `request_timeout`, so a client trickling bytes (slowloris) cannot hold a thread.
    Bytes after a request stay in `buffer` for the next one (pipelining).
    """

    __slots__ = ("sock", "buffer", "idle_timeout", "request_timeout", "idle", "_deadline")

    def __init__(self, sock, idle_timeout, request_timeout):
        self.sock, self.idle_timeout, self.request_timeout = sock, idle_timeout, request_timeout
        self.buffer = bytearray()
        self.idle = True
        self._deadline = 0.0

    def _started(self):
        self.idle = False
        self._deadline = time.monotonic() + self.request_timeout

    def _fill(self):
        """Receive more bytes into the buffer; False at the end of the stream."""
        if self.idle:
            timeout = self.idle_timeout
        else:
            timeout = self._deadline - time.monotonic()
            if timeout <= 0:
                raise socket.timeout("the request took longer than %g s to arrive" % self.request_timeout)
        if self.sock.gettimeout() != timeout:
            self.sock.settimeout(timeout)   # a system call: skipped in the usual case
        # recv() allocates its buffer before it waits, and a keep-alive connection waits
        # between requests: ask for little then, more once a request is coming in.
        data = self.sock.recv(IDLE_RECV_BYTES if self.idle else RECV_BYTES)
        if not data:
            return False
        if self.idle:
            self._started()
        self.buffer += data
        return True

    def read_request(self):
        """The next Request, None when the client closed the connection between requests."""
        self.idle = True
        buffer = self.buffer
        if buffer:
            self._started()     # pipelined: it arrived with the previous one
        scanned = 0
        while True:
            # RFC 9112 2.2: empty lines before a request line are ignored.
            while buffer.startswith(b"\r\n") or buffer.startswith(b"\n"):
                del buffer[:2 if buffer[0] == 13 else 1]
                scanned = 0
            end = buffer.find(b"\n\r\n", max(0, scanned - 2))
            crlf = end >= 0
            lf_end = buffer.find(b"\n\n", max(0, scanned - 1), end + 1 if crlf else len(buffer))
            if lf_end >= 0:
                end, crlf = lf_end, False
            if end >= 0:
                head = bytes(buffer[:end + 1])
                del buffer[:end + (3 if crlf else 2)]
                return parse_head(head)
            self._check_partial_head(max(0, scanned - 1))
            scanned = len(buffer)
            if not self._fill():
                if buffer:
                    raise ConnectionAbortedError("the client closed the connection in the middle of a request")
                return None

    def _check_partial_head(self, start):
        # Refuse an oversized head as soon as it shows, not after reading all of it. Only
        # the bytes from `start` on are new: scanning all of them each time would make a
        # head sent a byte at a time cost the square of its length.
        buffer = self.buffer
        if _CR_NOT_LF.search(buffer, start):
            raise framing_error("a bare CR in the request head")
        first_end = buffer.find(b"\n")
        if first_end < 0:
            if len(buffer) > MAX_REQUEST_LINE_BYTES:
                raise framing_error("the request line is longer than %d bytes" % MAX_REQUEST_LINE_BYTES,
                                    HTTPStatus.REQUEST_URI_TOO_LONG)
            return
        if len(buffer) - first_end > MAX_HEADER_BYTES:
            raise framing_error("the headers are longer than %d bytes" % MAX_HEADER_BYTES,
                                HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)
        if len(buffer) - buffer.rfind(b"\n") > MAX_HEADER_LINE_BYTES + 2:
            raise framing_error("a header line is longer than %d bytes" % MAX_HEADER_LINE_BYTES,
                                HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)

    def read_exactly(self, count):
        while len(self.buffer) < count:
            if not self._fill():
                raise ConnectionAbortedError("the client closed the connection in the middle of a request")
        data = bytes(self.buffer[:count])
        del self.buffer[:count]
        return data

    def _read_line(self, limit):
        """One CRLF-terminated line of a chunked body, without its CRLF."""
        while True:
            end = self.buffer.find(b"\r\n")
            if end >= 0:
                line = bytes(self.buffer[:end])
                del self.buffer[:end + 2]
                if b"\r" in line or b"\n" in line:
                    raise framing_error("a chunked body line must end in CRLF")
                return line
            if len(self.buffer) > limit or b"\n" in self.buffer:
                raise framing_error("a malformed line in the chunked body")
            if not self._fill():
                raise ConnectionAbortedError("the client closed the connection in the middle of a request")

    def read_body(self, request, on_continue):
        """The request's body as bytes, within MAX_BODY_BYTES (413 as soon as it is passed).

        `on_continue` is called first if the client waits for 100 Continue.
        """
        if request.body_done:
            return b""
        if request.expect_continue and not self.buffer:
            on_continue()
        if request.chunked:
            body = self._read_chunked()
        else:
            body = self.read_exactly(request.length)
        request.body_done = True
        return body

    def _read_chunked(self):
        body = bytearray()
        while True:
            match = _CHUNK_SIZE.match(self._read_line(MAX_CHUNK_LINE_BYTES))
            if not match or (match.group(2) and _BAD_FIELD_BYTE.search(match.group(2))):
                raise framing_error("a malformed chunk size in the chunked body")
            size = int(match.group(1), 16)
            if not size:
                break
            if len(body) + size > MAX_BODY_BYTES:
                raise framing_error("the body is over %d bytes" % MAX_BODY_BYTES,
                                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
            body += self.read_exactly(size)
            if self.read_exactly(2) != b"\r\n":
                raise framing_error("chunk data must be followed by CRLF")
        total = 0
        while True:     # the trailer section: read and ignored
            line = self._read_line(MAX_HEADER_LINE_BYTES)
            if not line:
                return bytes(body)
            total += len(line)
            if total > MAX_HEADER_BYTES or not _FIELD_LINE.match(line.decode("latin-1")):
                raise framing_error("a malformed trailer after the chunked body")

    def discard_body(self, request):
        """Read and drop what is left of the request's body; False if the connection must close instead."""
        if request.body_done:
            return True
        if request.expect_continue:
            return False    # told no 100 Continue: it may send its body or not
        try:
            self.read_body(request, None)
        except HTTPError:
            return False
        return True


# ---------------------------------------------------------------------------
# Access policy
# ---------------------------------------------------------------------------

#: Distinct Host values remembered as allowed, so the usual one is checked with a dict lookup.
ACCEPTED_HOSTS_KEPT = 256
_HOST_VALUE = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(?::([0-9]{0,5}))?\Z")


def split_host(value):
    """(name, port or None) of a Host header or URL authority, name in canonical form; None if malformed."""
    match = _HOST_VALUE.match(value)
    if not match:
        return None
    name, port = match.group(1).lower(), match.group(2)
    if name.startswith("["):
        try:
            name = "[%s]" % ipaddress.IPv6Address(name[1:-1]).compressed
        except ValueError:
            return None
    else:
        name = name.rstrip(".")
        if not name:
            return None
    if port:
        port = int(port)
        if port > 65535:
            return None
    return name, port or None


def is_loopback_name(name):
    """True for localhost, names under .localhost, 127.0.0.0/8 and [::1] (as split_host writes them)."""
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(name[1:-1] if name.startswith("[") else name)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


class AccessPolicy:
    """Who may ask what of this server: the Host allow-list, the Origin check, the token.

    A web page the user visits can send requests to a server on their loopback
    interface: a cross-site form or `fetch` POST is sent without asking (only its
    answer is hidden), and a page whose name is re-pointed to 127.0.0.1 (DNS
    rebinding) is even same-origin with the server.  The Host allow-list stops the
    second, the Origin check on every request that changes state stops the first.
    """

    def __init__(self, config, listen_host, port):
        self.port = port
        self.token = config.token
        self.verifier = TokenVerifier(config.jwt_secret) if config.jwt_secret is not None else None
        self.user_header = config.user_header
        self.proxy_networks = config.proxy_addresses
        self.anonymous_rooms = config.anonymous_rooms
        self.identity_required = config.identity
        # Nothing to check on a server without a token and without identity: the usual case.
        self.guarded = bool(self.token) or self.identity_required
        self.cors_origin = config.cors_origin
        names = set(config.allow_hosts)
        listen = split_host(listen_host if ":" not in listen_host else "[%s]" % listen_host)
        self.listen_name = listen[0] if listen else None
        # A server reachable from other machines, with no names given, answers to any
        # Host as before (the start-up warning says so); "*" asks for that explicitly.
        self.any_host = "*" in names or (not names and not is_loopback_name(self.listen_name or ""))
        self.names = frozenset(names - {"*"})
        self._accepted = {}     # Host values already found allowed -> (name, port)

    def host_allowed(self, name, port):
        """True if a request for `name`:`port` is meant for this server."""
        if self.any_host or name in self.names:
            return True     # names from --allow-host: behind a proxy, any port
        if port != self.port and not (port is None and self.port == 80):
            return False
        return is_loopback_name(name) or name == self.listen_name

    def check_host(self, request):
        """The request's (name, port); HTTPError 400 for a malformed Host, 421 for a foreign one."""
        value = request.headers.get("host")
        target = request.target
        if not target.startswith("/"):      # the absolute form (http://host/...): its authority wins
            value = target.split("/", 3)[2]
        if value is None:
            return None     # HTTP/1.0 without Host: it can only be a direct client
        host = self._accepted.get(value)
        if host is not None:
            return host     # the usual case: the name every client of this server sends
        host = split_host(value)
        if host is None:
            raise HTTPError(400, "the Host header %r is not a host name or address with an optional port"
                            % value[:100], close=True)
        if not self.host_allowed(*host):
            raise HTTPError(421, "this server does not answer to the name %r; if it is its name, "
                            "start the server with --allow-host %s" % (value[:100], host[0][:100]))
        if len(self._accepted) < ACCEPTED_HOSTS_KEPT:
            self._accepted[value] = host
        return host

    def origin_allowed(self, origin, request_host):
        """True if a browser page at `origin` may change state here."""
        if self.cors_origin is not None and (self.cors_origin == "*" or origin.lower() == self.cors_origin):
            return True
        scheme, sep, authority = origin.partition("://")
        if not sep or scheme.lower() not in ("http", "https"):
            return False        # "null" (sandboxed frames, file: pages) and the like
        host = split_host(authority)
        if host is None:
            return False
        if host == request_host:
            return True         # the page came from this server, under the name it used
        return not self.any_host and self.host_allowed(*host)

    def check_origin(self, request, request_host):
        """HTTPError 403 unless a state-changing request comes from no page or from this server's own."""
        origin = request.headers.get("origin")
        if origin is not None:
            if not self.origin_allowed(origin, request_host):
                raise HTTPError(403, "requests from web pages at %s may not change anything here "
                                "(see --cors-origin)" % origin[:100])
        elif request.headers.get("sec-fetch-site", "").lower() in ("cross-site", "same-site"):
            raise HTTPError(403, "requests from other web sites may not change anything here")

    def identify(self, request, query_token, peer, warn):
        """Who the request is from: an Identity, or None for an anonymous client.

        The credentials are `Authorization: Bearer ...`, else `query_token` (?token= on
        event streams, which cannot send headers), else the --user-header of a request
        from the proxy.  HTTPError 401 for credentials that are refused.  The proxy is a
        peer whose address is in --proxy-address (loopback unless given: nginx on the
        same machine); the header from any other peer is ignored, and `warn(message)`
        says so.
        """
        given = request.headers.get("authorization", "")
        scheme, _, credentials = given.partition(" ")
        credentials = credentials.strip(OWS) if scheme.lower() == "bearer" else ""
        credentials = credentials or query_token or ""
        if self.token and credentials and hmac.compare_digest(credentials.encode("utf-8", "replace"),
                                                              self.token.encode("utf-8")):
            return SHARED_TOKEN_HOLDER
        if self.verifier is not None and credentials:
            try:
                return self.verifier.verify(credentials)
            except TokenError as exc:
                raise HTTPError(401, "the token was refused: %s" % exc,
                                headers={"WWW-Authenticate": bearer_challenge("invalid_token", str(exc))}) from None
        if credentials:
            raise self._needs_token()
        if self.user_header and self.user_header in request.headers:
            return self._proxy_user(request.headers[self.user_header], peer, warn)
        return None

    def _proxy_user(self, value, peer, warn):
        if not self.is_proxy(peer):
            warn("%s sent by %s, which is not the proxy (--proxy-address): ignored" % (self.user_header, peer))
            return None
        try:
            return Identity(check_user_id(value, "the proxy's %s" % self.user_header), value)
        except ValueError as exc:
            raise HTTPError(400, str(exc)) from None

    def is_proxy(self, peer):
        try:
            address = ipaddress.ip_address(peer.partition("%")[0])
        except ValueError:
            return False
        address = getattr(address, "ipv4_mapped", None) or address
        return any(address in network for network in self.proxy_networks)

    def _needs_token(self):
        return HTTPError(401, "this server needs 'Authorization: Bearer <token>'",
                         headers={"WWW-Authenticate": bearer_challenge()})

    def check_room(self, identity, room, action):
        """HTTPError 401 or 403 unless `identity` (None: anonymous) may `action` ("read" or
        "post") in `room`."""
        if identity is not None:
            if identity.may(action, room):
                return
            raise HTTPError(403, "your sign-in does not let you %s in room %r" % (action, room),
                            headers={"WWW-Authenticate": bearer_challenge(
                                "insufficient_scope", "no %s permission for room %s" % (action, room))})
        if self.identity_required:
            if rooms_match(self.anonymous_rooms, room):
                return
            raise HTTPError(401, "room %r needs a sign-in: send 'Authorization: Bearer <token>' (anonymous "
                            "clients may use only the rooms that --anonymous-rooms names)" % room,
                            headers={"WWW-Authenticate": bearer_challenge()})
        if self.token:
            raise self._needs_token()

    def check_room_list(self, identity):
        """HTTPError 401 unless `identity` (None: anonymous) may list rooms (those it may read)."""
        if identity is None and self.token and not self.identity_required:
            raise self._needs_token()

    def may_read(self, identity, room):
        """True if `identity` may read `room` (without an access rule, anyone may)."""
        if identity is not None:
            return identity.may("read", room)
        return not self.identity_required or rooms_match(self.anonymous_rooms, room)

    def check_admin(self, identity):
        """HTTPError 401 or 403 unless `identity` may read /stats and /metrics."""
        if identity is not None and identity.admin:
            return
        if identity is not None:
            raise HTTPError(403, "/stats and /metrics are for admins (a token with \"admin\": true, or --token)",
                            headers={"WWW-Authenticate": bearer_challenge("insufficient_scope", "admin only")})
        if self.token or self.identity_required:
            raise self._needs_token()


def rate_key(address):
    """The rate-limit key for a client address: the address itself, an IPv6 one by its /64
    (one machine usually holds the whole /64); None if `address` is not an IP address."""
    text = address.strip(OWS)
    if text.startswith("[") and "]" in text:
        text = text[1:text.index("]")]          # [v6]:port
    elif text.count(":") == 1:
        text = text.partition(":")[0]           # v4:port
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if ip.version == 6:
        if ip.ipv4_mapped:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class RateLimiter:
    """A token bucket per client, for at most MAX_RATE_KEYS clients (the longest quiet is forgotten)."""

    def __init__(self, rate, burst):
        self.rate, self.burst = rate, burst
        self._lock = threading.Lock()
        self._buckets = collections.OrderedDict()   # key -> (tokens, last refill), most recent last

    def allow(self, key):
        """True if `key` may post now."""
        if not self.rate:
            return True
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.pop(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            allowed = tokens >= 1
            self._buckets[key] = (tokens - 1 if allowed else tokens, now)
            if len(self._buckets) > MAX_RATE_KEYS:
                self._buckets.popitem(last=False)
            return allowed

    def retry_after(self):
        return max(1, math.ceil(1 / self.rate))

    def forget_idle(self, now):
        """Drop buckets that have refilled, so the table stays small."""
        if not self.rate:
            return
        full_after = self.burst / self.rate
        with self._lock:
            while self._buckets:
                key, (_, last) = next(iter(self._buckets.items()))
                if now - last <= full_after:
                    break
                del self._buckets[key]

    def __len__(self):
        return len(self._buckets)


# ---------------------------------------------------------------------------
# Identity
# ---------------------------------------------------------------------------

#: Signed tokens (JWT, RFC 7519, signed with HS256 only): their size at most, the clock
#: difference allowed on exp, nbf and iat, the shortest secret, and the bytes of verified
#: tokens remembered, so that a client's every poll does not verify its token again.
MAX_TOKEN_BYTES = 8192
TOKEN_LEEWAY_S = 60
MIN_JWT_SECRET_BYTES = 32
TOKEN_CACHE_BYTES = 4 * 1024 * 1024
#: Longest user id (a token's `sub`, or the trusted proxy's header) and display name.
MAX_USER_CHARS = 64
#: A room pattern: a room's name, or the start of names followed by "*" ("team-*", "*").
ROOM_PATTERN = re.compile(r"(?:[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63})?\*?\Z")
_B64URL = re.compile(r"[A-Za-z0-9_-]*\Z")
_NOT_IN_USER_IDS = re.compile("[\x00-\x20\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_NOT_IN_NAMES_OR_HALVES = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


class TokenError(Exception):
    """A bearer token that is refused; the message says why, for the client."""


class Identity:
    """Who a request is from: a user id (None for the shared token), the name its posts
    carry, the rooms it may read and post in (patterns), and whether it is an admin."""

    __slots__ = ("user", "name", "read", "post", "admin")

    def __init__(self, user, name, read=("*",), post=("*",), admin=False):
        self.user, self.name, self.read, self.post, self.admin = user, name, read, post, admin

    def may(self, action, room):
        """True if this identity may `action` ("read" or "post") in `room`."""
        return self.admin or rooms_match(self.read if action == "read" else self.post, room)


#: The shared --token's holder: every room, /stats and /metrics, and posts with any author.
SHARED_TOKEN_HOLDER = Identity(None, None, admin=True)


def rooms_match(patterns, room):
    """True if `room` is one of `patterns` or starts with a pattern's part before its "*"."""
    for pattern in patterns:
        if pattern == room or (pattern.endswith("*") and room.startswith(pattern[:-1])):
            return True
    return False


def check_room_patterns(values, what="a room pattern"):
    """`values` as a tuple of room patterns; ValueError naming the first that is not one."""
    if isinstance(values, str) or not isinstance(values, (list, tuple)):
        raise ValueError("%s must be a list of room names or prefixes ending in *" % what)
    for value in values:
        if not isinstance(value, str) or not value or not ROOM_PATTERN.match(value):
            raise ValueError("%r is not %s: a room name, or the start of names followed by * "
                             "(team-*), * only at the end" % (value if isinstance(value, str) else type(value).__name__,
                                                                 what))
    return tuple(values)


def check_user_id(value, what="'sub'"):
    """A user id: 1 to 64 visible characters, no spaces, controls or text-direction overrides."""
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_USER_CHARS or _NOT_IN_USER_IDS.search(value):
        raise ValueError("%s must be 1 to %d visible characters without spaces or controls" % (what, MAX_USER_CHARS))
    return value


def b64url_encode(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(segment, what):
    """The bytes of one part of a token: base64url without padding, in its one canonical
    spelling (RFC 7515 2); TokenError otherwise."""
    if not _B64URL.match(segment) or len(segment) % 4 == 1:
        raise TokenError("the token's %s is not base64url without padding" % what)
    data = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    if b64url_encode(data) != segment:
        raise TokenError("the token's %s is not base64url in its canonical form" % what)
    return data


def _members_once(pairs):
    members = {}
    for name, value in pairs:
        if name in members:
            raise TokenError("member %r appears twice" % name[:40])
        members[name] = value
    return members


def _no_constant(name):
    raise TokenError("%s is not JSON" % name)


def strict_json_object(data, what):
    """The JSON object in `data` (UTF-8, each member once, no NaN); TokenError otherwise."""
    try:
        value = json.loads(data.decode("utf-8"), object_pairs_hook=_members_once, parse_constant=_no_constant)
    except TokenError as exc:
        raise TokenError("the token's %s: %s" % (what, exc)) from None
    except (ValueError, RecursionError):
        raise TokenError("the token's %s is not JSON" % what) from None
    if not isinstance(value, dict):
        raise TokenError("the token's %s is not a JSON object" % what)
    return value


def _numeric_date(claims, name, required=False):
    value = claims.get(name)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TokenError("'%s' must be a NumericDate (seconds since 1970 as a JSON number)%s"
                         % (name, "" if value is not None else "; the token has none"))
    return value


def _utc(seconds):
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))
    except (OverflowError, OSError, ValueError):
        return "%r s after 1970" % seconds


class TokenVerifier:
    """Verifies JWTs signed with HS256 and the server's secret (RFC 7519, RFC 8725).

    Only "alg": "HS256" is accepted, whatever else a header says (no "none", no other
    HMAC, no public-key algorithm that would take the secret for a public key), and no
    "crit" extension; the signature is checked, in constant time, before the claims are
    read; base64url without padding and strict JSON only.  Verified tokens are kept,
    by their bytes up to TOKEN_CACHE_BYTES, until they expire.
    """

    def __init__(self, secret, clock=time.time):
        self.secret, self.clock = secret, clock
        self._lock = threading.Lock()
        self._cache = collections.OrderedDict()     # token -> (identity, not before, expires)
        self._cache_bytes = 0

    def verify(self, token):
        """The Identity `token` names; TokenError saying why it is refused."""
        now = self.clock()
        with self._lock:
            cached = self._cache.get(token)
        if cached is not None and cached[1] - TOKEN_LEEWAY_S <= now < cached[2] + TOKEN_LEEWAY_S:
            return cached[0]
        identity, not_before, expires = self._verify(token, now)
        with self._lock:
            if token not in self._cache:
                self._cache[token] = (identity, not_before, expires)
                self._cache_bytes += len(token)
                while self._cache_bytes > TOKEN_CACHE_BYTES:
                    self._cache_bytes -= len(self._cache.popitem(last=False)[0])
        return identity

    def _verify(self, token, now):
        if len(token) > MAX_TOKEN_BYTES:
            raise TokenError("the token is longer than %d bytes" % MAX_TOKEN_BYTES)
        parts = token.split(".")
        if len(parts) != 3:
            raise TokenError("a token is three base64url parts joined by dots (a JWS in compact form)")
        header_part, payload_part, signature_part = parts
        header = strict_json_object(b64url_decode(header_part, "header"), "header")
        algorithm = header.get("alg")
        if algorithm != "HS256":
            raise TokenError("the algorithm %s is not accepted; tokens are signed with HS256"
                             % (json.dumps(algorithm)[:40] if algorithm is not None else "(none given)"))
        if "crit" in header:
            raise TokenError("the header's crit extensions are not supported")
        kind = header.get("typ")
        if kind is not None and (not isinstance(kind, str) or kind.upper() not in ("JWT", "APPLICATION/JWT")):
            raise TokenError("the header's typ must be JWT")
        signature = b64url_decode(signature_part, "signature")
        b64url_decode(payload_part, "payload")      # its characters, before they are signed
        expected = hmac.new(self.secret, ("%s.%s" % (header_part, payload_part)).encode("ascii"),
                            hashlib.sha256).digest()
        if not hmac.compare_digest(signature, expected):
            raise TokenError("the signature does not match: the token was signed with another secret, "
                             "or changed after it was signed")
        claims = strict_json_object(b64url_decode(payload_part, "payload"), "payload")
        return self._identity(claims, now)

    @staticmethod
    def _identity(claims, now):
        expires = _numeric_date(claims, "exp", required=True)
        not_before = _numeric_date(claims, "nbf")
        issued = _numeric_date(claims, "iat")
        if now >= expires + TOKEN_LEEWAY_S:
            raise TokenError("the token expired at %s" % _utc(expires))
        if not_before is not None and now < not_before - TOKEN_LEEWAY_S:
            raise TokenError("the token is not valid before %s" % _utc(not_before))
        if issued is not None and issued > now + TOKEN_LEEWAY_S:
            raise TokenError("the token was issued in the future (%s)" % _utc(issued))
        try:
            user = check_user_id(claims.get("sub"))
        except ValueError as exc:
            raise TokenError(str(exc) if "sub" in claims else "the token has no 'sub' (the user's id)") from None
        name = claims.get("name", user)
        if not isinstance(name, str) or not 1 <= len(name) <= MAX_USER_CHARS or _NOT_IN_NAMES_OR_HALVES.search(name):
            raise TokenError("'name' must be one line of 1 to %d characters without controls" % MAX_USER_CHARS)
        rooms = claims.get("rooms", {})
        if not isinstance(rooms, dict) or set(rooms) - {"read", "post"}:
            raise TokenError("'rooms' must be an object with 'read' and 'post' lists")
        try:
            read = check_room_patterns(rooms.get("read", ["*"]), "a 'read' room pattern")
            post = check_room_patterns(rooms.get("post", ["*"]), "a 'post' room pattern")
        except ValueError as exc:
            raise TokenError(str(exc)) from None
        admin = claims.get("admin", False)
        if not isinstance(admin, bool):
            raise TokenError("'admin' must be true or false")
        if "aud" in claims:
            # RFC 7519 4.1.3: a token whose audience does not name the server is refused;
            # this server has no name to find there, so a token meant for one is not for it.
            raise TokenError("the token names an audience ('aud'); tokens for this server have none")
        return (Identity(user, name, read, post, admin), -math.inf if not_before is None else not_before, expires)


def mint_token(secret, claims):
    """A JWT with `claims`, signed with HS256 and `secret` (what the token command prints)."""
    header = b64url_encode(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    payload = b64url_encode(json.dumps(claims, separators=(",", ":")).encode())
    signature = hmac.new(secret, ("%s.%s" % (header, payload)).encode("ascii"), hashlib.sha256).digest()
    return "%s.%s.%s" % (header, payload, b64url_encode(signature))


def bearer_challenge(error=None, description=None):
    """A WWW-Authenticate value (RFC 6750 3): no error code when the request had no credentials."""
    value = 'Bearer realm="chat"'
    if error:
        value += ', error="%s"' % error
    if description:
        # error_description is %x20-21 / %x23-5B / %x5D-7E: no quote, no backslash, ASCII only.
        text = "".join(c if " " <= c <= "~" and c not in '"\\' else "'" if c == '"' else "?" for c in description)
        value += ', error_description="%s"' % text[:300]
    return value


def load_jwt_secret(path):
    """The bytes of the secret file at `path`; ValueError if it cannot be read or is too short."""
    try:
        with open(path, "rb") as secret_file:
            secret = secret_file.read(1024 * 1024)
    except OSError as exc:
        raise ValueError("cannot read %s: %s" % (path, exc.strerror or exc)) from None
    return check_jwt_secret(secret)


def check_jwt_secret(secret):
    if len(secret) < MIN_JWT_SECRET_BYTES:
        raise ValueError("the secret must be at least %d bytes (it is %d); make one with: "
                         "head -c 32 /dev/urandom > chat.secret" % (MIN_JWT_SECRET_BYTES, len(secret)))
    return secret



# ---------------------------------------------------------------------------
# HTTP handler
# ---------------------------------------------------------------------------

class ClientNotReading(ConnectionError):
    """The client did not read its answer within --idle-timeout."""


_Q_VALUE = re.compile(r"[ \t]*[qQ][ \t]*=[ \t]*(0(?:\.[0-9]{0,3})?|1(?:\.0{0,3})?)[ \t]*\Z")


def accepts_event_stream(accept):
    """True if an Accept header value asks for text/event-stream with a weight above 0."""
    for item in accept.split(","):
        media_type, _, params = item.partition(";")
        if media_type.strip(OWS).lower() != "text/event-stream":
            continue
        weight = 1.0
        for param in params.split(";"):
            match = _Q_VALUE.match(param)
            if match:
                weight = float(match.group(1))
        if weight > 0:
            return True
    return False


def hide_query_token(line):
    """The request line for the logs: the value of every query parameter whose name is
    `token` once %-decoded (?token=, ?%74oken=, ...) replaced by [hidden]."""
    method, _, rest = line.partition(" ")
    target, _, version = rest.rpartition(" ")
    path, mark, query = target.partition("?")
    if not mark:
        return line
    pieces = re.split(r"([&;#])", query)
    for index in range(0, len(pieces), 2):
        name = urllib.parse.unquote_plus(pieces[index].partition("=")[0], errors="replace")
        if name.strip().lower() == "token":
            pieces[index] = "token=[hidden]"
    return "%s %s?%s %s" % (method, path, "".join(pieces), version)


_INTEGER = re.compile(r"[0-9]{1,9}\Z")
_DECIMAL = re.compile(r"[0-9]{1,9}(\.[0-9]{0,6})?\Z")


class ChatHandler(BaseHTTPRequestHandler):
    """Reads each request with RequestReader, routes it by path and method (ROUTES), and answers.

    The routes speak of messages, rooms and cursors; this class alone decides which
    status code each outcome of the store and the access policy becomes.
    """

    protocol_version = "HTTP/1.1"
    server_version = "chat_server/" + __version__

    ROUTES = {
        "/": {"GET": "get_page"},
        "/messages": {"GET": "get_messages", "POST": "post_message"},
        "/rooms/<room>/messages": {"GET": "get_messages", "POST": "post_message"},
        "/healthz": {"GET": "get_health"},
        "/stats": {"GET": "get_stats"},
        "/metrics": {"GET": "get_metrics"},
        "/rooms": {"GET": "get_rooms"},
        "/rooms/<room>/presence": {"GET": "get_presence"},
    }
    OPEN_PATHS = frozenset(("/", "/healthz"))      # answered without the token

    def setup(self):
        self.connection = self.request
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.fd = self.connection.fileno()
        config = self.server.config
        self.connection.settimeout(config.idle_timeout)    # timeout mode: a non-blocking descriptor
        self.reader = RequestReader(self.connection, config.idle_timeout, config.request_timeout)
        self.req = self.identity = None
        self.requestline, self.command, self.request_version = "", None, "HTTP/1.1"
        self.server.track(self.connection, self)

    def finish(self):
        pass    # nothing is buffered: every answer is written as it is made

    def interrupt_if_idle(self):
        """At shutdown: end a keep-alive connection that is between requests."""
        if self.reader.idle:
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_one_request(self):
        """Read one request, as strictly as RequestReader does, and answer it with do_<METHOD>."""
        self.req, self.command, self.requestline = None, None, ""
        try:
            request = self.reader.read_request()
        except HTTPError as exc:
            self.requestline = "(refused request head)"
            return self._fail(exc)
        except socket.timeout:
            self.close_connection = True
            if not self.reader.idle:
                self.requestline = "(incomplete request head)"
                self._fail(self._too_slow())
            return
        except ConnectionError:
            self.close_connection = True
            return
        if request is None:
            self.close_connection = True
            return
        self.req = request
        self.command, self.path, self.request_version = request.method, request.target, request.version
        self.headers = request.headers
        self.requestline = hide_query_token(request.line)
        self.close_connection = not request.keep_alive
        method = getattr(self, "do_" + request.method, None)
        if method is None:
            return self._fail(HTTPError(501, "method %s is not supported here; use GET, HEAD, POST or OPTIONS"
                                        % request.method))
        method()

    def _warn(self, message):
        self.log_error("%s: %s", self.requestline, message)

    def _too_slow(self):
        return HTTPError(408, "the request took longer than %g s to arrive (--request-timeout)"
                         % self.server.config.request_timeout, close=True)

    # -- dispatch --

    def do_GET(self):
        self._dispatch()

    do_HEAD = do_POST = do_OPTIONS = do_GET

    def _dispatch(self):
        request = self.req
        path, _, query = request.target.partition("#")[0].partition("?")
        if not path.startswith("/"):
            path = self._path_of_target(path)
        policy = self.server.policy
        try:
            host = policy.check_host(request)
            methods = self._methods_for(path)
            if methods is None:
                raise HTTPError(404, "no such path: %s" % path[:200])
            if self.command == "OPTIONS":
                return self._answer_options(methods)
            route = methods.get("GET" if self.command == "HEAD" else self.command)
            if route is None:
                raise HTTPError(405, "%s does not accept %s" % (path[:200], self.command),
                                headers={"Allow": self._allow(methods)})
            if self.command not in SAFE_METHODS:
                policy.check_origin(request, host)
            query = parse_query(query)
            room = self._room_of(path)
            self.identity = None
            if policy.guarded and path not in self.OPEN_PATHS:
                # ?token= only where an EventSource, which cannot send headers, needs it.
                stream = route == "get_messages" and self._wants_stream()
                self.identity = policy.identify(request, query.get("token") if stream else None,
                                                self.client_address[0], self._warn)
                if route in ("get_messages", "post_message", "get_presence"):
                    policy.check_room(self.identity, room, "post" if route == "post_message" else "read")
                elif route == "get_rooms":
                    policy.check_room_list(self.identity)
                else:
                    policy.check_admin(self.identity)
            if self.command != "POST" and not self._discard_body():
                self.close_connection = True
            getattr(self, route)(room, query)
        except HTTPError as exc:
            self._fail(exc)
        except CursorGone as exc:
            self._fail(HTTPError(410, "messages after this cursor are no longer kept; "
                                 "poll again without 'after' to start from the oldest kept", {"oldest": exc.oldest}))
        except CursorAhead as exc:
            self._fail(HTTPError(400, "'after' is newer than any message of this server (was it restarted "
                                 "without its database?); poll again without it", {"latest": exc.latest}))
        except RoomLimitReached as exc:
            self._fail(HTTPError(503, "this server keeps at most %s rooms (--max-rooms); post to an existing room "
                                 "or try again later" % exc, headers={"Retry-After": str(RETRY_AFTER_S)}))
        except StorageError as exc:
            self._fail(HTTPError(503, str(exc), headers={"Retry-After": str(RETRY_AFTER_S)}))
        except socket.timeout:
            self._fail(self._too_slow())
        except ConnectionError:
            self.close_connection = True
        except Exception:
            self.log_error("unhandled error in %s\n%s", self.requestline, traceback.format_exc())
            self._fail(HTTPError(500, "internal server error", close=True))

    @staticmethod
    def _path_of_target(target):
        # The absolute form (http://host/path), as proxies may send it; AccessPolicy took its host.
        parts = target.split("/", 3)
        return "/" + (parts[3] if len(parts) > 3 else "")

    def _methods_for(self, path):
        """The route's {method: handler name} for a path, or None if it is not one of ours."""
        if path.startswith("/rooms/"):
            for tail in ("/messages", "/presence"):
                if path.endswith(tail):
                    return self.ROUTES["/rooms/<room>" + tail]
        return self.ROUTES.get(path)

    @staticmethod
    def _allow(methods):
        allowed = set(methods) | {"OPTIONS"}
        if "GET" in allowed:
            allowed.add("HEAD")
        return ", ".join(sorted(allowed))

    def _answer_options(self, methods):
        allow = self._allow(methods)
        headers = {"Allow": allow}
        if self.server.config.cors_origin:
            headers.update({"Access-Control-Allow-Methods": allow,
                            "Access-Control-Allow-Headers": "Authorization, Content-Type, Last-Event-ID",
                            "Access-Control-Max-Age": "600"})
        if not self._discard_body():
            self.close_connection = True
        self._respond(HTTPStatus.NO_CONTENT, b"", headers=headers)

    def _room_of(self, path):
        if not path.startswith("/rooms/"):
            return DEFAULT_ROOM
        name = path[len("/rooms/"):path.rindex("/")]
        if not ROOM_NAME.match(name):
            raise HTTPError(400, "room names are 1 to 64 letters, digits, '_', '-' or '.', "
                            "not starting with '.'; got %r" % name[:80])
        return name

    def _discard_body(self):
        try:
            return self.reader.discard_body(self.req)
        except (socket.timeout, OSError):
            return False

    def _wants_stream(self):
        return self.command == "GET" and accepts_event_stream(self.headers.get("accept", ""))

    # -- routes --

    def get_page(self, room, query):
        body, csp = self.server.page
        self._respond(HTTPStatus.OK, body, "text/html; charset=utf-8",
                      {"Content-Security-Policy": csp, "Referrer-Policy": "no-referrer"})

    def get_health(self, room, query):
        self._send_json(HTTPStatus.OK, {"status": "ok"})

    def get_stats(self, room, query):
        self._send_json(HTTPStatus.OK, self.server.stats())

    def get_metrics(self, room, query):
        self._respond(HTTPStatus.OK, prometheus_text(self.server.stats(), self.server.status_counts()),
                      "text/plain; version=0.0.4; charset=utf-8")

    def get_rooms(self, room, query):
        policy, identity = self.server.policy, self.identity
        rooms = self.server.store.rooms(lambda name: policy.may_read(identity, name), self._limit(query, "limit"))
        for found in rooms:
            found["present"] = self.server.presence.count(found["name"])
        self._send_json(HTTPStatus.OK, rooms)

    def get_presence(self, room, query):
        self._send_json(HTTPStatus.OK, self.server.presence.of(room))

    def follower(self, query):
        """(key, user, name) of this client as a follower, for presence: its user, or for an
        anonymous client its address and the name it gave with ?name= (not verified)."""
        identity = self.identity
        if identity is not None and identity.user is not None:
            return ("user", identity.user), identity.user, identity.name
        name = query.get("name")
        if name is not None:
            name = name.strip() or None
            if name and (len(name) > MAX_AUTHOR_CHARS or _NOT_IN_NAMES_OR_HALVES.search(name)):
                raise HTTPError(400, "'name' must be one line of at most %d characters" % MAX_AUTHOR_CHARS)
        address = self.client_address[0]
        return ("anonymous", rate_key(address) or address, name), None, name

    def post_message(self, room, query):
        server = self.server
        if not self.req.chunked and "content-length" not in self.headers:
            # Without either, the body's end is unknown (the bytes after the head may be it).
            raise HTTPError(411, "send the message with a Content-Length header (curl does), "
                            "or with Transfer-Encoding: chunked", close=True)
        if server.rate_limiter.rate and not server.rate_limiter.allow(self._rate_key()):
            wait = server.rate_limiter.retry_after()
            raise HTTPError(429, "too many posts from your address; wait %d s and try again" % wait,
                            headers={"Retry-After": str(wait)})
        body = self.reader.read_body(self.req, self._send_continue)
        fields = read_message_fields(body, self.headers.get("content-type", ""))
        author, user = fields["author"], None
        if self.identity is not None and self.identity.user is not None:
            if author is not None and author != self.identity.name:
                raise HTTPError(400, "the name comes from your sign-in (%s); send no 'author', or that one"
                                % self.identity.name)
            author, user = self.identity.name, self.identity.user
        if fields["edits"] or fields["deletes"]:
            self._check_change(room, fields)
        message = server.store.add(room, fields["body"], author, fields["client"], user, fields["edits"],
                                   fields["deletes"])
        try:
            self._respond(HTTPStatus.CREATED, message.json + b"\n")
        finally:
            server.wake(room)  # even if the poster has gone, its message was stored

    def _check_change(self, room, fields):
        """HTTPError unless this client may make the edit or delete that `fields` asks for."""
        target_id = fields["edits"] or fields["deletes"]
        what = "edit" if fields["edits"] else "delete"
        target = self.server.store.message(room, target_id)
        if target is None:
            raise HTTPError(404, "room %r has no message %s" % (room, target_id))
        if target.edits or target.deletes:
            raise HTTPError(400, "%s is itself an edit or a delete; %s the message it changes" % (target_id, what))
        if target.deleted:
            raise HTTPError(409, "message %s was deleted; it cannot be changed any more" % target_id)
        identity = self.identity
        if identity is not None and identity.admin:
            return
        if target.user is not None:
            allowed = identity is not None and identity.user == target.user
        else:
            allowed = bool(fields["client"]) and client_tag(fields["client"]) == target.client
        if not allowed:
            raise HTTPError(403, "only the author of message %s (the same user, or for an anonymous message the same "
                            "browser's 'client') or an admin may %s it" % (target_id, what))

    def get_messages(self, room, query):
        if self._wants_stream():
            return EventStream(self, room, query).run()
        if "before" in query:
            return self._send_older(room, query)
        after = self._cursor(query.get("after"), "after")
        timeout = min(self._number(query, "timeout", DEFAULT_TIMEOUT_S), self.server.config.max_timeout)
        newest = "tail" in query
        if newest and after is not None:
            raise HTTPError(400, "use 'after' or 'tail', not both")
        limit = self._limit(query, "tail" if newest else "limit")
        if self.command == "GET":
            key, user, name = self.follower(query)
            self.server.presence.seen(room, key, user, name, time.monotonic() + timeout + PRESENCE_GRACE_S)
        messages = self.server.store.newer(room, after, limit, newest)
        # HEAD never waits; nor does a poll whose client already sent its next request.
        if messages or timeout <= 0 or self.command == "HEAD" or self.reader.buffer:
            # "The newest N" changes with every post: not an answer a shared cache may keep.
            return self.send_messages(messages, None if newest else room)
        self._wait(room, after, limit, timeout)

    def _send_older(self, room, query):
        # Scroll-back: the page of messages just before an id; it never waits.
        if "after" in query or "tail" in query:
            raise HTTPError(400, "use 'before' alone, not with 'after' or 'tail'")
        before = self._cursor(query.get("before"), "before")
        if before is None:
            raise HTTPError(400, "'before' must be the id of a message")
        limit = self._limit(query, "limit")
        try:
            messages = self.server.store.older(room, before, limit)
        except CursorGone as exc:
            raise HTTPError(410, "the messages before this id are no longer kept; the oldest kept is 'oldest'",
                            {"oldest": exc.oldest}) from None
        self.send_messages(messages)

    def send_messages(self, messages, room=None):
        """Answer a poll with `messages`, fewer if the answers being written already fill
        MAX_UNSENT_BYTES; one of `room`'s for a shared cache to keep, where the server says so."""
        if not messages:
            return self._respond(HTTPStatus.OK, b"[]\n")
        with self.server.unsent.hold(messages) as fitting:
            body = encode_list(fitting)
            if room is None or not self.server.cacheable(room):
                return self._respond(HTTPStatus.OK, body)
            self._send_bytes(self.server.render_answer(body, self._connection_header(), True, self.command == "HEAD"))
            self.log_request(HTTPStatus.OK, len(body))

    def _wait(self, room, after, limit, timeout):
        server = self.server
        waiter = Waiter(room, after, limit, self._connection_header(), self.connection)
        if not server.registry.park(waiter):
            raise HTTPError(503, "too many clients are waiting (--max-waiters %d); try again shortly"
                            % server.registry.max_waiters, headers={"Retry-After": str(RETRY_AFTER_S)})
        server.housekeeper.watch(waiter)
        try:
            # Look again now that we are registered: a post that landed since the first
            # look either shows up here or will find us in the registry.
            messages = server.store.newer(room, after, limit)
            if messages:
                if server.registry.claim(waiter):
                    return self.send_messages(messages, room)
            elif not waiter.event.wait(timeout - random.random() * min(1.0, timeout * TIMEOUT_JITTER)):
                if server.registry.claim(waiter):
                    return self._respond(HTTPStatus.OK, b"[]\n")
            waiter.event.wait()     # claimed by another party, which sets the event when done
        finally:
            server.housekeeper.unwatch(waiter)
            # Only after an exception above; skipped when another party answered, so that
            # thousands of woken threads do not all queue for the registry's lock.
            if waiter.outcome is None and server.registry.claim(waiter):
                self.close_connection = True
        self._finish_answered(waiter)

    def _finish_answered(self, waiter):
        if waiter.outcome == HUNG_UP:
            self.close_connection = True
            return
        if waiter.outcome == SLOW:
            self.close_connection = True
            self.log_message("%s: the answer did not fit in what the server holds for clients that "
                             "do not read (%d bytes); connection closed", self.requestline, MAX_UNSENT_BYTES)
            return
        if waiter.outcome == SENT_EARLY:
            # The client sent its next request before this one was answered: answer
            # this one now, as at a timeout, and go on to the next.
            waiter.unsent = self.server.render(HTTPStatus.OK, b"[]\n", connection=waiter.connection)
        elif waiter.outcome == CLOSING:
            self.close_connection = True
        if waiter.unsent:
            try:
                self._send_bytes(waiter.unsent)
            finally:
                waiter.unsent = b""
                self.server.unsent.release(waiter.held)
                waiter.held = 0
        if waiter.outcome == ANSWERED:
            # Counted by the post that wrote it: thousands of threads woken together
            # would otherwise all queue for the server's lock here.
            self.log_access(HTTPStatus.OK)
        else:
            self.log_request(HTTPStatus.OK)

    # -- reading requests --

    def _rate_key(self):
        if self.server.config.trust_proxy:
            # The proxy appends the address it was connected from: the last entry.
            last = self.headers.get("x-forwarded-for", "").rpartition(",")[2]
            key = rate_key(last) if last.strip(OWS) else None
            if key:
                return key
        return rate_key(self.client_address[0]) or self.client_address[0]

    @staticmethod
    def _cursor(text, name):
        try:
            return parse_cursor(text)
        except ValueError:
            raise HTTPError(400, "'%s' must be a message id (a UUID), got %r" % (name, text[:80])) from None

    @staticmethod
    def _number(query, name, default):
        text = query.get(name)
        if text is None or text == "":
            return default
        if not _DECIMAL.match(text):
            raise HTTPError(400, "'%s' must be a number of seconds such as 10 or 2.5, got %r" % (name, text[:40]))
        return float(text)

    @staticmethod
    def _limit(query, name):
        text = query.get(name)
        if text is None or text == "":
            return DEFAULT_LIMIT
        if not _INTEGER.match(text) or not 1 <= int(text) <= MAX_LIMIT:
            raise HTTPError(400, "'%s' must be a whole number from 1 to %d, got %r" % (name, MAX_LIMIT, text[:40]))
        return int(text)

    def _send_continue(self):
        self._send_bytes(b"HTTP/1.1 100 Continue\r\n\r\n")

    # -- writing responses --

    def _connection_header(self):
        if self.close_connection:
            return "close"
        return "keep-alive" if self.request_version == "HTTP/1.0" else None

    def _fail(self, exc):
        """Answer an HTTPError; close the connection if the request's framing or body is in doubt."""
        if exc.close or self.req is None or not self._discard_body():
            self.close_connection = True
        self._send_json(exc.status, dict({"error": exc.message}, **exc.extra), exc.headers)

    def _respond(self, status, body, content_type="application/json; charset=utf-8", headers=None):
        head_only = self.command == "HEAD" or len(body) > SEPARATE_BODY_BYTES
        data = self.server.render(status, body, content_type, headers, self._connection_header(), head_only)
        self._send_bytes(data)
        if len(body) > SEPARATE_BODY_BYTES and self.command != "HEAD":
            self._send_bytes(body)      # a large answer is not copied to prepend its head
        self.log_request(int(status), len(body))

    def _send_json(self, status, obj, headers=None):
        self._respond(status, json_bytes(obj), headers=headers)

    def _send_bytes(self, data):
        # Usually the socket takes the whole answer at once: write it without the poll()
        # that a socket in timeout mode makes before each send.
        if WRITE_DIRECTLY:
            try:
                sent = os.write(self.fd, data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            if sent == len(data):
                return
            data = memoryview(data)[sent:]
        # A client that does not read its answer gets as long as an idle one.
        timeout = self.server.config.idle_timeout
        if self.connection.gettimeout() != timeout:
            self.connection.settimeout(timeout)
        try:
            self.connection.sendall(data)
        except socket.timeout:
            self.close_connection = True
            self.log_message("%s: the client did not read its answer within %g s (--idle-timeout); "
                             "connection closed", self.requestline, timeout)
            raise ClientNotReading() from None

    def log_request(self, code="-", size="-"):
        """Count the answer for /metrics, and log it (unless --quiet)."""
        self.server.count_status(code)
        self.log_access(code, size)

    def log_access(self, code, size="-"):
        if not self.server.config.quiet:
            super().log_request(code, size)

    def log_message(self, format, *args):
        if not self.server.config.quiet:
            self.log_error(format, *args)

    def log_error(self, format, *args):
        """Errors are written even with --quiet (which silences the access log only)."""
        sys.stderr.write("%s - - [%s] %s\n" % (self.address_string(), self.log_date_time_string(),
                                                printable(format % args, keep_newlines=True)))

    def version_string(self):
        return self.server_version


def parse_query(query):
    """The query string as {name: value}; HTTPError 400 for invalid UTF-8 or a name given twice."""
    return _form_fields(query, "query string", "query parameter") if query else {}


def _form_fields(text, what, item):
    """{name: value} of form-encoded `text`; HTTPError 400 (naming `what`, `item`) for invalid
    UTF-8 once %-decoded, or for a name given twice (two parsers would keep different ones)."""
    try:
        pairs = urllib.parse.parse_qsl(text, keep_blank_values=True, errors="strict")
    except (ValueError, UnicodeDecodeError):
        raise HTTPError(400, "the %s is not valid UTF-8 once %%-decoded" % what) from None
    fields = dict(pairs)
    if len(fields) != len(pairs):
        raise HTTPError(400, "each %s may be given once" % item)
    return fields


def _parse_content_type(header):
    ctype, _, rest = header.partition(";")
    params = {}
    for item in rest.split(";"):
        name, _, value = item.partition("=")
        if name.strip(OWS):
            params[name.strip(OWS).lower()] = value.strip(OWS).strip('"')
    return ctype.strip(OWS).lower(), params


def read_message_fields(raw, content_type):
    """{"body", "author", "client"} from a JSON, text/plain or form body; HTTPError 400/415 otherwise."""
    ctype, params = _parse_content_type(content_type)
    charset = params.get("charset", "utf-8").lower()
    if charset not in ("utf-8", "utf8", "us-ascii", "ascii"):
        raise HTTPError(415, "send the body in UTF-8, not %s" % charset[:40])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise HTTPError(400, "the body is not valid UTF-8") from None
    looks_like_json = text.lstrip().startswith("{")
    if ctype == "application/json" or (looks_like_json and ctype in ("", "application/x-www-form-urlencoded")):
        fields = _parse_json_object(text)
    elif ctype == "application/x-www-form-urlencoded":
        fields = _parse_form(text)
    elif ctype in ("text/plain", ""):
        fields = {"body": text}
    else:
        raise HTTPError(415, "send the message as JSON {\"body\": \"...\"} (Content-Type: application/json), "
                        "as form data body=... or as text/plain, not %s" % ctype[:60])
    return _validate_fields(fields)


def _json_depth(text):
    """How deeply `text` nests arrays and objects (strings are skipped)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _parse_json_object(text):
    # A deeply nested body would recurse in the C parser; a cheap count rules most out.
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and _json_depth(text) > MAX_JSON_DEPTH:
        raise HTTPError(400, "the JSON nests deeper than %d levels" % MAX_JSON_DEPTH)
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise HTTPError(400, "the body is not valid JSON (%s); send {\"body\": \"your message\"}" % exc) from None
    if not isinstance(value, dict):
        raise HTTPError(400, 'the JSON body must be an object like {"body": "hello"}')
    return value


def _parse_form(text):
    fields = _form_fields(text, "form data", "form field")
    if "body" not in fields and len(fields) == 1 and not next(iter(fields.values())):
        # What `curl -d hello` sends: a form field named "hello" with no value.
        raise HTTPError(400, "the form data %r has no 'body' field; send body=%s (curl -d 'body=...', or "
                        "--data-urlencode 'body=...' for text with + & =) or JSON {\"body\": \"...\"}"
                        % (text[:40], urllib.parse.quote(next(iter(fields))[:40])))
    return fields


_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_NOT_IN_NAMES = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _validate_fields(fields):
    body, author, client = fields.get("body"), fields.get("author"), fields.get("client")
    edits, deletes = fields.get("edits"), fields.get("deletes")
    for name, value in (("edits", edits), ("deletes", deletes)):
        if value is not None and (not isinstance(value, str) or not _UUID_TEXT.match(value)):
            raise HTTPError(400, "'%s' must be the id of a message of this room" % name)
    if edits is not None and deletes is not None:
        raise HTTPError(400, "a message either edits or deletes another, not both")
    if deletes is not None:
        if body not in (None, ""):
            raise HTTPError(400, "a delete has no 'body'")
        body = ""
    elif not isinstance(body, str):
        raise HTTPError(400, "the message needs a 'body': send body=... as form data or JSON {\"body\": \"...\"}"
                        if body is None else "'body' must be a string, not %s" % type(body).__name__)
    body = body.replace("\r\n", "\n")     # a form's new lines; a lone CR is refused below
    if not body.strip() and deletes is None:
        raise HTTPError(400, "'body' is empty")
    if _SURROGATE.search(body):
        raise HTTPError(400, "'body' contains a lone surrogate escape (\\ud800-\\udfff), which is not text")
    if _CONTROL.search(body):
        raise HTTPError(400, "'body' contains control characters (only tab and new lines are allowed)")
    if author is not None:
        if not isinstance(author, str):
            raise HTTPError(400, "'author' must be a string, not %s" % type(author).__name__)
        author = author.strip() or None
        if author and _SURROGATE.search(author):
            raise HTTPError(400, "'author' contains a lone surrogate escape (\\ud800-\\udfff), which is not text")
        if author and (len(author) > MAX_AUTHOR_CHARS or _NOT_IN_NAMES.search(author)):
            raise HTTPError(400, "'author' must be one line of at most %d characters, without control or "
                            "text-direction override characters" % MAX_AUTHOR_CHARS)
    if client is not None and (not isinstance(client, str) or not CLIENT_ID.match(client)):
        raise HTTPError(400, "'client' must be %d to %d letters, digits, '-' or '_'"
                        % (MIN_CLIENT_CHARS, MAX_CLIENT_CHARS))
    return {"body": body, "author": author, "client": client, "edits": edits and edits.lower(),
            "deletes": deletes and deletes.lower()}


# ---------------------------------------------------------------------------
# Event stream
# ---------------------------------------------------------------------------

def encode_events(messages):
    """Each message as one text/event-stream event: its id, then its JSON on one data line."""
    return b"".join(b"id: %s\ndata: %s\n\n" % (m.id.encode("ascii"), m.json) for m in messages)


def reset_event(oldest, latest):
    """The event that tells a stream client its cursor meant nothing here (too old, or from the
    future): forget what you have, the messages that follow start from the oldest kept."""
    return b"event: reset\ndata: %s\n" % json_bytes({"oldest": oldest, "latest": latest})


class EventStream:
    """One text/event-stream answer on a handler's connection (HTTP/1.1, delimited by its close).

    First the messages after the cursor (Last-Event-ID, else ?after=, else from now on,
    after ?tail=N if asked), written by this thread; then the stream goes live in the
    registry and posts write each new message to it themselves, as for parked polls.
    A client that cannot take an event at once is disconnected rather than buffered
    for: it reconnects with Last-Event-ID and loses nothing.
    """

    def __init__(self, handler, room, query):
        self.handler, self.server, self.room = handler, handler.server, room
        self.query = query

    def _start(self):
        # (cursor, reset?) from Last-Event-ID or ?after=; a bad header value is a reset,
        # since a browser would otherwise retry it for ever.
        header = self.handler.headers.get("last-event-id")
        if header is not None:
            try:
                return parse_cursor(header.strip(OWS)) or ZERO_ID, False
            except ValueError:
                return ZERO_ID, True
        after = self.query.get("after")
        if after:
            return self.handler._cursor(after, "after") or ZERO_ID, False
        return None, False

    def run(self):
        handler, server, store = self.handler, self.server, self.server.store
        cursor, reset = self._start()
        tail = self.query.get("tail")
        if self.handler.headers.get("last-event-id") is not None:
            tail = None     # an EventSource reconnecting to its ?tail= URL: the header wins
        elif tail is not None and cursor is not None:
            raise HTTPError(400, "use 'after' or 'tail', not both")
        tail = handler._limit(self.query, "tail") if tail is not None else None
        handler.close_connection = True
        key, user, name = handler.follower(self.query)
        waiter = Waiter(self.room, cursor, MAX_LIMIT, "close", handler.connection, stream=True)
        waiter.presence = self.query.get("presence") == "1"
        if not server.registry.park(waiter):
            raise HTTPError(503, "too many clients are waiting (--max-waiters %d); try again shortly"
                            % server.registry.max_waiters, headers={"Retry-After": str(RETRY_AFTER_S)})
        server.housekeeper.watch(waiter)
        server.presence.stream_opened(self.room, key, user, name)
        try:
            handler._send_bytes(self._head())
            if reset:
                self._send_reset(None)
                cursor = ZERO_ID        # from the oldest kept, as the reset event says
            if tail is not None:
                cursor = self._send_page(store.newer(self.room, None, tail, newest=True)) or store.latest_id()
            elif cursor is None:
                cursor = store.latest_id()      # from now on
            self._catch_up(waiter, None if cursor == ZERO_ID else cursor)
            if waiter.live:
                waiter.event.wait()
        except StorageError as exc:
            # The head is sent: no status can be given any more, only the end of the stream
            # (the client reconnects with its Last-Event-ID).
            handler.log_error("%s: event stream ended: %s", handler.requestline, exc)
        finally:
            # Posts and heartbeats write to live streams under the stream's lock, from other
            # threads: once the socket is closed its descriptor number may be a new
            # client's, so no writer may still be, or later get, inside.
            with waiter.lock:
                waiter.live = False
            server.housekeeper.unwatch(waiter)
            server.registry.claim(waiter)
            server.presence.stream_closed(self.room, key)
        handler.log_request(HTTPStatus.OK)

    def _head(self):
        retry = random.randint(*STREAM_RETRY_MS)
        # No Content-Length (body None): the stream ends when the connection does.
        head = self.server.render(HTTPStatus.OK, None, "text/event-stream; charset=utf-8",
                                  {"X-Accel-Buffering": "no"}, connection="close")
        return head + b"retry: %d\n\n" % retry

    def _send_page(self, messages):
        """Write `messages` (or the part of them the unsent budget allows); the last id written."""
        if not messages:
            return None
        with self.server.unsent.hold(messages) as fitting:
            self.handler._send_bytes(encode_events(fitting))
        return fitting[-1].id

    def _send_reset(self, oldest):
        self.handler._send_bytes(reset_event(oldest or self.server.store.oldest_id(self.room),
                                             self.server.store.latest_id()) + b"\n")

    def _catch_up(self, waiter, cursor):
        # Write what is newer than the cursor, page by page, until there is nothing
        # more; then go live.  A post that lands between the last look and going live
        # found the stream not live yet, so look once more and let the room's fan-out
        # write it: the fan-out writes only what is after the stream's cursor, under
        # its lock, so nothing is written twice.
        server, store = self.server, self.server.store
        while waiter.outcome is None:
            try:
                messages = store.newer(self.room, cursor, MAX_LIMIT)
            except CursorGone as exc:
                self._send_reset(exc.oldest)
                cursor = None
                continue
            except CursorAhead:
                self._send_reset(None)
                cursor = None
                continue
            if messages:
                cursor = self._send_page(messages)
                continue
            with waiter.lock:
                waiter.after, waiter.live = cursor, True
                waiter.last_write = time.monotonic()
            newest = store.newest_in(self.room)
            if newest is not None and (cursor is None or newest > cursor):
                server.wake(self.room)
            return


# ---------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------

#: /metrics: (name, type, help, key in ChatServer.stats()).
METRICS = (
    ("chat_posts_total", "counter", "Messages stored since start.", "posts"),
    ("chat_wakeups_total", "counter", "Parked polls answered by a post.", "wakeups"),
    ("chat_stream_events_total", "counter", "Events written to event streams by posts.", "stream_events"),
    ("chat_streams_cut_total", "counter", "Event streams ended because their client read too slowly.",
     "streams_cut"),
    ("chat_messages_dropped_total", "counter", "Messages that left memory (older ones stay in the database).",
     "dropped"),
    ("chat_waiters", "gauge", "Long polls waiting now.", "waiters"),
    ("chat_streams", "gauge", "Event streams open now.", "streams"),
    ("chat_connections", "gauge", "Open client connections.", "connections"),
    ("chat_threads", "gauge", "Connection threads, busy or kept for reuse.", "threads"),
    ("chat_threads_busy", "gauge", "Connection threads serving a connection.", "threads_busy"),
    ("chat_rooms", "gauge", "Rooms with messages.", "rooms"),
    ("chat_messages_in_memory", "gauge", "Messages held in memory.", "messages"),
    ("chat_memory_bytes", "gauge", "Bytes of messages held in memory (see --memory-mib).", "memory_bytes"),
    ("chat_unsent_bytes", "gauge", "Bytes of answers being written to clients.", "unsent_bytes"),
    ("chat_database_writable", "gauge", "1 if posts can be stored, 0 if the database cannot be written.",
     "writable"),
    ("chat_uptime_seconds", "gauge", "Seconds since the server started.", "uptime"),
    ("process_resident_memory_bytes", "gauge", "Resident memory of the server process.", "rss_bytes"),
)


def prometheus_text(stats, statuses):
    """The Prometheus text exposition format (version 0.0.4) of `stats` and answers by status."""
    lines = []
    for name, kind, text, key in METRICS:
        value = stats.get(key)
        if value is None:
            continue
        number = "%d" % value if isinstance(value, int) else repr(float(value))
        lines += ["# HELP %s %s" % (name, text), "# TYPE %s %s" % (name, kind), "%s %s" % (name, number)]
    lines += ["# HELP chat_responses_total Answers sent, by HTTP status code.",
              "# TYPE chat_responses_total counter"]
    lines += ['chat_responses_total{code="%d"} %d' % (code, count) for code, count in sorted(statuses.items())]
    return ("\n".join(lines) + "\n").encode("utf-8")


# ---------------------------------------------------------------------------
# Web page
# ---------------------------------------------------------------------------

def build_page(html):
    """The page as bytes and a Content-Security-Policy that allows exactly its inline code.

    The page learns the server's limits from {{MAX_BODY_BYTES}} and {{MAX_AUTHOR_CHARS}},
    filled in here (outside its script, whose hash stays the same).
    """
    html = html.replace("{{MAX_BODY_BYTES}}", str(MAX_BODY_BYTES)).replace(
        "{{MAX_AUTHOR_CHARS}}", str(MAX_AUTHOR_CHARS))

    def hashes(tag):
        found = re.findall(r"<%s>(.*?)</%s>" % (tag, tag), html, re.S)
        return " ".join("'sha256-%s'" % base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()
                        for s in found) or "'none'"
    csp = ("default-src 'none'; script-src %s; style-src %s; connect-src 'self'; img-src 'self' data:; "
           "base-uri 'none'; form-action 'none'; frame-ancestors 'none'" % (hashes("script"), hashes("style")))
    return html.encode("utf-8"), csp


PAGE_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<link rel="icon" href="data:,">
<title>Chat</title>
<style>
:root {
  --bg: #ffffff; --fg: #1b1c1f; --muted: #5c6068; --line: #d5d7dc; --card: #f1f3f6;
  --mine: #e3ecfd; --mine-edge: #0b57d0; --accent: #0b57d0; --on-accent: #ffffff; --link: #0b57d0;
  --bad: #b3261e; --ok: #1e7b34;
  /* author colours: at least 4.5:1 on --bg, --card and --mine */
  --c0: #b3261e; --c1: #a1410d; --c2: #7a5c00; --c3: #18702f;
  --c4: #00696e; --c5: #0b57d0; --c6: #6b38c8; --c7: #a8246d;
  color-scheme: light dark;
}
@media (prefers-color-scheme: dark) {
  :root {
    --bg: #131417; --fg: #e4e5e9; --muted: #9da1a9; --line: #363940; --card: #1f2126;
    --mine: #1d2a44; --mine-edge: #8ab4f8; --accent: #8ab4f8; --on-accent: #0b1a33; --link: #8ab4f8;
    --bad: #f2b8b5; --ok: #7fd68f;
    --c0: #f2b8b5; --c1: #f6b87a; --c2: #e3c85c; --c3: #7fd68f;
    --c4: #5fd4d9; --c5: #8ab4f8; --c6: #c3a6ff; --c7: #f59ac7;
  }
}
* { box-sizing: border-box; }
[hidden] { display: none !important; }
html, body { height: 100%; }
body {
  margin: 0; display: flex; height: 100vh; height: 100dvh;
  background: var(--bg); color: var(--fg);
  font: 16px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
}
#column { flex: 1; min-width: 0; display: flex; flex-direction: column; }
#sidebar {
  width: 15rem; flex: none; display: flex; flex-direction: column; gap: .5rem; padding: .75rem;
  border-right: 1px solid var(--line); background: var(--card); overflow-y: auto;
}
#sidebar h2 { margin: 0; font-size: .8rem; text-transform: uppercase; letter-spacing: .05em; color: var(--muted); }
#room-list { list-style: none; margin: 0; padding: 0; }
#room-list a {
  display: flex; align-items: center; gap: .5rem; padding: .35rem .5rem; border-radius: 6px;
  color: var(--fg); text-decoration: none; overflow-wrap: anywhere;
}
#room-list a[aria-current="page"] { background: var(--mine); font-weight: 600; }
#room-list .badge {
  margin-left: auto; min-width: 1.4rem; padding: 0 .4rem; border-radius: 999px; text-align: center;
  font-size: .75rem; font-weight: 600; background: var(--accent); color: var(--on-accent);
}
#room-list .badge.mention { background: var(--bad); }
#room-form { display: flex; flex-direction: column; gap: .3rem; margin-top: auto; }
#room-form .row { display: flex; gap: .35rem; }
#room-form input { flex: 1; }
#room-rule { font-size: .75rem; color: var(--muted); }
#room-rule.bad { color: var(--bad); }
#drawer { display: none; }
header button { white-space: nowrap; }
#heading { display: flex; align-items: baseline; gap: .6rem; min-width: 0; flex: 1; }
#title, #here { white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
#title { margin: 0; font-size: 1.1rem; flex: none; max-width: 60%; }
#here { font-size: .85rem; color: var(--muted); min-width: 0; }
.mention .text { border-left: 3px solid var(--bad); }
.at { font-weight: 600; color: var(--accent); }
#older { margin: .5rem auto; text-align: center; font-size: .85rem; color: var(--muted); }
#note button { margin-left: .5rem; }
form, p { margin: 0; }
header, #token-form {
  display: flex; flex-wrap: wrap; align-items: center; gap: .5rem; padding: .5rem .75rem;
  border-bottom: 1px solid var(--line);
}
.field { display: flex; align-items: center; gap: .35rem; }
.field.stack { flex-direction: column; align-items: stretch; }
label { font-size: .9rem; color: var(--muted); }
input, textarea, button {
  font: inherit; color: inherit; background: var(--bg);
  border: 1px solid var(--line); border-radius: 6px; padding: .4rem .6rem; min-width: 0;
}
button { background: var(--accent); border-color: var(--accent); color: var(--on-accent); cursor: pointer; }
button.quiet { background: transparent; color: var(--accent); }
button.quiet[aria-pressed="true"]::before { content: "✓ "; }
button.busy { opacity: .6; cursor: progress; }
:focus-visible { outline: 3px solid var(--accent); outline-offset: 2px; }
#room { min-width: 0; }
#name { width: 100%; }
#state { margin-left: auto; font-size: .85rem; color: var(--muted); }
#status::before {
  content: ""; display: inline-block; width: .6em; height: .6em; margin-right: .4em;
  border-radius: 50%; background: var(--muted);
}
#status.ok::before { background: var(--ok); }
#status.bad::before { background: var(--bad); }
#pane { flex: 1; min-height: 0; position: relative; display: flex; }
main { flex: 1; position: relative; overflow-y: auto; padding: .25rem .75rem .75rem; }
#empty { margin: 2.5rem auto; max-width: 32rem; text-align: center; color: var(--muted); }
#messages { list-style: none; margin: 0; padding: 0; }
/* One message: an optional day divider across the list, then a bubble made of .meta and
   .text in a column as wide as the text needs (up to a limit); own messages on the right. */
#messages li { display: grid; grid-template-columns: fit-content(min(42rem, 88%)) 1fr; margin-top: .6rem; }
#messages li.mine { grid-template-columns: 1fr fit-content(min(42rem, 88%)); }
#messages li.cont { margin-top: .2rem; }
.meta, .text { grid-column: 1; min-width: 0; background: var(--card); border: 1px solid var(--card); }
.mine .meta, .mine .text { grid-column: 2; background: var(--mine); border-color: var(--mine-edge); }
.meta {
  display: flex; flex-wrap: wrap; align-items: baseline; gap: 0 .6rem; padding: .35rem .7rem 0;
  border-bottom-style: none; border-radius: 12px 12px 0 0; font-size: .8rem; color: var(--muted);
}
.text {
  padding: .1rem .7rem .4rem; border-top-style: none; border-radius: 0 0 12px 12px;
  white-space: pre-wrap; overflow-wrap: anywhere;
}
.cont .text { border-top-style: solid; border-radius: 12px; padding-top: .4rem; }
.text a { color: var(--link); }
.text a .host { font-weight: 600; }
.author { font-weight: 600; color: var(--fg); overflow-wrap: anywhere; }
.anon { font-style: italic; font-weight: 400; color: var(--muted); }
.verified::after { content: " ✓"; color: var(--ok); font-weight: 600; }
.foot { grid-column: 1; display: flex; gap: .5rem; align-items: center; min-height: 0; font-size: .75rem; color: var(--muted); }
.mine .foot { grid-column: 2; justify-content: flex-end; }
.foot:empty { display: none; }
.act { padding: 0 .4rem; font-size: .75rem; border: none; visibility: hidden; }
li:hover .act, li:focus-within .act { visibility: visible; }
li:not(.mine) .act { display: none; }
body.admin li:not(.mine) .act { display: inline-block; }
.deleted .text { font-style: italic; color: var(--muted); }
.editor { grid-column: 1; display: flex; gap: .4rem; flex-wrap: wrap; }
.mine .editor { grid-column: 2; }
.editor textarea { flex: 1 1 16rem; min-height: 3rem; }
.guest { font-size: .75rem; font-weight: 400; color: var(--muted); }
#me { margin: 0; font-size: .85rem; color: var(--muted); }
.c0 { color: var(--c0); } .c1 { color: var(--c1); } .c2 { color: var(--c2); } .c3 { color: var(--c3); }
.c4 { color: var(--c4); } .c5 { color: var(--c5); } .c6 { color: var(--c6); } .c7 { color: var(--c7); }
.day {
  grid-column: 1 / -1; display: flex; align-items: center; gap: .75rem; margin: .9rem 0 .2rem;
  font-size: .8rem; font-weight: 600; color: var(--muted);
}
.day::before, .day::after { content: ""; flex: 1; border-top: 1px solid var(--line); }
#jump {
  position: absolute; left: 50%; bottom: .75rem; transform: translateX(-50%);
  border-radius: 999px; padding: .35rem 1rem; box-shadow: 0 2px 10px rgba(0, 0, 0, .3);
}
#note { padding: .3rem .75rem 0; font-size: .85rem; color: var(--bad); }
#note:empty { display: none; }
#send-form { padding: .5rem .75rem; padding-bottom: max(.5rem, env(safe-area-inset-bottom)); border-top: 1px solid var(--line); }
#compose { display: flex; align-items: flex-end; gap: .5rem; }
#body { flex: 1; resize: none; overflow-y: auto; max-height: 8rem; }
#hint { display: flex; justify-content: space-between; gap: .75rem; margin-top: .25rem; font-size: .75rem; color: var(--muted); }
#count { font-variant-numeric: tabular-nums; white-space: nowrap; color: var(--fg); font-weight: 600; }
#count.over { color: var(--bad); }
.sr, .cont .meta {
  position: absolute; width: 1px; height: 1px; margin: -1px; padding: 0; border: 0;
  overflow: hidden; clip: rect(0 0 0 0); white-space: nowrap;
}
/* A phone: the rooms are a drawer behind a button, the header is one row. */
@media (max-width: 720px) {
  #drawer { display: inline-block; }
  #sidebar {
    position: fixed; z-index: 2; inset: 0 auto 0 0; width: min(18rem, 85vw);
    box-shadow: 0 0 24px rgba(0, 0, 0, .35); transform: translateX(-105%); visibility: hidden;
  }
  body.drawer-open #sidebar { transform: none; visibility: visible; }
  header { flex-wrap: nowrap; }
  #me { display: none; }
  #state { margin-left: 0; font-size: .75rem; }
  #state { white-space: nowrap; overflow: hidden; text-overflow: ellipsis; min-width: 0; }
}
@media (max-width: 520px) {
  header { gap: .35rem .5rem; }
  #notify { display: none; }  /* phone browsers show notifications from service workers only */
  #room, #name { width: 6.5rem; }
  #state { margin-left: 0; }
  #messages li { grid-template-columns: fit-content(92%) 1fr; }
  #messages li.mine { grid-template-columns: 1fr fit-content(92%); }
  #body { max-height: 6.5rem; }
}
/* Touch targets of at least 44 px on phones and touch screens. */
@media (max-width: 520px), (pointer: coarse) {
  input, textarea, button { min-height: 44px; }
  button { min-width: 44px; }
  .act { visibility: visible; }
}
</style>
</head>
<body data-max-body="{{MAX_BODY_BYTES}}" data-max-author="{{MAX_AUTHOR_CHARS}}">
<nav id="sidebar" aria-label="Rooms">
  <h2>Rooms</h2>
  <ul id="room-list"></ul>
  <div class="field stack" id="name-field">
    <label for="name">Name</label>
    <input id="name" autocomplete="nickname" placeholder="anonymous" dir="auto">
  </div>
  <form id="room-form" autocomplete="off">
    <label for="room">Join or start a room</label>
    <div class="row">
      <input id="room" maxlength="64" spellcheck="false" autocapitalize="off" enterkeyhint="go" aria-describedby="room-rule">
      <button>Go</button>
    </div>
    <p id="room-rule">Letters, digits, _ - and . (not first); up to 64.</p>
  </form>
</nav>
<div id="column">
<header>
  <button id="drawer" type="button" class="quiet" aria-controls="sidebar" aria-expanded="false">Rooms</button>
  <div id="heading"><h1 id="title">default</h1> <span id="here"></span></div>
  <p id="me" hidden></p>
  <button id="notify" type="button" class="quiet" aria-pressed="false" hidden
    title="Show a desktop notification for new messages while this tab is in the background">Notify me</button>
  <p id="state"><span id="status" role="status">connecting</span> <span id="countdown" aria-hidden="true"></span></p>
</header>
<form id="token-form" hidden>
  <label for="token" id="token-label">This server needs an access token</label>
  <input id="token" type="password" autocomplete="current-password">
  <button>Save</button>
</form>
<div id="pane">
  <main id="log" tabindex="0" aria-label="Conversation">
    <p id="empty">Connecting…</p>
    <ol id="messages" role="log" aria-live="off" aria-label="Messages"></ol>
  </main>
  <button id="jump" type="button" hidden><span id="jump-text">New messages</span> <span aria-hidden="true">↓</span></button>
</div>
<div id="announce" class="sr" aria-live="polite"></div>
<p id="note" role="alert"></p>
<form id="send-form" autocomplete="off">
  <label for="body" class="sr">Message</label>
  <div id="compose">
    <textarea id="body" rows="1" placeholder="Message" dir="auto" aria-describedby="hint"></textarea>
    <button id="send">Send</button>
  </div>
  <p id="hint"><span id="hint-text">Enter sends, Shift+Enter adds a line</span> <span id="count" hidden></span></p>
</form>
</div>
<script>
'use strict';
(function () {
  // This script lives in a Python string: it uses no backslashes (see clean() and linkify()).
  const $ = (id) => document.getElementById(id);
  const list = $('messages'), log = $('log'), emptyEl = $('empty'), announcer = $('announce');
  const jump = $('jump'), jumpText = $('jump-text'), statusEl = $('status'), countdownEl = $('countdown');
  const roomInput = $('room'), nameInput = $('name'), bodyInput = $('body'), note = $('note');
  const sendForm = $('send-form'), sendButton = $('send'), counter = $('count'), hint = $('hint-text');
  const tokenForm = $('token-form'), tokenInput = $('token'), tokenLabel = $('token-label');
  const notifyButton = $('notify'), meEl = $('me'), nameField = $('name-field');
  const roomList = $('room-list'), titleEl = $('title'), hereEl = $('here'), drawer = $('drawer'), roomRule = $('room-rule');
  const ROOMS_EVERY_MS = 5000, PRESENCE_EVERY_MS = 5000, OLDER_PAGE = 50;   // cheap: both are read from memory

  // The server's limits, written into <body data-...> by the server.
  const MAX_BODY = Number(document.body.dataset.maxBody) || 0;      // bytes of the whole JSON request
  const MAX_AUTHOR = Number(document.body.dataset.maxAuthor) || 0;  // characters of a name
  const ROOM_RE = /^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}$/;
  const POLL_S = 25, HIDDEN_POLL_S = 45;   // long-poll waits; a hidden tab asks less often (server max 50)
  const RECENT = 100;                      // messages shown when a room opens
  const MAX_SHOWN = 1000;                  // the oldest go once more are shown (pages stay open all day)
  const MAX_BACKOFF_MS = 30000, MAX_RETRY_AFTER_MS = 300000;
  const GROUP_MS = 5 * 60 * 1000;          // an author's messages this close share one header
  const COUNTER_FROM = 0.8;                // the byte counter shows past this share of the limit
  const COLOURS = 8;                       // .c0 to .c7 in the style sheet
  const touch = window.matchMedia('(pointer: coarse)');
  const utf8 = new TextEncoder();

  const memory = {};
  const saved = {
    get(k) { try { return localStorage.getItem('chat.' + k) || ''; } catch (e) { return memory[k] || ''; } },
    set(k, v) {
      memory[k] = v;
      try { if (v) localStorage.setItem('chat.' + k, v); else localStorage.removeItem('chat.' + k); } catch (e) { /* private mode */ }
    }
  };

  // A sign-in link (the page address with #token=<jwt>): a fragment never reaches a server log or a
  // Referer. The token moves to this tab's sessionStorage and out of the address bar; it
  // is sent as the Authorization header, and the name on our posts is the one it carries.
  const session = {
    get(k) { try { return sessionStorage.getItem('chat.' + k) || ''; } catch (e) { return memory['s.' + k] || ''; } },
    set(k, v) {
      memory['s.' + k] = v;
      try { if (v) sessionStorage.setItem('chat.' + k, v); else sessionStorage.removeItem('chat.' + k); } catch (e) { /* private mode */ }
    }
  };
  if (location.hash.slice(0, 7) === '#token=') {
    session.set('signin', location.hash.slice(7));
    history.replaceState(null, '', location.pathname + location.search);
  }
  function claimsOf(token) {  // the token's claims, read (not verified: the server does that)
    try {
      const part = token.split('.')[1].split('-').join('+').split('_').join('/');
      return JSON.parse(new TextDecoder().decode(Uint8Array.from(atob(part), (c) => c.charCodeAt(0))));
    } catch (e) { return null; }
  }
  let me = null;  // {user, name, exp} while signed in
  function signIn() {
    const claims = claimsOf(session.get('signin'));
    me = claims && typeof claims.sub === 'string' ?
      { user: claims.sub, name: typeof claims.name === 'string' ? claims.name : claims.sub, exp: Number(claims.exp),
        admin: claims.admin === true } : null;
    if (!me) session.set('signin', '');
    meEl.hidden = nameField.hidden = false;
    document.body.classList.toggle('admin', !!(me && me.admin));
    if (me) {
      meEl.textContent = 'Signed in as ' + me.name;
      nameField.hidden = true;
    } else {
      meEl.hidden = true;
    }
  }
  signIn();
  let sawVerified = false;  // a message with a verified user: this server has sign-ins

  // A random id for this browser, sent with every post. The server stores and shows only a
  // hash of it (the message's "client" tag), so nobody can post as us; we learn our own tag
  // from the answer to our first post. "Mine" means "has our tag", whatever the name.
  let client = saved.get('client'), myTag = saved.get('tag');
  if (!/^[A-Za-z0-9_-]{8,64}$/.test(client)) {
    const abc = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_';
    client = Array.from(crypto.getRandomValues(new Uint8Array(22)), (b) => abc[b & 63]).join('');
    myTag = '';
    saved.set('client', client);
    saved.set('tag', '');
  }

  // Our tag is a hash of our id (see client_tag() in the server): worked out here where the
  // browser can (a secure context, which a loopback address is), so that our own message is
  // ours even when the poll brings it before the answer to the post that sent it.
  if (window.crypto && crypto.subtle && !myTag) {
    crypto.subtle.digest('SHA-256', utf8.encode('chat-client:' + client)).then((digest) => {
      const b64 = btoa(String.fromCharCode.apply(null, new Uint8Array(digest).slice(0, 12)));
      learnTag(b64.split('+').join('-').split('/').join('_'));
    }).catch(() => { /* learnt from the answer to our first post instead */ });
  }

  let room = 'default', cursor = null, loaded = false, byId = new Map(), changes = new Set();
  let gen = 0, ctrl = null, state = 'connecting', unread = 0, sending = false;
  let stick = true, jumpCount = 0;        // stick: the reader is at the bottom of the list
  const info = new WeakMap();              // <li> -> {author, client, t, day}, for grouping

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
  // Relative to the page's own URL, so the page also works under a proxy's path prefix.
  const roomUrl = (r) => 'rooms/' + encodeURIComponent(r) + '/messages';
  function clip(s, n) {  // by code points, so no emoji is cut in half
    const chars = Array.from(s);
    return chars.length > n ? chars.slice(0, n - 1).join('') + '…' : s;
  }
  // A note under the messages; with `retry`, a Retry button beside it that calls it.
  function say(text, retry) {
    note.textContent = text;
    if (retry && text) {
      const again = el('button', 'quiet');
      again.type = 'button';
      again.textContent = 'Retry';
      again.addEventListener('click', () => retry());
      note.append(again);
    }
  }
  let pendingSend = false;
  function el(tag, cls) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    return e;
  }
  function headers(extra) {
    const h = Object.assign({}, extra), token = (me && session.get('signin')) || saved.get('token');
    if (token) h.Authorization = 'Bearer ' + token;
    return h;
  }

  // -- connection state: the status line (a live region) and the empty list's text --

  const STATES = {  // name: [status line, text shown while the list is empty, dot]
    connecting: ['connecting', 'Connecting…', ''],
    connected: ['connected', 'No messages yet. Say hello!', 'ok'],
    offline: ["can't reach the server; reconnecting", "Can't reach the server. The page keeps trying.", 'bad'],
    busy: ['server busy; reconnecting', 'The server is busy. The page keeps trying.', 'bad'],
    lost: ['connection problem; reconnecting', 'The connection to the server has a problem. The page keeps trying.', 'bad'],
    host: ['address refused; retrying', 'The chat server does not accept this web address. Ask whoever runs it.', 'bad'],
    needed: ['access token needed', 'This server needs an access token: enter it above to see the messages.', 'bad'],
    refused: ['access token refused', 'The access token was refused: check it and enter it again above.', 'bad'],
    expired: ['your sign-in link has expired', 'Your sign-in link has expired: ask for a new one.', 'bad'],
    forbidden: ['no access to this room', 'Your sign-in does not let you read this room.', 'bad']
  };
  function setState(name) {
    state = name;
    // Written only when it changes, so a screen reader hears "reconnecting" once; the
    // countdown beside it is aria-hidden.
    if (statusEl.textContent !== STATES[name][0]) statusEl.textContent = STATES[name][0];
    statusEl.className = STATES[name][2];
    countdownEl.textContent = '';
    showEmpty();
  }
  function showEmpty() {
    emptyEl.hidden = list.firstElementChild !== null;
    emptyEl.textContent = state === 'connected' && !loaded ? 'Loading…' : STATES[state][1];
  }

  // -- rendering (DOM nodes and text only) --

  function dayLabel(t) {
    const d = new Date(t), now = new Date(), yesterday = new Date();
    yesterday.setDate(now.getDate() - 1);
    if (d.toDateString() === now.toDateString()) return 'Today';
    if (d.toDateString() === yesterday.toDateString()) return 'Yesterday';
    const options = { weekday: 'long', day: 'numeric', month: 'long' };
    if (d.getFullYear() !== now.getFullYear()) options.year = 'numeric';
    return d.toLocaleDateString(undefined, options);
  }
  function when(iso, t) {
    const time = el('time');
    if (isNaN(t)) return time;
    time.dateTime = iso;
    time.title = new Date(t).toLocaleString();
    time.textContent = new Date(t).toLocaleTimeString([], { hour: 'numeric', minute: '2-digit' });
    return time;
  }
  function colourOf(name) {
    let h = 0;
    for (let i = 0; i < name.length; i++) h = (Math.imul(h, 31) + name.charCodeAt(i)) >>> 0;
    return 'c' + (h % COLOURS);
  }

  // Append `text` to `parent`, with each http(s) URL as a link. Only those two schemes are
  // matched, so javascript:, data: and the rest stay text. Punctuation that usually ends a
  // sentence is left out of the link, and so is a ")" that does not close a "(" in it
  // (counted once per link: a check per character made 10,000 ")" cost seconds).
  // A link shows the host the browser will visit when its text does not start with it
  // (evil.example for a text of "evil.example", a backslash, "@bank.example/" after the
  // scheme; an IDN's xn-- form likewise),
  // and its text loses text-direction controls, which could reorder what it seems to say.
  const URL_START = /https?:[/][/]/gi;
  const TRAILING = `.,;:!?'")]}`;
  const BIDI_CONTROLS = [0x061C, 0x200E, 0x200F, 0x202A, 0x202B, 0x202C, 0x202D, 0x202E, 0x2066, 0x2067, 0x2068, 0x2069];
  const withoutBidiControls = (s) => Array.from(s).filter((c) => !BIDI_CONTROLS.includes(c.codePointAt(0))).join('');
  function showsHost(shown, url) {
    const prefix = url.protocol + '//' + url.host;
    if (shown.slice(0, prefix.length).toLowerCase() !== prefix) return false;
    const after = shown.charAt(prefix.length);
    return after === '' || '/?#'.includes(after);
  }
  // @name of someone here or who wrote lately is marked; a message that names us is a mention.
  const known = new Set();    // lower-case names: present users and recent authors
  const myName = () => (me ? me.name : authorName()).toLowerCase();
  const NAME_END = ' .,;:!?()[]{}<>"@' + String.fromCharCode(9, 10);
  function appendText(parent, text) {
    let done = 0;
    for (let i = text.indexOf('@'); i >= 0; i = text.indexOf('@', i + 1)) {
      let end = i + 1;
      while (end < text.length && !NAME_END.includes(text[end])) end++;
      const name = text.slice(i + 1, end).toLowerCase();
      if (!name || !(known.has(name) || name === myName())) continue;
      if (i > done) parent.append(text.slice(done, i));
      const at = el('span', 'at');
      at.textContent = text.slice(i, end);
      parent.append(at);
      done = end;
      i = end - 1;
    }
    if (done < text.length) parent.append(text.slice(done));
  }
  function mentionsMe(body) {
    const name = myName();
    if (!name) return false;
    const text = String(body).toLowerCase();
    for (let i = text.indexOf('@' + name); i >= 0; i = text.indexOf('@' + name, i + 1)) {
      const after = text.charAt(i + 1 + name.length);
      if (after === '' || NAME_END.includes(after)) return true;
    }
    return false;
  }

  function linkify(parent, text) {
    let done = 0, m;
    URL_START.lastIndex = 0;
    while ((m = URL_START.exec(text))) {
      const start = m.index;
      if (start > 0 && /[A-Za-z0-9]/.test(text[start - 1])) continue;
      let end = start, opens = 0, closes = 0;
      while (end < text.length && text[end].trim() !== '' && !'<>"'.includes(text[end])) {
        if (text[end] === '(') opens++;
        else if (text[end] === ')') closes++;
        end++;
      }
      while (end > start && TRAILING.includes(text[end - 1])) {
        if (text[end - 1] === ')') {
          if (closes <= opens) break;
          closes--;
        }
        end--;
      }
      let url = null;
      try { url = new URL(text.slice(start, end)); } catch (e) { url = null; }
      if (!url || !url.hostname) continue;
      if (start > done) appendText(parent, text.slice(done, start));
      const a = el('a'), shown = withoutBidiControls(text.slice(start, end));
      a.href = url.href;
      a.dir = 'ltr';
      a.textContent = shown;
      a.target = '_blank';
      a.rel = 'noopener noreferrer';
      if (!showsHost(shown, url)) {
        const host = el('span', 'host');
        host.textContent = ' (' + url.host + ')';
        a.append(host);
      }
      parent.append(a);
      done = end;
      URL_START.lastIndex = end;
    }
    if (done < text.length) appendText(parent, text.slice(done));
  }

  // Mine: by the verified user where the message has one (the same person on two devices),
  // else by this browser's tag.
  const isMine = (m) => m.user ? !!me && m.user === me.user : !!myTag && m.client === myTag;

  // Show one message, once per id, in id (= time) order; null if it was not added. An edit
  // or a delete is a message too (the log is append-only), but it is not shown as one: it
  // changes the message it names, for every reader, as it arrives.
  function add(m) {
    if (!m || typeof m.id !== 'string' || byId.has(m.id) || changes.has(m.id) || (m.room && m.room !== room)) return null;
    if (m.edits || m.deletes) {
      changes.add(m.id);
      applyChange(m);
      return null;
    }
    const t = Date.parse(m.created_at), author = typeof m.author === 'string' ? m.author : '';
    const li = el('li'), meta = el('div', 'meta'), text = el('div', 'text');
    const who = el('span', author ? 'author ' + colourOf(author) : 'author anon');
    li.dataset.id = m.id;
    if (m.client) li.dataset.client = m.client;
    if (isMine(m)) li.classList.add('mine');
    info.set(li, { author: author, client: (m.user ? 'user:' + m.user : m.client) || '', t: t,
                   day: isNaN(t) ? '' : new Date(t).toDateString() });
    who.dir = 'auto';
    who.textContent = author || 'anonymous';
    if (author) known.add(author.toLowerCase());
    if (typeof m.user === 'string' && m.user) {
      sawVerified = true;
      who.classList.add('verified');
      who.title = 'signed in as ' + m.user;
      li.dataset.user = m.user;
    }
    meta.append(who);
    if (!m.user && (me || sawVerified)) {
      const guest = el('span', 'guest');
      guest.textContent = 'not signed in';
      meta.append(guest);
    }
    meta.append(when(m.created_at, t));
    text.dir = 'auto';
    li.append(meta, text, el('div', 'foot'));
    if (m.deleted) showDeleted(li); else showText(li, String(m.body), !!m.edited_at);
    let next = null;
    for (let e = list.lastElementChild; e && e.dataset.id > m.id; e = e.previousElementSibling) next = e;
    list.insertBefore(li, next);
    decorate(li);
    if (next) decorate(next);
    byId.set(m.id, li);
    return li;
  }

  // The text of a message, "edited" after it when it was, and Edit and Delete where this
  // reader may use them (its own messages; an admin's, anyone's): buttons, so a keyboard
  // reaches them, shown on hover and focus with a mouse and always on a touch screen.
  function showText(li, body, edited) {
    const text = li.querySelector('.text'), foot = li.querySelector('.foot');
    text.textContent = '';
    linkify(text, body);
    li.classList.toggle('mention', !li.classList.contains('mine') && mentionsMe(body));
    foot.textContent = '';
    if (edited) {
      const mark = el('span', 'edited');
      mark.textContent = 'edited';
      foot.append(mark);
    }
    const edit = el('button', 'quiet act'), del = el('button', 'quiet act');
    edit.type = del.type = 'button';
    edit.textContent = 'Edit';
    del.textContent = 'Delete';
    edit.addEventListener('click', () => startEdit(li));
    del.addEventListener('click', () => askDelete(li, del));
    foot.append(edit, del);
  }
  function showDeleted(li) {
    const text = li.querySelector('.text');
    li.classList.add('deleted');
    text.textContent = 'message deleted';
    li.querySelector('.foot').textContent = '';
  }
  function applyChange(m) {
    const li = byId.get(m.edits || m.deletes);
    if (!li || li.classList.contains('deleted')) return;
    if (m.deletes) showDeleted(li);
    else showText(li, String(m.body), true);    // under an open editor too: it shows once closed
  }
  const mayChange = (li) => !li.classList.contains('deleted') && (li.classList.contains('mine') || !!(me && me.admin));

  async function change(payload) {
    payload.client = client;
    let res = null, data = null;
    try {
      res = await fetch(roomUrl(room), { method: 'POST', headers: headers({ 'Content-Type': 'application/json' }),
                                         body: JSON.stringify(payload) });
      data = await res.json().catch(() => null);
    } catch (e) { res = null; }
    if (res && res.status === 201 && data) {
      add(data);
      return true;
    }
    say(!res ? "Not changed: can't reach the server." : data && data.error ? 'Not changed: ' + data.error
        : 'Not changed (error ' + res.status + ').');
    return false;
  }
  function startEdit(li) {
    if (!mayChange(li) || li.querySelector('form')) return;
    const text = li.querySelector('.text'), old = text.textContent;
    const form = el('form', 'editor'), box = el('textarea'), save = el('button'), cancel = el('button', 'quiet');
    box.value = old;
    box.setAttribute('aria-label', 'Edit your message');
    save.textContent = 'Save';
    cancel.textContent = 'Cancel';
    cancel.type = 'button';
    form.append(box, save, cancel);
    text.hidden = true;
    li.querySelector('.foot').hidden = true;
    li.append(form);
    box.focus();
    const close = () => { form.remove(); text.hidden = false; li.querySelector('.foot').hidden = false; };
    cancel.addEventListener('click', () => { close(); bodyInput.focus(); });
    box.addEventListener('keydown', (e) => {
      if (e.key === 'Escape') { close(); bodyInput.focus(); return; }
      // As in the message box: Enter saves (not with a touch screen), Shift+Enter adds a line.
      if (e.key === 'Enter' && !e.shiftKey && !e.isComposing && e.keyCode !== 229 && !touch.matches) {
        e.preventDefault();
        form.requestSubmit();
      }
    });
    form.addEventListener('submit', async (e) => {
      e.preventDefault();
      const body = clean(box.value, false);
      if (!body.trim() || body === old) { close(); return; }
      if (await change({ edits: li.dataset.id, body: body })) close();
    });
  }
  // Delete asks once more on the button itself (no dialog): a second press within 5 s deletes.
  function askDelete(li, button) {
    if (!mayChange(li)) return;
    if (button.dataset.armed) {
      change({ deletes: li.dataset.id });
      return;
    }
    button.dataset.armed = '1';
    button.textContent = 'Delete for everyone?';
    setTimeout(() => { delete button.dataset.armed; button.textContent = 'Delete'; }, 5000);
  }

  // A day divider above the first message of each day, and one header for a run of an
  // author's messages. Both depend on the message before, so they are worked out again for
  // a message and for the one after it whenever a message is inserted.
  function decorate(li) {
    const me = info.get(li), prev = li.previousElementSibling && info.get(li.previousElementSibling);
    const newDay = !prev || prev.day !== me.day;
    let day = li.firstElementChild.classList.contains('day') ? li.firstElementChild : null;
    if (newDay && !day) {
      day = el('div', 'day');
      li.prepend(day);
    } else if (!newDay && day) {
      day.remove();
      day = null;
    }
    if (day) day.textContent = me.day ? dayLabel(me.t) : '';
    li.classList.toggle('cont', !newDay && prev.author === me.author && prev.client === me.client &&
                        me.t - prev.t < GROUP_MS);
  }
  let today = new Date().toDateString();
  setInterval(() => {  // "Today" becomes "Yesterday" at midnight in a page left open
    if (new Date().toDateString() === today) return;
    today = new Date().toDateString();
    for (const day of list.querySelectorAll('.day')) day.textContent = dayLabel(info.get(day.parentElement).t);
  }, 60000);

  // Only while the reader is at the bottom: removing from the top moves what they read.
  function trim() {
    if (list.childElementCount <= MAX_SHOWN) return;
    while (list.childElementCount > MAX_SHOWN) {
      byId.delete(list.firstElementChild.dataset.id);
      list.firstElementChild.remove();
    }
    decorate(list.firstElementChild);
  }

  function learnTag(tag) {
    if (typeof tag !== 'string' || !tag || tag === myTag) return;
    myTag = tag;
    saved.set('tag', tag);
    for (const li of list.children) li.classList.toggle('mine', li.dataset.client === myTag);
  }

  // The messages of one answer. A room's first page (`history`) is just shown; new messages
  // from others are announced, counted in the title while the tab is hidden, notified if
  // asked for, and offered with the "new messages" button when the reader has scrolled up.
  function addAll(messages, history) {
    const added = messages.filter((m) => add(m) !== null);
    showEmpty();
    if (!added.length) return;
    if (history || stick) {
      trim();
      scrollToBottom();
    }
    if (history) return;
    const news = added.filter((m) => !isMine(m));
    if (!news.length) return;
    if (!stick) {
      jumpCount += news.length;
      jumpText.textContent = jumpCount === 1 ? '1 new message' : jumpCount + ' new messages';
      jump.hidden = false;
    }
    announce(news);
    if (document.visibilityState === 'hidden') {
      unread += news.length;
      updateTitle();
      // A message that mentions us is the one a notification is about.
      const mentions = news.filter((m) => mentionsMe(m.body));
      notify(mentions.length ? mentions : news, mentions.length > 0);
    } else {
      markSeen();
    }
  }

  // New messages are read out from this polite region; the list itself is role="log" with
  // aria-live="off", so opening a room does not read out its last 100 messages.
  function announce(messages) {
    const lines = messages.length > 3 ? [messages.length + ' new messages']
      : messages.map((m) => (m.author || 'anonymous') + ': ' + clip(String(m.body), 300));
    for (const line of lines) {
      const p = el('p');
      p.textContent = line;
      announcer.append(p);
    }
    while (announcer.childElementCount > 3) announcer.firstElementChild.remove();
  }

  function updateTitle() { document.title = (unread ? '(' + unread + ') ' : '') + room + ' - chat'; }

  // -- scrolling --

  const nearBottom = () => log.scrollHeight - log.scrollTop - log.clientHeight < 60;
  function scrollToBottom() {
    log.scrollTop = log.scrollHeight;
    stick = true;
    jumpCount = 0;
    jump.hidden = true;
  }
  log.addEventListener('scroll', () => {
    stick = nearBottom();
    if (stick) { jumpCount = 0; jump.hidden = true; }
  }, { passive: true });
  // Keep the newest message in view when the list's box shrinks (the message box grows, a
  // phone keyboard opens).
  new ResizeObserver(() => { if (stick) log.scrollTop = log.scrollHeight; }).observe(log);
  jump.addEventListener('click', () => { scrollToBottom(); bodyInput.focus({ preventScroll: true }); });

  // -- desktop notifications (asked for on a click only; shown only while the tab is hidden) --

  // Phone browsers have a Notification object but show notifications from service workers
  // only: the button is offered where this page can show one.
  const canNotify = 'Notification' in window && !touch.matches;
  const notifying = () => canNotify && Notification.permission === 'granted' && saved.get('notify') === 'on';
  function showNotifyButton() {
    notifyButton.hidden = !canNotify || Notification.permission === 'denied';
    notifyButton.setAttribute('aria-pressed', String(notifying()));
  }
  notifyButton.addEventListener('click', async () => {
    if (notifying()) {
      saved.set('notify', '');
    } else {
      const answer = Notification.permission === 'granted' ? 'granted' : await Notification.requestPermission();
      saved.set('notify', answer === 'granted' ? 'on' : '');
      if (answer === 'denied') say('Notifications are blocked for this page in the browser settings.');
    }
    showNotifyButton();
  });
  function notify(messages, mention) {
    if (!notifying()) return;
    const last = messages[messages.length - 1];
    const title = mention ? (last.author || 'anonymous') + ' mentioned you in ' + room
      : messages.length > 1 ? messages.length + ' new messages in ' + room
      : (last.author || 'anonymous') + ' in ' + room;
    try {
      const n = new Notification(title, { body: clip(String(last.body), 200), tag: 'chat-' + room });
      n.addEventListener('click', () => { window.focus(); n.close(); });
    } catch (e) { /* Chrome on Android allows notifications from service workers only */ }
  }

  // -- following the room --

  function reset() {
    cursor = null;
    loaded = false;
    atStart = false;
    loadingOlder = false;
    olderEl.textContent = '';
    byId = new Map();
    changes = new Set();
    list.textContent = '';
    scrollToBottom();
    showEmpty();
  }

  // One long-polling loop per generation; a newer generation (room switch, token) ends it.
  async function poll(g, signal) {
    let fails = 0;
    while (g === gen) {
      const wait = state !== 'connected' ? 0 : document.visibilityState === 'hidden' ? HIDDEN_POLL_S : POLL_S;
      const q = (cursor ? '?after=' + encodeURIComponent(cursor) : '?tail=' + RECENT) + '&timeout=' + wait +
        (!me && authorName() ? '&name=' + encodeURIComponent(authorName()) : '');
      const withToken = !!saved.get('token');
      let res = null, data = null;
      try {
        res = await fetch(roomUrl(room) + q, { headers: headers(), signal: signal, cache: 'no-store' });
        data = await res.json().catch(() => null);
      } catch (e) { res = null; }
      if (g !== gen) return;
      if (res && res.ok && Array.isArray(data)) {
        const history = !loaded;
        fails = 0;
        loaded = true;
        setState('connected');
        if (pendingSend) say('Not sent yet.', send);   // the connection is back: say what is true now
        addAll(data, history);
        if (data.length) cursor = data[data.length - 1].id;
        if (history && data.length < RECENT) showStart('This is the start of the room.');
        if (history) markSeen();
        continue;
      }
      if (res && (res.status === 410 || (res.status === 400 && data && typeof data === 'object' && 'latest' in data))) {
        reset();  // the cursor is older than what is kept, or from before a restart: reload the room
        continue;
      }
      if (res && res.status === 401 && me) { signInExpired(); return; }
      if (res && res.status === 403) { setState('forbidden'); return; }
      if (res && res.status === 401) { askToken(withToken); return; }
      // Anything else: wait (capped exponential backoff with jitter, at least Retry-After), retry.
      let ms = Math.min(MAX_BACKOFF_MS, 1000 * Math.pow(2, fails++)) * (0.5 + Math.random() / 2);
      const retryAfter = res ? Number(res.headers.get('Retry-After')) : 0;
      if (retryAfter > 0) ms = Math.max(ms, Math.min(retryAfter * 1000, MAX_RETRY_AFTER_MS));
      setState(!res ? 'offline' : res.status === 421 ? 'host' : res.status === 429 || res.status === 503 ? 'busy' : 'lost');
      const end = Date.now() + ms;
      while (g === gen && Date.now() < end) {
        countdownEl.textContent = 'in ' + Math.ceil((end - Date.now()) / 1000) + ' s';
        await sleep(Math.min(1000, end - Date.now()));
      }
    }
  }

  function stop() { gen++; if (ctrl) ctrl.abort(); ctrl = null; }
  function start() {
    stop();
    if (!tokenForm.hidden) return;
    ctrl = new AbortController();
    setState('connecting');
    poll(gen, ctrl.signal);
  }

  // The sign-in token was refused (it expired, or the server has a new secret): say so, and
  // go on without it where the server lets anonymous clients in.
  function signInExpired() {
    const expired = !me.exp || me.exp * 1000 <= Date.now();
    session.set('signin', '');
    signIn();
    say(expired ? 'Your sign-in link has expired: ask for a new one.' : 'Your sign-in link was refused: ask for a new one.');
    setState('expired');
    start();
  }

  // `refused`: the request that got the 401 carried a token.
  function askToken(refused) {
    stop();
    saved.set('token', '');
    setState(refused ? 'refused' : 'needed');
    tokenLabel.textContent = refused ? 'That access token was refused; enter the right one' : 'This server needs an access token';
    if (tokenForm.hidden) {
      tokenForm.hidden = false;
      tokenInput.value = '';
    }
    tokenInput.focus();
  }
  tokenForm.addEventListener('submit', (e) => {
    e.preventDefault();
    const token = tokenInput.value.trim();
    if (!/^[!-~]+$/.test(token)) {  // it travels in a header: visible ASCII only
      say(token ? 'An access token has no spaces and no accented letters.' : '');
      tokenInput.focus();
      return;
    }
    say('');
    saved.set('token', token);
    tokenForm.hidden = true;
    bodyInput.focus();
    start();
  });

  function openRoom() {
    let r = '';
    try { r = decodeURIComponent(location.hash.slice(1)); } catch (e) { r = ''; }
    say('');
    if (r && !ROOM_RE.test(r)) { say('“' + clip(r, 40) + '” is not a room name; this is the default room.'); r = ''; }
    room = r || 'default';
    roomInput.value = room;
    titleEl.textContent = room;
    hereEl.textContent = '';
    unread = 0;
    updateTitle();
    reset();
    start();
    closeDrawer();
    showRooms();
    loadPresence();
    if (tokenForm.hidden) bodyInput.focus();
  }
  window.addEventListener('hashchange', openRoom);

  // -- the rooms: a sidebar (a drawer on a phone), unread counts, who is here --

  // The newest id seen in each room, in this browser: a room whose newest is later has news.
  const seenOf = (r) => saved.get('seen.' + r);
  function markSeen() {
    const last = list.lastElementChild;
    if (last && last.dataset.id > seenOf(room)) saved.set('seen.' + room, last.dataset.id);
    if (cursor && cursor > seenOf(room)) saved.set('seen.' + room, cursor);
  }
  let rooms = [], badges = {};
  async function loadRooms() {
    let res = null, data = null;
    try {
      res = await fetch('rooms?limit=200', { headers: headers(), cache: 'no-store' });
      data = await res.json().catch(() => null);
    } catch (e) { res = null; }
    if (!res || !res.ok || !Array.isArray(data)) return;
    rooms = data;
    for (const r of rooms) {
      if (!seenOf(r.name)) saved.set('seen.' + r.name, r.latest);   // first sight: nothing unread yet
      if (r.name !== room && r.latest > seenOf(r.name)) badges[r.name] = await unreadIn(r.name);
      else delete badges[r.name];
    }
    showRooms();
  }
  // {count, mentions} of what came after the last id seen in a room (a page of it at most).
  async function unreadIn(r) {
    try {
      const res = await fetch(roomUrl(r) + '?timeout=0&limit=100&after=' + encodeURIComponent(seenOf(r)),
                              { headers: headers(), cache: 'no-store' });
      const data = await res.json();
      if (!res.ok || !Array.isArray(data)) return { count: 0, mentions: 0 };
      const news = data.filter((m) => !m.edits && !m.deletes && !m.deleted && !isMine(m));
      return { count: news.length, mentions: news.filter((m) => mentionsMe(m.body)).length };
    } catch (e) { return { count: 0, mentions: 0 }; }
  }
  function showRooms() {
    roomList.textContent = '';
    const names = rooms.map((r) => r.name);
    if (!names.includes(room)) names.unshift(room);
    for (const name of names) {
      const li = el('li'), a = el('a'), label = el('span'), badge = badges[name];
      a.href = '#' + encodeURIComponent(name);
      label.textContent = name;
      a.append(label);
      if (name === room) a.setAttribute('aria-current', 'page');
      if (name !== room && badge && badge.count) {
        const b = el('span', badge.mentions ? 'badge mention' : 'badge');
        b.textContent = badge.mentions ? '@' + badge.mentions : String(badge.count);
        b.title = badge.count + ' unread' + (badge.mentions ? ', ' + badge.mentions + ' mentioning you' : '');
        a.append(b);
      }
      li.append(a);
      roomList.append(li);
    }
  }
  async function loadPresence() {
    const asked = room;
    let data = null;
    try {
      const res = await fetch('rooms/' + encodeURIComponent(room) + '/presence', { headers: headers(), cache: 'no-store' });
      data = res.ok ? await res.json() : null;
    } catch (e) { data = null; }
    if (asked !== room || !data || typeof data.count !== 'number') return;
    const names = (data.users || []).map((u) => u.name).filter((n) => typeof n === 'string' && n);
    for (const n of names) known.add(n.toLowerCase());
    const shown = names.slice(0, 2), more = data.count - shown.length;
    hereEl.textContent = !data.count ? '' : data.count + ' here' + (shown.length ? ': ' + shown.join(', ') +
      (more > 0 ? ' and ' + more + ' more' : '') : '');
  }
  setInterval(loadRooms, ROOMS_EVERY_MS);
  setInterval(loadPresence, PRESENCE_EVERY_MS);
  function closeDrawer() {
    document.body.classList.remove('drawer-open');
    drawer.setAttribute('aria-expanded', 'false');
  }
  drawer.addEventListener('click', () => {
    const open = !document.body.classList.contains('drawer-open');
    document.body.classList.toggle('drawer-open', open);
    drawer.setAttribute('aria-expanded', String(open));
    if (open) (roomList.querySelector('a') || roomInput).focus();
  });
  document.addEventListener('keydown', (e) => {
    if (e.key === 'Escape' && document.body.classList.contains('drawer-open')) { closeDrawer(); drawer.focus(); }
  });
  roomInput.addEventListener('input', () => {
    const r = roomInput.value.trim(), ok = !r || ROOM_RE.test(r);
    roomRule.classList.toggle('bad', !ok);
    roomRule.textContent = ok ? 'Letters, digits, _ - and . (not first); up to 64.'
      : 'Not a room name: use letters, digits, _ - and . (not first), up to 64.';
  });

  // -- older messages: scrolling to the top loads the page before the first one shown --

  const olderEl = el('p');
  olderEl.id = 'older';
  log.insertBefore(olderEl, list);
  let atStart = false, loadingOlder = false;
  function showStart(text) { atStart = true; olderEl.textContent = text; }
  async function loadOlder() {
    const first = list.firstElementChild, asked = room, g = gen;
    if (atStart || loadingOlder || !loaded || !first) return;
    loadingOlder = true;
    olderEl.textContent = 'Loading older messages…';
    let res = null, data = null;
    try {
      res = await fetch(roomUrl(room) + '?limit=' + OLDER_PAGE + '&before=' + encodeURIComponent(first.dataset.id),
                        { headers: headers(), cache: 'no-store' });
      data = await res.json().catch(() => null);
    } catch (e) { res = null; }
    loadingOlder = false;
    if (asked !== room || g !== gen) return;
    if (res && res.status === 410) { showStart('Older messages are no longer kept.'); return; }
    if (!res || !res.ok || !Array.isArray(data)) { olderEl.textContent = ''; return; }
    olderEl.textContent = '';
    const height = log.scrollHeight, top = log.scrollTop;
    for (const m of data) add(m);
    log.scrollTop = top + log.scrollHeight - height;     // the reader's place stays where it was
    if (data.length < OLDER_PAGE) showStart('This is the start of the room.');
  }
  log.addEventListener('scroll', () => { if (log.scrollTop < 80) loadOlder(); }, { passive: true });
  $('room-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const r = roomInput.value.trim();
    if (!ROOM_RE.test(r)) {
      say('Room names are 1 to 64 letters, digits, _ - or . and do not start with a dot.');
      roomInput.focus();
      return;
    }
    say('');
    if (r !== room) location.hash = encodeURIComponent(r); else bodyInput.focus();
  });

  // -- sending --

  // Drop what the server refuses and nobody can see: control characters (a text keeps tab
  // and line breaks), lone surrogates, and in names line separators and direction overrides.
  // By code point, since this script has no backslashes for a regular expression.
  function clean(text, isName) {
    return Array.from(text).filter((ch) => {
      const c = ch.codePointAt(0);
      if (c >= 0xD800 && c <= 0xDFFF) return false;
      if (c < 32 || (c >= 0x7F && c <= 0x9F)) return !isName && (c === 9 || c === 10);
      return !isName || !(c === 0x2028 || c === 0x2029 || (c >= 0x202A && c <= 0x202E) || (c >= 0x2066 && c <= 0x2069));
    }).join('');
  }
  function authorName() {
    const name = clean(nameInput.value, true).trim();
    return MAX_AUTHOR ? Array.from(name).slice(0, MAX_AUTHOR).join('').trim() : name;
  }
  // The request body exactly as it is sent: the server's limit is on its UTF-8 bytes.
  function payload(text) {
    const p = { body: clean(text, false) }, author = me ? '' : authorName();
    if (author) p.author = author;
    p.client = client;
    return JSON.stringify(p);
  }
  function updateCounter() {
    if (!MAX_BODY) return;
    const left = MAX_BODY - utf8.encode(payload(bodyInput.value)).length;
    counter.hidden = left > MAX_BODY * (1 - COUNTER_FROM);
    counter.textContent = left < 0 ? -left + ' over the limit' : left + ' left';
    counter.classList.toggle('over', left < 0);
  }
  // Grow the box with its text, up to its CSS max-height (then it scrolls).
  function fitBox() {
    bodyInput.style.height = '';
    if (bodyInput.scrollHeight > bodyInput.clientHeight) {
      bodyInput.style.height = bodyInput.scrollHeight + bodyInput.offsetHeight - bodyInput.clientHeight + 'px';
    }
  }
  function showOwn(li) {
    if (li === list.lastElementChild) scrollToBottom(); else li.scrollIntoView({ block: 'nearest' });
  }

  function sendError(res, timedOut) {
    if (timedOut) return 'No answer from the server: the message may not have been sent.';
    if (!res) return "Not sent: can't reach the server. Check your connection, then try again.";
    const wait = Number(res.headers.get('Retry-After'));
    const again = wait > 0 ? ' Try again in ' + wait + (wait === 1 ? ' second.' : ' seconds.') : ' Try again in a moment.';
    switch (res.status) {
      case 400: return 'Not sent: the server did not accept this message.';
      case 403: return 'Not sent: the chat server does not take messages from this page’s address.';
      case 413: return 'Not sent: the message is too long. Shorten it, then try again.';
      case 421: return 'Not sent: the chat server does not accept this web address.';
      case 429: return 'Not sent: you are sending messages too quickly.' + again;
      case 503: return 'Not sent: the server is busy and could not take the message.' + again;
      default: return 'Not sent: the server had a problem (error ' + res.status + ').' + again;
    }
  }

  async function send() {
    if (sending) return;  // one post at a time: Enter pressed again meanwhile does nothing
    const text = bodyInput.value, target = room;
    if (!text.trim()) { bodyInput.focus(); return; }
    const json = payload(text);
    if (MAX_BODY && utf8.encode(json).length > MAX_BODY) {
      say('This message is too long to send. Shorten it until the counter says how many are left.');
      return;
    }
    const withToken = !!saved.get('token'), abort = new AbortController();
    let res = null, data = null, timedOut = false;
    const timer = setTimeout(() => { timedOut = true; abort.abort(); }, 30000);
    sending = true;
    sendButton.classList.add('busy');
    sendForm.setAttribute('aria-busy', 'true');
    try {
      res = await fetch(roomUrl(target), {
        method: 'POST', headers: headers({ 'Content-Type': 'application/json' }), body: json, signal: abort.signal
      });
      data = await res.json().catch(() => null);
    } catch (e) { res = null; }
    clearTimeout(timer);
    sending = false;
    sendButton.classList.remove('busy');
    sendForm.removeAttribute('aria-busy');
    if (res && res.status === 201 && data && typeof data.id === 'string') {
      pendingSend = false;
      say('');
      learnTag(data.client);
      if (bodyInput.value === text) {
        bodyInput.value = '';
        fitBox();
        updateCounter();
      }
      if (target === room) {
        add(data);  // the poll brings it too; add() ignores the second copy
        showEmpty();
        if (byId.has(data.id)) showOwn(byId.get(data.id));
      }
      bodyInput.focus();
      return;
    }
    if (res && res.status === 401) {
      askToken(withToken);
      say('Enter the access token, then send the message again.');
      return;
    }
    pendingSend = true;
    say(sendError(res, timedOut), send);
    bodyInput.focus();
  }

  function showHint() {
    hint.textContent = touch.matches ? 'Send with the button; Enter adds a line' : 'Enter sends, Shift+Enter adds a line';
    bodyInput.enterKeyHint = touch.matches ? 'enter' : 'send';
  }
  sendForm.addEventListener('submit', (e) => { e.preventDefault(); send(); });
  bodyInput.addEventListener('keydown', (e) => {
    // With a touch screen as the main pointer, Enter adds a line (phone keyboards have no
    // Shift+Enter) and the Send button sends. keyCode 229: Safari's Enter that ends an IME
    // composition, which it does not flag as isComposing.
    if (e.key !== 'Enter' || e.shiftKey || e.isComposing || e.keyCode === 229 || touch.matches) return;
    e.preventDefault();
    send();
  });
  bodyInput.addEventListener('input', () => { fitBox(); updateCounter(); });
  // A press on Send leaves the focus (and a phone's keyboard) in the message box.
  sendButton.addEventListener('mousedown', (e) => e.preventDefault());
  touch.addEventListener('change', showHint);

  if (MAX_AUTHOR) nameInput.maxLength = MAX_AUTHOR;
  nameInput.value = Array.from(saved.get('name')).slice(0, MAX_AUTHOR || undefined).join('');
  nameInput.addEventListener('input', () => { saved.set('name', nameInput.value.trim()); updateCounter(); });

  document.addEventListener('visibilitychange', () => {
    // A hidden tab keeps following the room (its polls just wait longer); being seen clears
    // the unread count, and ends a wait for a network that is back.
    if (document.visibilityState === 'hidden') return;
    unread = 0;
    updateTitle();
    if (state === 'offline') start();
  });
  // A parked long poll would not notice a lost network for minutes: start over at once.
  window.addEventListener('offline', () => { if (tokenForm.hidden) start(); });
  window.addEventListener('online', () => { if (state === 'offline') start(); });

  showHint();
  showNotifyButton();
  updateCounter();
  openRoom();
  loadRooms();
}());
</script>
</body>
</html>
"""


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def make_server(host=DEFAULT_HOST, port=DEFAULT_PORT, **options):
    """A ChatServer listening on (host, port), with the command line's defaults; options are
    Config's (db="chat.db" unless given; ":memory:" keeps nothing on disk).  Serve it with
    start() (a thread) or serve_forever(); end it with stop() or shutdown() and server_close()."""
    options.setdefault("db", DEFAULT_DB)
    config = Config(host=host, port=port, **options)
    database = None if config.db in (None, ":memory:") else Database(config.db)
    store = MessageStore(config.history, config.max_rooms, database, config.memory_bytes)
    try:
        return ChatServer((host, port), config, store)
    except BaseException:
        store.close()
        raise


def raise_open_files_limit():
    """Raise this process's open-files limit to its hard limit; return the limit in force."""
    if resource is None:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return None if soft == resource.RLIM_INFINITY else soft


def _stop_on_sigterm(signum, frame):
    raise KeyboardInterrupt


def size_futex_hash(slots=FUTEX_HASH_SLOTS):
    """Give this process a futex hash sized for thousands of threads (Linux 6.16+); the slots
    in force, or None where the kernel has no private futex hash (nothing to do there).

    Must run before a second thread exists.
    """
    if not sys.platform.startswith("linux") or ctypes is None:
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        PR_FUTEX_HASH, SET_SLOTS, GET_SLOTS = 78, 1, 2
        if libc.prctl(PR_FUTEX_HASH, SET_SLOTS, slots, 0, 0) != 0:
            return None     # EINVAL: an older kernel, with one global hash
        return libc.prctl(PR_FUTEX_HASH, GET_SLOTS, 0, 0, 0)
    except (OSError, AttributeError, TypeError):
        return None


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line: the flag, what it must be, exit status 2."""

    def error(self, message):
        self.exit(2, "%s: error: %s (see --help)\n" % (self.prog, message))


def _checked(check, kind=str):
    """An argparse type that converts with `kind`, then checks with `check(value)`."""
    def convert(text):
        try:
            return check(kind(text))
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc).replace("\n", " ")) from None
    return convert


def _in_range(name):
    low = OPTION_RANGES[name][0]
    kind = int if isinstance(low, int) else float

    def convert(text):
        try:
            value = kind(text)
        except ValueError:
            value = text     # check_range says what it must be
        return check_range(name, value)
    return _checked(convert)


def build_parser():
    parser = _Parser(
        prog="chat_server.py", description=__doc__.splitlines()[0],
        epilog="Commands: 'chat_server.py backup --help', 'chat_server.py token --help'.  Environment: "
               "CHAT_TOKEN sets --token and CHAT_JWT_SECRET the signing secret without showing them in the "
               "process list.")
    add = parser.add_argument
    add("--version", action="version", version="chat_server.py %s" % __version__)
    add("--host", default=DEFAULT_HOST, help="address to listen on (default: %(default)s)")
    add("--port", type=_in_range("port"), default=DEFAULT_PORT,
        help="port, 0 to 65535; 0 picks a free one (default: %(default)s)")
    add("--db", default=DEFAULT_DB, metavar="PATH",
        help="SQLite file for the history, or :memory: to keep nothing on disk (default: %(default)s)")
    add("--quiet", action="store_true", help="do not log each request to stderr")
    add("--max-timeout", type=_in_range("max_timeout"), default=MAX_TIMEOUT_S, metavar="SECONDS",
        help="longest long-poll wait a client may ask for, 1 to 3600 (default: %(default)s)")
    add("--history", type=_in_range("history"), default=HISTORY_PER_ROOM, metavar="N",
        help="messages of each room kept in memory; with :memory: the whole history (default: %(default)s)")
    add("--memory-mib", type=_in_range("memory_mib"), default=MEMORY_MIB, metavar="MIB",
        help="MiB of messages kept in memory across all rooms; the oldest leave first (default: %(default)s)")
    add("--max-rooms", type=_in_range("max_rooms"), default=MAX_ROOMS, metavar="N",
        help="rooms with messages at most (default: %(default)s)")
    add("--retain-count", type=_in_range("retain_count"), default=0, metavar="N",
        help="messages of each room kept in the database; 0 keeps all (default: %(default)s)")
    add("--retain-days", type=_in_range("retain_days"), default=0, metavar="DAYS",
        help="delete messages older than this from the database; 0 keeps all (default: %(default)s)")
    add("--max-waiters", type=_in_range("max_waiters"), default=MAX_WAITERS, metavar="N",
        help="long polls and event streams waiting at once; more get 503 (default: %(default)s)")
    add("--max-connections", type=_in_range("max_connections"), default=MAX_CONNECTIONS, metavar="N",
        help="open connections at once, further capped by the open-files limit (default: %(default)s)")
    add("--request-timeout", type=_in_range("request_timeout"), default=REQUEST_TIMEOUT_S, metavar="SECONDS",
        help="time for a request to arrive once it has started (default: %(default)s)")
    add("--idle-timeout", type=_in_range("idle_timeout"), default=IDLE_TIMEOUT_S, metavar="SECONDS",
        help="close keep-alive connections idle this long, and clients that do not read "
             "their answer for this long (default: %(default)s)")
    add("--rate", type=_in_range("rate"), default=0.0, metavar="PER_SECOND",
        help="posts per second allowed per client address; 0 for no limit (default: %(default)s)")
    add("--burst", type=_in_range("burst"), default=0, metavar="N",
        help="posts a client may make at once before --rate applies (default: twice the rate)")
    add("--trust-proxy", action="store_true",
        help="take the client address from X-Forwarded-For (only behind a proxy you run)")
    add("--allow-host", action="append", default=[], type=_checked(check_allowed_host), metavar="NAME",
        dest="allow_hosts",
        help="also answer requests for this host name (a proxy's public name, a LAN name), on any "
             "port; repeatable; * answers any (default: loopback names only, when listening on loopback)")
    add("--token", default=os.environ.get("CHAT_TOKEN"), type=_checked(check_token), metavar="SECRET",
        help="require 'Authorization: Bearer SECRET' on the API (default: $CHAT_TOKEN, else none)")
    add("--cors-origin", type=_checked(check_origin_option), metavar="ORIGIN",
        help="let pages from ORIGIN (https://host[:port]) call the API (default: none)")
    add("--jwt-secret-file", type=_checked(load_jwt_secret), dest="jwt_secret", metavar="PATH",
        help="accept tokens (JWT, HS256) signed with the bytes of this file, at least %d; they name "
             "their user and rooms (default: $CHAT_JWT_SECRET, else none)" % MIN_JWT_SECRET_BYTES)
    add("--user-header", type=_checked(check_header_name), metavar="NAME",
        help="take the user from this header (X-Remote-User), set by an authenticating proxy on this "
             "machine; from any other address it is ignored (default: none)")
    add("--proxy-address", action="append", dest="proxy_addresses", type=_checked(check_network), metavar="CIDR",
        help="where the proxy that sets --user-header connects from: an address or network (repeatable; "
             "default: loopback, 127.0.0.0/8 and ::1)")
    add("--anonymous-rooms", action="append", default=[], metavar="PATTERN",
        help="with tokens or --user-header: rooms that clients without either may read and post in, a "
             "name or a prefix ending in * (repeatable; default: none)")
    add("--edge-cache", type=_in_range("edge_cache"), default=0, metavar="SECONDS",
        help="let a shared cache in front (an edge: see the README) keep a poll's answer of messages in "
             "rooms anyone may read for this long, with an ETag; 0 keeps every answer no-store (default: %(default)s)")
    add("--import-room", metavar="ROOM",
        help="copy room ROOM's history from the --from file into --db, then exit (both servers stopped)")
    add("--from", dest="from_db", metavar="PATH", help="the database file --import-room reads")
    return parser


def main(argv=None):
    """Run the server until Ctrl-C or SIGTERM (or a command: see COMMANDS); return the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS:
        return COMMANDS[argv[0]](argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.jwt_secret is None and os.environ.get("CHAT_JWT_SECRET"):
            args.jwt_secret = check_jwt_secret(os.environ["CHAT_JWT_SECRET"].encode("utf-8"))
        args.anonymous_rooms = check_room_patterns(args.anonymous_rooms, "an --anonymous-rooms pattern")
        args.proxy_addresses = args.proxy_addresses or Config.proxy_addresses
    except ValueError as exc:
        parser.error(str(exc))
    if args.import_room is not None or args.from_db is not None:
        return import_room(parser, args)
    if args.db != ":memory:" and sqlite3 is None:
        if args.db != DEFAULT_DB:
            print("chat_server: --db %s needs the sqlite3 module, which this Python lacks" % args.db,
                  file=sys.stderr)
            return 1
        print("chat_server: warning: no sqlite3 module; messages are kept in memory only", file=sys.stderr)
        args.db = ":memory:"
    open_files = raise_open_files_limit()
    max_connections = args.max_connections
    if open_files:
        max_connections = max(1, min(max_connections, open_files - FD_RESERVE))
    threading.stack_size(THREAD_STACK_BYTES)
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    size_futex_hash()
    options = dict(vars(args))
    for name in ("host", "port", "import_room", "from_db"):
        del options[name]
    options["max_connections"] = max_connections
    options["max_waiters"] = min(args.max_waiters, max_connections)
    try:
        server = make_server(args.host, args.port, **options)
    except StorageError as exc:
        print("chat_server: cannot use database %s: %s" % (args.db, exc), file=sys.stderr)
        return 1
    except OSError as exc:
        print("chat_server: cannot listen on %s:%s: %s" % (args.host, args.port, exc.strerror or exc),
              file=sys.stderr)
        return 1
    host, port = server.server_address[:2]
    url_host = "[%s]" % host if ":" in host else host
    where = "in memory" if args.db == ":memory:" else "in " + args.db
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    print("chat_server: serving on http://%s:%d/ with messages %s (Ctrl-C to quit)" % (url_host, port, where),
          flush=True)
    for warning in _start_up_warnings(host, server.policy, args.token, server.store.database, args.db):
        print("chat_server: warning: %s" % warning, file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def _start_up_warnings(host, policy, token, database, db_name):
    """What the operator should know about the configuration, one sentence each."""
    if not is_loopback_name(host if ":" not in host else "[%s]" % host):
        if not token:
            yield "listening on %s without --token: anyone who can reach it can read and post" % host
    if policy.any_host:
        yield ("answering requests for any Host name, so a web page can reach this server through DNS "
               "rebinding; name the server's host names with --allow-host NAME to refuse the others")
    if token and len(token) < 16:
        yield "the --token is shorter than 16 characters; a long random one is safer"
    if database is not None and database.unwritable:
        yield ("%s cannot be written (%s): serving what it holds; posts get 503 until a write succeeds"
               % (db_name, database.unwritable))


def import_room(parser, args):
    """--import-room ROOM --from OLD --db NEW: copy a room's history, ids and floor included."""
    if not args.import_room or not args.from_db:
        parser.error("--import-room ROOM and --from PATH go together")
    if not ROOM_NAME.match(args.import_room):
        parser.error("argument --import-room: %r is not a room name" % args.import_room)
    if args.db == ":memory:":
        parser.error("argument --db: --import-room writes to a database file, not :memory:")
    try:
        database = Database(args.db)
    except StorageError as exc:
        print("chat_server: cannot use database %s: %s" % (args.db, exc), file=sys.stderr)
        return 1
    try:
        count, first, last = database.import_room(args.from_db, args.import_room)
    except StorageError as exc:
        print("chat_server: cannot import room %r: %s" % (args.import_room, exc), file=sys.stderr)
        return 1
    finally:
        database.close()
    print("chat_server: imported room %r from %s into %s: %d messages%s, with their ids"
          % (args.import_room, args.from_db, args.db, count, " (%s to %s)" % (first, last) if count else ""))
    return 0


def backup_command(argv):
    """python3 chat_server.py backup [--db PATH] OUT: an online backup of a server's database."""
    parser = _Parser(prog="chat_server.py backup",
                     description="Copy the database to OUT while the server runs (written to OUT.partial, "
                                 "then renamed). Restore: stop the server, put OUT in the database's place "
                                 "(or start the server with --db OUT).")
    parser.add_argument("--db", default=DEFAULT_DB, metavar="PATH",
                        help="the server's database file (default: %(default)s)")
    parser.add_argument("out", metavar="OUT", help="the file to write the backup to")
    args = parser.parse_args(argv)
    try:
        summary = backup_database(args.db, args.out)
    except (StorageError, OSError) as exc:
        print("chat_server: cannot back up %s to %s: %s" % (args.db, args.out, exc), file=sys.stderr)
        return 1
    print("chat_server: backed up %s to %s: %d messages in %d rooms, newest %s, %d bytes"
          % (args.db, args.out, summary["messages"], summary["rooms"], summary["newest"], summary["bytes"]))
    return 0


#: Lifetimes of minted tokens: a number and a unit.
_LIFETIME = re.compile(r"([0-9]{1,9})([smhd])\Z")
_LIFETIME_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _lifetime(text):
    match = _LIFETIME.match(text)
    if not match or not int(match.group(1)):
        raise ValueError("a lifetime is a whole number and a unit: 3600s, 90m, 12h, 30d")
    return int(match.group(1)) * _LIFETIME_UNITS[match.group(2)]


def token_command(argv):
    """python3 chat_server.py token --sub ID ...: print a signed token for a user."""
    parser = _Parser(prog="chat_server.py token",
                     description="Print a token (JWT, HS256) signed with the server's secret, for a sign-in "
                                 "link (http://host/#token=...) or an Authorization: Bearer header.",
                     epilog="The secret: --jwt-secret-file, else $CHAT_JWT_SECRET, as for the server.")
    add = parser.add_argument
    add("--jwt-secret-file", type=_checked(load_jwt_secret), dest="secret", metavar="PATH",
        help="the server's secret file (default: $CHAT_JWT_SECRET)")
    add("--sub", required=True, type=_checked(check_user_id), metavar="ID", help="the user's id (1 to 64 visible characters)")
    add("--name", metavar="NAME", help="the name shown on the user's posts (default: the id)")
    add("--read", action="append", metavar="PATTERN",
        help="rooms the user may read: a name or a prefix ending in * (repeatable; default: every room)")
    add("--post", action="append", metavar="PATTERN",
        help="rooms the user may post in (repeatable; default: every room)")
    add("--admin", action="store_true", help="may read /stats and /metrics, and moderate")
    add("--expires", type=_checked(_lifetime), default="30d", metavar="LIFETIME",
        help="how long the token is valid: 3600s, 90m, 12h, 30d (default: %(default)s)")
    args = parser.parse_args(argv)
    secret = args.secret
    if secret is None:
        if not os.environ.get("CHAT_JWT_SECRET"):
            parser.error("give --jwt-secret-file PATH (or set CHAT_JWT_SECRET)")
        try:
            secret = check_jwt_secret(os.environ["CHAT_JWT_SECRET"].encode("utf-8"))
        except ValueError as exc:
            parser.error("CHAT_JWT_SECRET: %s" % exc)
    now = int(time.time())
    claims = {"sub": args.sub, "iat": now, "exp": now + args.expires}
    if args.name is not None:
        claims["name"] = args.name
    rooms = {}
    try:
        for action in ("read", "post"):
            if getattr(args, action) is not None:
                rooms[action] = list(check_room_patterns(getattr(args, action), "a --%s pattern" % action))
        # The server checks the name as it checks every claim: refuse here what it would refuse.
        TokenVerifier._identity(dict(claims, rooms=rooms), now)
    except (ValueError, TokenError) as exc:
        parser.error(str(exc))
    if rooms:
        claims["rooms"] = rooms
    if args.admin:
        claims["admin"] = True
    print(mint_token(secret, claims))
    return 0


# ---------------------------------------------------------------------------
# Client
# ---------------------------------------------------------------------------

#: Client.follow() and the follow command: the wait each poll asks of the server, and the
#: pause between retries when the server cannot be reached (doubled each time from the
#: first to the longest, each with up to half again of random jitter).
FOLLOW_TIMEOUT_S = 25.0
RETRY_FIRST_S, RETRY_LONGEST_S = 1.0, 30.0


class ClientError(Exception):
    """An answer that asking again cannot change (401, 403, 404, ...): its status and the server's words."""

    def __init__(self, status, message):
        super().__init__("%s (HTTP %d)" % (message, status))
        self.status = status


class Client:
    """A client of a chat server, for programs and scripts: post() and follow().

    `url` is the server (http://host:8080/, also under a proxy's path prefix) or a room's
    messages (http://host:8080/rooms/lobby/messages); `room` names the room instead.
    `token` is sent as Authorization: Bearer (default: $CHAT_TOKEN).  `log(text)` hears
    about retries and missed messages (default: stderr).
    """

    def __init__(self, url, room=None, token=None, log=None):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("%r is not an http:// or https:// URL" % url)
        path = parts.path
        match = re.search(r"/(?:rooms/([^/]+)/)?messages/?\Z", path)
        if match:
            path = path[:match.start() + 1]
            url_room = urllib.parse.unquote(match.group(1)) if match.group(1) else DEFAULT_ROOM
            room = room or url_room
        room = room or DEFAULT_ROOM
        if not ROOM_NAME.match(room):
            raise ValueError("%r is not a room name" % room)
        self.room = room
        self.base = "%s://%s%s" % (parts.scheme, parts.netloc, path if path.endswith("/") else path + "/")
        self.url = self.base + "rooms/%s/messages" % urllib.parse.quote(room)
        self.token = token if token is not None else os.environ.get("CHAT_TOKEN")
        self.log = log or (lambda text: sys.stderr.write("chat_server: %s\n" % text))
        self._connection = None

    def post(self, body, author=None):
        """Post `body` (as `author`); return the stored message.  ClientError for a refusal,
        OSError if the server cannot be reached."""
        payload = {"body": body}
        if author is not None:
            payload["author"] = author
        status, data, _ = self._request("POST", self.url, json_bytes(payload))
        if status != HTTPStatus.CREATED:
            raise ClientError(status, self._error_of(data))
        return data

    def follow(self, after=None, tail=None, timeout=FOLLOW_TIMEOUT_S):
        """Yield each message of the room once, in order, for ever: those after the id
        `after`; else the newest `tail` first; else from now on.

        Waits out a server that is down, restarting or busy (retrying, with jittered
        backoff); after a 410 (messages after the cursor were removed before they were
        read) it says so and goes on from the oldest kept.  ClientError for what
        retrying cannot fix, such as 401, 403, 404, or a cursor this server never issued.
        """
        cursor = after
        if cursor is None:
            newest = self._get("tail=%d&timeout=0" % (tail or 1), timeout)     # never waits
            if tail:
                for message in newest:
                    cursor = message["id"]
                    yield message
            elif newest:
                cursor = newest[-1]["id"]
        while True:
            query = "timeout=%g&limit=%d" % (timeout, MAX_LIMIT) + ("&after=%s" % cursor if cursor else "")
            try:
                messages = self._get(query, timeout)
            except _CursorRemoved as removed:
                self.log("messages after %s are no longer kept by the server and were missed for good "
                         "(the oldest it keeps is %s); going on from there" % (cursor, removed.oldest))
                cursor = None
                continue
            for message in messages:
                cursor = message["id"]
                yield message

    def close(self):
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    # -- HTTP --

    def _get(self, query, timeout):
        """The answer to GET url?query, waiting out what retrying can fix."""
        delay = RETRY_FIRST_S
        while True:
            try:
                status, data, headers = self._request("GET", "%s?%s" % (self.url, query), timeout=timeout + 15)
            except OSError as exc:
                problem, wait = "cannot reach %s (%s)" % (self.base, exc), None
            else:
                if status == HTTPStatus.OK and isinstance(data, list):
                    return data
                if status == HTTPStatus.GONE:
                    raise _CursorRemoved(data.get("oldest") if isinstance(data, dict) else None)
                if status < 500 and status not in (HTTPStatus.REQUEST_TIMEOUT, HTTPStatus.TOO_MANY_REQUESTS):
                    if isinstance(data, dict) and "latest" in data:
                        raise ClientError(status, "the cursor %s is newer than anything this server has issued: "
                                          "is it another server's, or was the server restarted without its "
                                          "database?" % query.rpartition("after=")[2])
                    raise ClientError(status, self._error_of(data))
                problem = "the server answered %d (%s)" % (status, self._error_of(data))
                wait = _seconds(headers.get("Retry-After"))
            pause = max(wait or 0, delay * (1 + random.random() / 2))
            self.log("%s; retrying in %.1f s" % (problem, pause))
            time.sleep(pause)
            delay = min(RETRY_LONGEST_S, delay * 2)

    def _request(self, method, url, body=None, timeout=30.0):
        parts = urllib.parse.urlsplit(url)
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = "Bearer " + self.token
        for attempt in (1, 2):
            if self._connection is None:
                kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
                self._connection = kind(parts.netloc, timeout=timeout)
            self._connection.timeout = timeout
            if self._connection.sock is not None:
                self._connection.sock.settimeout(timeout)
            try:
                self._connection.request(method, parts.path + ("?" + parts.query if parts.query else ""), body, headers)
                response = self._connection.getresponse()
                raw = response.read()
            except (http.client.HTTPException, OSError) as exc:
                self.close()
                # A kept-alive connection the server closed meanwhile: once more on a new one.
                if attempt == 1 and isinstance(exc, (http.client.RemoteDisconnected, ConnectionResetError,
                                                     BrokenPipeError)):
                    continue
                raise OSError(str(exc) or type(exc).__name__) from None
            if response.will_close:
                self.close()
            try:
                data = json.loads(raw.decode("utf-8")) if raw else None
            except ValueError:
                data = None
            return response.status, data, response.headers

    @staticmethod
    def _error_of(data):
        return data.get("error", "no explanation") if isinstance(data, dict) else "an answer that is not JSON"


class _CursorRemoved(Exception):
    def __init__(self, oldest):
        super().__init__(oldest)
        self.oldest = oldest


def _seconds(text):
    return float(text) if text and _INTEGER.match(text) else None


def follow_command(argv):
    """python3 chat_server.py follow URL: print each message of a room once, for ever."""
    parser = _Parser(prog="chat_server.py follow",
                     description="Follow a room with long polls and print each message once, in order, as "
                                 "'author: body' lines (or JSON lines with --json). Retries while the server is "
                                 "down. Exit status: 0 after Ctrl-C, 1 for what retrying cannot fix (401, 403, "
                                 "404, a bad state file), 2 for a usage error.",
                     epilog="Environment: CHAT_TOKEN is sent as 'Authorization: Bearer'. --exec runs CMD with "
                            "CHAT_ID, CHAT_ROOM, CHAT_AUTHOR, CHAT_USER, CHAT_BODY and CHAT_CREATED_AT set, "
                            "never through a shell.")
    add = parser.add_argument
    add("url", metavar="URL", help="the server (http://127.0.0.1:8080/) or a room's URL")
    add("--room", metavar="ROOM", help="the room (default: the URL's, else 'default')")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--tail", type=_checked(int), metavar="N", help="print the newest N messages first")
    start.add_argument("--since", metavar="ID", help="start after the message with this id")
    add("--state", metavar="FILE",
        help="keep the cursor in FILE, written after each message, so a later run goes on from there")
    add("--json", action="store_true", help="print each message as one JSON object per line")
    add("--exec", nargs=argparse.REMAINDER, metavar="CMD", dest="command",
        help="run CMD ARGS... for each message instead of printing it (must come last)")
    args = parser.parse_args(argv)
    if args.tail is not None and not 1 <= args.tail <= MAX_LIMIT:
        parser.error("argument --tail: from 1 to %d" % MAX_LIMIT)
    if args.command == []:
        parser.error("argument --exec: name the program to run")
    try:
        client = Client(args.url, args.room)
        since = parse_cursor(args.since) if args.since else None
    except ValueError as exc:
        parser.error(str(exc))
    try:
        state = _read_state(args.state, client.room) if args.state else None
    except ValueError as exc:
        print("chat_server: %s" % exc, file=sys.stderr)
        return 1
    try:
        for message in client.follow(after=state or since, tail=None if state else args.tail):
            if args.command:
                _run_for(args.command, message)
            elif args.json:
                print(JSON_ENCODER.encode(message), flush=True)
            else:
                print(_as_line(message), flush=True)
            if args.state:
                _write_state(args.state, client.room, message["id"])
    except ClientError as exc:
        print("chat_server: %s: %s" % (client.url, exc), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        client.close()


def _as_line(message):
    """A message as the follow command prints it: 'author: body', and what edits and deletes do."""
    who = message.get("author") or "anonymous"
    if message.get("deleted"):
        return "(a deleted message)"
    if message.get("deletes"):
        return "%s deleted message %s" % (who, message["deletes"])
    if message.get("edits"):
        return "%s edited message %s: %s" % (who, message["edits"], message.get("body"))
    return "%s: %s" % (who, message.get("body"))


def _read_state(path, room):
    """The cursor kept in the state file at `path` (None if there is none yet); ValueError if
    the file is not one, or is another room's.  (A cursor from another server is refused by
    that server, which never issued it; the same server on a new address goes on from it.)"""
    try:
        with open(path, encoding="utf-8") as state_file:
            state = json.load(state_file)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ValueError("cannot use the state file %s: %s; remove it to start over" % (path, exc)) from None
    if not isinstance(state, dict) or not isinstance(state.get("after"), str) or not _UUID_TEXT.match(state["after"]):
        raise ValueError("%s is not a follow state file (no cursor in it); remove it to start over" % path)
    if state.get("room") != room:
        raise ValueError("the state file %s follows room %r, not %r; give another file, or remove it to start over"
                         % (path, state.get("room"), room))
    return state["after"]


def _write_state(path, room, after):
    partial = path + ".partial"
    with open(partial, "w", encoding="utf-8") as state_file:
        json.dump({"room": room, "after": after}, state_file)
        state_file.flush()
        os.fsync(state_file.fileno())
    os.replace(partial, path)


def _run_for(command, message):
    # The message goes in the environment, never into a command line a shell would read.
    env = dict(os.environ, CHAT_ID=message["id"], CHAT_ROOM=message.get("room") or "",
               CHAT_AUTHOR=message.get("author") or "", CHAT_USER=message.get("user") or "",
               CHAT_BODY=message.get("body") or "", CHAT_CREATED_AT=message.get("created_at") or "")
    try:
        status = subprocess.run(command, env=env).returncode
    except OSError as exc:
        raise ClientError(0, "cannot run %s: %s" % (command[0], exc.strerror or exc)) from None
    if status:
        sys.stderr.write("chat_server: %s exited with %d for message %s\n" % (command[0], status, message["id"]))


def post_command(argv):
    """python3 chat_server.py post URL [MESSAGE | -]: post one message, print its id."""
    parser = _Parser(prog="chat_server.py post",
                     description="Post a message and print its id. Exit status: 0 when stored, 1 when refused "
                                 "(the server's reason on stderr) or the server cannot be reached, 2 for a usage "
                                 "error.",
                     epilog="Environment: CHAT_TOKEN is sent as 'Authorization: Bearer'.")
    parser.add_argument("url", metavar="URL", help="the server (http://127.0.0.1:8080/) or a room's URL")
    parser.add_argument("message", nargs="?", default="-", metavar="MESSAGE",
                        help="the text, or - to read it from standard input (default: -)")
    parser.add_argument("--room", metavar="ROOM", help="the room (default: the URL's, else 'default')")
    parser.add_argument("--author", metavar="NAME", help="the name to post as")
    args = parser.parse_intermixed_args(argv)
    try:
        client = Client(args.url, args.room)
    except ValueError as exc:
        parser.error(str(exc))
    body = sys.stdin.read().rstrip("\n") if args.message == "-" else args.message
    try:
        print(client.post(body, args.author)["id"])
    except ClientError as exc:
        print("chat_server: not posted: %s" % exc, file=sys.stderr)
        return 1
    except OSError as exc:
        print("chat_server: not posted: cannot reach %s: %s" % (client.base, exc), file=sys.stderr)
        return 1
    finally:
        client.close()
    return 0



#: Commands given as the first argument (see main()), each a function of the arguments after it.
COMMANDS = {"backup": backup_command, "token": token_command, "follow": follow_command, "post": post_command}

if __name__ == "__main__":
    sys.exit(main())
