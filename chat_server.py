#!/usr/bin/env python3
"""A long-polling chat server in one file, using only the Python standard library.

Copy this file anywhere and run ``python chat_server.py``; talk to it with curl or
open http://127.0.0.1:8080/ in a browser.  The API is the one of the blog post "How
to implement HTTP Long Polling in Go": ``POST /messages`` with ``{"body": "..."}``
and ``GET /messages?after=<id>``, which waits until a newer message exists and
answers ``[]`` when its timeout passes.  Unlike the post, ``after`` is honoured, ids
are time-ordered UUIDs (version 7 layout) so "newer" is a plain comparison, and
waiters sleep on a ``threading.Event`` instead of polling.

How the pieces fit (in the order data flows through this file):

    Configuration   constants and the Config object behind the command-line flags
    Message store   ids, messages, rooms; optional SQLite file behind it (group commit)
    Waiter registry parked GETs, one Event each; a post writes the shared answer to
                    every parked socket itself, then sets the Events
    Housekeeper     one thread: notices parked clients that hang up, prunes history
    HTTP server     ThreadingHTTPServer whose connection threads are reused
    HTTP handler    routing, body parsing, limits, errors as JSON
    Web page        the chat page served at /
    Command line    main()

Exactly one party answers each parked GET: whoever removes it from the registry (a
post, its own timeout, the housekeeper when the client hangs up, or shutdown).
"""

import argparse
import base64
import bisect
import collections
import email.utils
import errno
import hashlib
import hmac
import io
import json
import math
import os
import random
import re
import selectors
import signal
import socket
import sys
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

__version__ = "1.0"
__all__ = ["ChatServer", "ChatHandler", "Config", "MessageStore", "Database", "make_server", "main"]


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_DB = "chat.db"
DEFAULT_ROOM = "default"

#: Largest request body, in bytes (the seed's 10,000); larger ones get 413 before being read.
MAX_BODY_BYTES = 10000
#: Longest author name, in characters.
MAX_AUTHOR_CHARS = 64
#: Deepest JSON nesting accepted in a request body.
MAX_JSON_DEPTH = 16
#: Long-poll wait when the request names none, and the most a request may ask for (seconds).
DEFAULT_TIMEOUT_S = 10.0
MAX_TIMEOUT_S = 60.0
#: Waits are shortened by up to this fraction (at most 1 s) so clients polling in lockstep spread out.
TIMEOUT_JITTER = 0.1
#: Messages per answer when the request names no limit, and the most it may ask for.
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
#: Messages of each room held in memory (with no database, that is all the history there is).
HISTORY_PER_ROOM = 1000
#: Rooms that may exist at once; a post that would open one more gets 503.
MAX_ROOMS = 100
#: Parked GETs at once; past it, a GET that would wait gets 503 with Retry-After.
MAX_WAITERS = 12000
#: Open connections at once; also capped by the open-files limit less FD_RESERVE.
MAX_CONNECTIONS = 15000
FD_RESERVE = 64
#: A request's line, headers and body must all arrive within this many seconds of its first byte.
REQUEST_TIMEOUT_S = 10.0
#: A keep-alive connection with no request for this many seconds is closed.
IDLE_TIMEOUT_S = 30.0
#: Seconds a client is told to wait (Retry-After) when the server is full.
RETRY_AFTER_S = 1
#: Threads kept for reuse exit after this long idle (plus up to half again, so they leave spread out).
THREAD_IDLE_S = 60.0
#: Listen backlog: bursts of thousands of connections must not be dropped (the stdlib's is 5).
LISTEN_BACKLOG = 4096
#: Bytes of read buffer per connection (the stdlib's 8 KiB costs memory for every parked waiter).
READ_BUFFER_BYTES = 512
#: Thread stack size; only touched pages cost memory, this bounds address space per thread.
THREAD_STACK_BYTES = 512 * 1024
#: The housekeeper's tick: new parked sockets are watched for hang-ups from the next tick on.
HOUSEKEEPING_INTERVAL_S = 0.5
#: How often history is pruned when --retain-count or --retain-days is set.
PRUNE_INTERVAL_S = 30.0
#: The GIL switch interval.  Every thread waiting for the GIL wakes once per interval;
#: with thousands woken at once (a fan-out, or clients leaving together) the stdlib's
#: 5 ms made that a storm that stalled the server for over 20 s (bench/bench.py,
#: fanout 10000).  Our threads let go of the GIL at every I/O long before 1 s.
SWITCH_INTERVAL_S = 1.0
#: select() on Windows handles at most 512 sockets; past that, hung-up waiters go at their timeout.
SELECT_WATCH_LIMIT = 500

#: One encoder for every answer: json.dumps() with options builds a new one per call.
JSON_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
STATUS_LINES = {status: "HTTP/1.1 %d %s\r\n" % (status, status.phrase) for status in HTTPStatus}

ROOM_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}\Z")
ZERO_ID = "00000000-0000-0000-0000-000000000000"


class Config:
    """Every tunable of a server, with its default; unknown names fail fast."""

    host = DEFAULT_HOST
    port = DEFAULT_PORT
    db = ":memory:"
    quiet = False
    max_timeout = MAX_TIMEOUT_S
    history = HISTORY_PER_ROOM
    max_rooms = MAX_ROOMS
    retain_count = 0          # 0: keep every message in the database
    retain_days = 0.0         # 0: no age limit
    max_waiters = MAX_WAITERS
    max_connections = MAX_CONNECTIONS
    request_timeout = REQUEST_TIMEOUT_S
    idle_timeout = IDLE_TIMEOUT_S
    rate = 0.0                # posts per second per client address; 0: no limit
    burst = 0                 # posts allowed at once before --rate applies; 0: max(1, 2 x rate)
    trust_proxy = False       # take the client address from X-Forwarded-For
    token = None              # bearer token required on the API
    cors_origin = None        # origin allowed to call the API from a browser

    def __init__(self, **options):
        for name, value in options.items():
            if not hasattr(Config, name) or name.startswith("_"):
                raise TypeError("unknown option %r" % name)
            setattr(self, name, value)
        if self.burst <= 0:
            self.burst = max(1, int(2 * self.rate))


# ---------------------------------------------------------------------------
# Message store
# ---------------------------------------------------------------------------

class HTTPError(Exception):
    """An answer other than success: status, message for the client, extra JSON and headers."""

    def __init__(self, status, message, extra=None, headers=None):
        super().__init__(message)
        self.status = HTTPStatus(status)
        self.message = message
        self.extra = extra or {}
        self.headers = headers or {}


class StorageError(Exception):
    """The database could not be opened or written."""


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
        text = "%032x" % value
        return "%s-%s-%s-%s-%s" % (text[:8], text[8:12], text[12:16], text[16:20], text[20:])


def first_id_at(seconds):
    """The smallest id that the IdClock can issue at time `seconds` (for age cut-offs)."""
    text = "%032x" % ((int(seconds * 1000) << 80) | (0x7 << 76) | (0b10 << 62))
    return "%s-%s-%s-%s-%s" % (text[:8], text[8:12], text[12:16], text[16:20], text[20:])


def parse_cursor(text):
    """The canonical id for `text`, or None for "from the oldest"; HTTPError 400 if malformed."""
    if text is None or text == "":
        return None
    try:
        cursor = str(uuid.UUID(text))
    except ValueError:
        raise HTTPError(400, "'after' must be a message id (a UUID), got %r" % text[:80]) from None
    return None if cursor == ZERO_ID else cursor


def rfc3339(seconds, _cache=[None, ""]):
    """UTC time `seconds` as RFC 3339 with milliseconds, e.g. 2026-11-29T17:26:57.123Z."""
    whole = int(seconds)
    if _cache[0] != whole:      # strftime is a noticeable share of a post; once a second will do
        _cache[:] = [whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))]
    return "%s.%03dZ" % (_cache[1], int(seconds * 1000) % 1000)


class Message:
    """One chat message and its JSON encoding, made once and shared by every answer."""

    __slots__ = ("id", "room", "created_at", "author", "body", "json", "error", "stored")

    def __init__(self, id, room, created_at, author, body):
        self.id, self.room, self.created_at, self.author, self.body = id, room, created_at, author, body
        self.json = JSON_ENCODER.encode(self.as_dict()).encode()
        self.error = None
        self.stored = None      # with a database: an Event set once its commit is over

    def as_dict(self):
        return {"id": self.id, "room": self.room, "created_at": self.created_at,
                "author": self.author, "body": self.body}


class Room:
    """The recent messages of one room, oldest first, and what fell out of memory."""

    __slots__ = ("name", "ids", "messages", "evicted", "gone", "dropped")

    def __init__(self, name, messages=(), gone=None):
        self.name = name
        self.ids = [m.id for m in messages]
        self.messages = list(messages)
        self.evicted = gone     # newest id no longer in memory (it may still be in the database)
        self.gone = gone        # newest id no longer anywhere
        self.dropped = 0        # messages that fell out of memory since start


def encode_list(messages):
    """A JSON array of already-encoded messages."""
    return b"[" + b",".join(m.json for m in messages) + b"]"


class MessageStore:
    """Messages by room, newest `history` of each in memory, optionally backed by a Database.

    Ids are issued under one lock in the order messages become visible.  With a
    database, a message is visible (and a post answered) only once it is committed;
    concurrent posts share one commit.  Readers never touch the disk for recent
    messages, so waking a waiter never waits on it.
    """

    def __init__(self, history=HISTORY_PER_ROOM, max_rooms=MAX_ROOMS, database=None):
        self.history, self.max_rooms, self.database = history, max_rooms, database
        self._lock = threading.Lock()          # rooms, ids, counters
        self._commit_lock = threading.Lock()   # held by the one poster committing for everyone
        self._rooms = {}
        self._pending = []
        self.latest = database.last_id() if database else None
        self._clock = IdClock(self.latest)
        self.posts = 0

    # -- writing --

    def add(self, room, body, author=None):
        """Store a message and return it once it is visible; HTTPError 503 if it cannot be."""
        created_at = rfc3339(time.time())
        with self._lock:
            self._room(room, create=True)
            message = Message(self._clock.next_id(), room, created_at, author, body)
            if self.database is None:
                self._publish([message])
                return message
            message.stored = threading.Event()
            self._pending.append(message)
        self._commit_until_stored(message)
        if message.error:
            raise HTTPError(503, "the message was not stored: %s" % message.error,
                            headers={"Retry-After": str(RETRY_AFTER_S)})
        return message

    def _commit_until_stored(self, message):
        # Group commit.  A poster that finds nobody committing becomes the committer and
        # writes everything queued, batch after batch, one transaction (one fsync) each;
        # the others wait on their own message's Event.  (Waiting for the lock instead
        # would make every poster take it in turn, one wake-up after another.)
        while True:
            if self._commit_lock.acquire(blocking=False):
                try:
                    while True:
                        with self._lock:
                            batch, self._pending = self._pending, []
                        if not batch:
                            break
                        self._commit(batch)
                finally:
                    self._commit_lock.release()
                if not self._pending:
                    return      # ours was queued before we looked, so it is stored
                # A post queued after our last look found the lock taken and is waiting
                # on its Event for us: look again.
            elif message.stored.wait(1.0):  # the timeout is only a safety net
                return

    def _commit(self, batch):
        try:
            self.database.insert(batch)
        except StorageError as exc:
            for message in batch:
                message.error = str(exc)
        else:
            with self._lock:
                self._publish(batch)
        for message in batch:
            message.stored.set()

    def _publish(self, messages):
        for message in messages:
            room = self._rooms.get(message.room) or self._room(message.room, create=True)
            if room.ids and room.ids[-1] >= message.id:
                continue        # already loaded from the database
            room.ids.append(message.id)
            room.messages.append(message)
            self.latest = message.id
            self.posts += 1
        for room in {self._rooms[m.room] for m in messages}:
            excess = len(room.ids) - self.history
            if excess > 0:
                room.evicted = room.ids[excess - 1]
                if self.database is None:
                    room.gone = room.evicted
                room.dropped += excess
                del room.ids[:excess], room.messages[:excess]

    def _room(self, name, create=False):
        # Called with self._lock held.
        room = self._rooms.get(name)
        if room is None and self.database is not None:
            messages, gone = self.database.load_room(name, self.history)
            if messages or gone or create:
                room = Room(name, messages, gone)
                if len(messages) == self.history:
                    room.evicted = self.database.id_before(name, messages[0].id) or gone
        elif room is None and create:
            room = Room(name)
        if room is not None and name not in self._rooms:
            if len(self._rooms) >= self.max_rooms:
                raise HTTPError(503, "this server keeps at most %d rooms (--max-rooms)" % self.max_rooms)
            self._rooms[name] = room
        return room

    # -- reading --

    def newer(self, room_name, after, limit, newest=False):
        """Messages of the room with id > `after` (None: from the oldest kept), oldest first.

        With `newest`, the last `limit` messages of the room instead.  HTTPError 410 if
        messages after `after` are no longer kept; 400 if `after` is newer than any id
        this server has issued.
        """
        with self._lock:
            latest = self.latest
            if after is not None and (latest is None or after > latest):
                raise HTTPError(400, "'after' is newer than any message of this server; "
                                "poll again without it", {"latest": latest})
            room = self._room(room_name)
            if room is None:
                return []
            if after is not None and room.gone is not None and after < room.gone:
                oldest = room.ids[0] if room.ids else None
                if self.database is not None:
                    oldest = self.database.oldest_id(room_name) or oldest
                raise HTTPError(410, "messages after this cursor are no longer kept; "
                                "poll again without 'after' to start from the oldest kept",
                                {"oldest": oldest})
            if newest and (self.database is None or room.evicted is None or len(room.ids) >= limit):
                return room.messages[-limit:]
            if self.database is None or room.evicted is None or (after is not None and after >= room.evicted):
                start = 0 if after is None else bisect.bisect_right(room.ids, after)
                return room.messages[start:start + limit]
        if newest:
            return self.database.read_newest(room_name, latest, limit)
        # Older than memory holds: read the database, up to what is already visible.
        return self.database.read(room_name, after, latest, limit)

    def stats(self):
        with self._lock:
            return {"rooms": len(self._rooms),
                    "messages": sum(len(r.ids) for r in self._rooms.values()),
                    "dropped": sum(r.dropped for r in self._rooms.values()),
                    "posts": self.posts}

    # -- upkeep --

    def prune(self, retain_count, retain_days):
        """Delete database history beyond the retention rules; cursors before it get 410."""
        if self.database is None or not (retain_count or retain_days):
            return
        cutoff = first_id_at(time.time() - retain_days * 86400) if retain_days else None
        with self._commit_lock:
            floors = self.database.prune(retain_count, cutoff)
            with self._lock:
                for name, floor in floors.items():
                    room = self._rooms.get(name)
                    if room is None:
                        continue
                    room.gone = floor
                    if room.evicted is None or room.evicted < floor:
                        room.evicted = floor
                    keep = bisect.bisect_right(room.ids, floor)
                    del room.ids[:keep], room.messages[:keep]

    def close(self):
        if self.database is not None:
            self.database.close()


class Database:
    """The SQLite file behind a MessageStore: one connection, used under one lock.

    The connection holds the file in EXCLUSIVE locking mode, so a second server on
    the same file is refused instead of missing the first one's posts.  WAL with
    synchronous=FULL: a commit is on disk before its posts are answered, so an
    answered post survives a crash of the process and of the machine.
    """

    SCHEMA_VERSION = 1
    SCHEMA = """
        CREATE TABLE messages (
            id TEXT PRIMARY KEY,            -- time-ordered UUID: sorting by id is sorting by time
            room TEXT NOT NULL,
            created_at TEXT NOT NULL,
            author TEXT,
            body TEXT NOT NULL
        ) WITHOUT ROWID;
        CREATE INDEX messages_by_room ON messages (room, id);
        CREATE TABLE rooms (
            name TEXT PRIMARY KEY,
            floor TEXT                      -- newest id pruned from this room
        ) WITHOUT ROWID;
    """

    def __init__(self, path):
        if sqlite3 is None:
            raise StorageError("this Python was built without the sqlite3 module")
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise StorageError("directory %s does not exist" % directory)
        if os.path.isdir(path):
            raise StorageError("%s is a directory" % path)
        self.path = path
        self._lock = threading.Lock()
        try:
            self._conn = sqlite3.connect(path, timeout=0, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise StorageError(str(exc)) from None
        try:
            self._open()
        except sqlite3.Error as exc:
            self._conn.close()
            if "locked" in str(exc):
                raise StorageError("the file is in use by another process "
                                   "(another chat_server?)") from None
            raise StorageError(str(exc)) from None

    def _open(self):
        conn = self._conn
        # Read before anything writes, so a file that is not a database is left untouched.
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        if version > self.SCHEMA_VERSION:
            raise StorageError("made by a newer chat_server (schema %d; this one knows %d)"
                               % (version, self.SCHEMA_VERSION))
        conn.execute("PRAGMA locking_mode=EXCLUSIVE")
        conn.execute("BEGIN IMMEDIATE")     # takes the file's lock now
        if version == 0:
            for statement in self.SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
        conn.execute("PRAGMA user_version=%d" % self.SCHEMA_VERSION)   # a real write: fails if read-only
        conn.execute("COMMIT")
        if conn.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower() != "wal":
            raise StorageError("cannot use write-ahead logging on this file")
        conn.execute("PRAGMA synchronous=FULL")

    def _query(self, sql, params=()):
        with self._lock:
            try:
                return self._conn.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise HTTPError(503, "the database could not be read: %s" % exc,
                                headers={"Retry-After": str(RETRY_AFTER_S)}) from None

    def insert(self, messages):
        """Commit `messages` in one transaction; StorageError if it failed (nothing written)."""
        rows = [(m.id, m.room, m.created_at, m.author, m.body) for m in messages]
        rooms = [(name,) for name in {m.room for m in messages}]
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                self._conn.executemany("INSERT INTO messages VALUES (?, ?, ?, ?, ?)", rows)
                self._conn.executemany("INSERT OR IGNORE INTO rooms (name) VALUES (?)", rooms)
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                if self._conn.in_transaction:
                    try:
                        self._conn.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass    # the transaction is gone either way
                raise StorageError(str(exc)) from None

    def last_id(self):
        rows = self._query("SELECT max(id) FROM messages UNION ALL SELECT max(floor) FROM rooms")
        ids = [row[0] for row in rows if row[0]]
        return max(ids) if ids else None

    def load_room(self, name, count):
        """The newest `count` messages of a room, oldest first, and its pruning floor."""
        rows = self._query("SELECT id, room, created_at, author, body FROM messages "
                           "WHERE room = ? ORDER BY id DESC LIMIT ?", (name, count))
        floor = self._query("SELECT floor FROM rooms WHERE name = ?", (name,))
        return [Message(*row) for row in reversed(rows)], (floor[0][0] if floor else None)

    def id_before(self, room, message_id):
        rows = self._query("SELECT max(id) FROM messages WHERE room = ? AND id < ?", (room, message_id))
        return rows[0][0]

    def oldest_id(self, room):
        return self._query("SELECT min(id) FROM messages WHERE room = ?", (room,))[0][0]

    def read(self, room, after, upto, limit):
        rows = self._query("SELECT id, room, created_at, author, body FROM messages "
                           "WHERE room = ? AND id > ? AND id <= ? ORDER BY id LIMIT ?",
                           (room, after or "", upto or "", limit))
        return [Message(*row) for row in rows]

    def read_newest(self, room, upto, limit):
        rows = self._query("SELECT id, room, created_at, author, body FROM messages "
                           "WHERE room = ? AND id <= ? ORDER BY id DESC LIMIT ?", (room, upto or "", limit))
        return [Message(*row) for row in reversed(rows)]

    def prune(self, retain_count, cutoff):
        """Apply the retention rules; return {room: newest id deleted} for rooms that lost any."""
        floors = {}
        for (name,) in self._query("SELECT name FROM rooms"):
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
                floors[name] = cut
        if floors:
            with self._lock:
                try:
                    self._conn.execute("BEGIN IMMEDIATE")
                    for name, cut in floors.items():
                        self._conn.execute("DELETE FROM messages WHERE room = ? AND id <= ?", (name, cut))
                        self._conn.execute("UPDATE rooms SET floor = ? WHERE name = ?", (cut, name))
                    self._conn.execute("COMMIT")
                except sqlite3.Error:
                    if self._conn.in_transaction:
                        self._conn.execute("ROLLBACK")
                    raise
        return floors

    def close(self):
        with self._lock:
            self._conn.close()


# ---------------------------------------------------------------------------
# Waiter registry
# ---------------------------------------------------------------------------

ANSWERED, HUNG_UP, SENT_EARLY, CLOSING = "answered", "hung up", "sent early", "closing"
_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)     # not on Windows, where the view alone suffices


def nonblocking_view(family, type, proto, fd):
    """A second socket object on descriptor `fd`, for a send or peek that never waits.

    A handler's socket is in timeout mode, which CPython implements with a
    non-blocking descriptor and a poll() before each call; the view has no timeout
    of its own, so it skips the poll and returns at once, without touching the
    handler's settings.  Detach it after use: it does not own the descriptor.
    """
    return socket.socket(family, type, proto, fd)


class Waiter:
    """One parked GET: what it asked for, its socket, and the Event that wakes its thread."""

    __slots__ = ("room", "after", "limit", "close", "fd", "view_args", "event", "outcome", "unsent")

    def __init__(self, room, after, limit, close, sock):
        self.room, self.after, self.limit, self.close = room, after, limit, close
        self.fd = sock.fileno()
        self.view_args = (sock.family, sock.type, sock.proto, self.fd)
        self.event = threading.Event()
        self.outcome = None
        self.unsent = b""

    def send_nowait(self, data):
        """Write as much of `data` as the socket takes now; the waiter's thread sends the rest."""
        view = nonblocking_view(*self.view_args)
        try:
            sent = view.send(data, _DONTWAIT)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.outcome = HUNG_UP
            return
        finally:
            view.detach()
        self.unsent = data[sent:]

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
    """Parked GETs by room.  Removing a waiter from here is what entitles a party to answer it."""

    def __init__(self, max_waiters):
        self.max_waiters = max_waiters
        self._lock = threading.Lock()
        self._rooms = {}
        self.count = 0
        self.wakeups = 0

    def park(self, waiter):
        """Register `waiter`; False if the registry is full."""
        with self._lock:
            if self.count >= self.max_waiters:
                return False
            self._rooms.setdefault(waiter.room, {})[waiter] = None
            self.count += 1
            return True

    def is_parked(self, waiter):
        with self._lock:
            return waiter in self._rooms.get(waiter.room, ())

    def claim(self, waiter):
        """Remove `waiter` if it is still parked; True if the caller now owns its answer."""
        with self._lock:
            waiters = self._rooms.get(waiter.room)
            if waiters is None or waiters.pop(waiter, True):
                return False
            self.count -= 1
            if not waiters:
                del self._rooms[waiter.room]
            return True

    def claim_answerable(self, room, answer_for):
        """Remove and return [(waiter, answer)] for the room's waiters with a non-empty answer.

        `answer_for(after, limit)` is called once per distinct (after, limit), so one
        answer is built per group, not per waiter.
        """
        with self._lock:
            waiters = self._rooms.pop(room, None)
            if not waiters:
                return []
            answers, claimed, still = {}, [], {}
            for waiter in waiters:
                key = (waiter.after, waiter.limit)
                if key not in answers:
                    answers[key] = answer_for(*key)
                if answers[key]:
                    claimed.append((waiter, answers[key]))
                else:
                    still[waiter] = None    # its cursor is already the newest: keep waiting
            if still:
                self._rooms[room] = still
            self.count -= len(claimed)
            self.wakeups += len(claimed)
            return claimed

    def claim_all(self):
        with self._lock:
            waiters = [w for room in self._rooms.values() for w in room]
            self._rooms.clear()
            self.count = 0
            return waiters


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
    """

    def __init__(self, server):
        super().__init__(name="chat-housekeeper", daemon=True)
        self.server = server
        self._selector = selectors.DefaultSelector()
        self._limited = isinstance(self._selector, selectors.SelectSelector)
        self._changes = collections.deque()     # (watch?, waiter); deque appends are thread-safe
        self._stop = threading.Event()
        self._next_upkeep = time.monotonic() + HOUSEKEEPING_INTERVAL_S
        self._next_prune = time.monotonic() + PRUNE_INTERVAL_S

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
                # Not while a post writes its answers: answered clients send their next
                # request at once, and handling that readiness here would trade the GIL
                # with the writing thread at every send.
                with self.server.fanout_lock:
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
        self.server.forget_idle_clients(now)
        if now >= self._next_prune:
            self._next_prune = now + PRUNE_INTERVAL_S
            config = self.server.config
            try:
                self.server.store.prune(config.retain_count, config.retain_days)
            except Exception:
                self.server.log("pruning failed\n%s" % traceback.format_exc())

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


class _Worker(threading.Thread):
    """A WorkerPool thread; run() calls the pool directly, for the same reason as in work()."""

    def __init__(self, pool, job):
        super().__init__(name="chat-worker", daemon=True)
        self.pool, self.job = pool, job
        self.go = threading.Lock()
        self.go.acquire()

    def run(self):
        self.pool.work(self)


class ChatServer(ThreadingHTTPServer):
    """ThreadingHTTPServer that owns the store, the waiters and the limits its handlers share."""

    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, address, config, store):
        self.config = config
        self.store = store
        self.registry = WaiterRegistry(config.max_waiters)
        self.pool = WorkerPool()
        self.page = build_page(PAGE_HTML)
        self.started = time.monotonic()
        self.closing = False
        self._lock = threading.Lock()
        self.fanout_lock = threading.Lock()     # see Housekeeper.run
        self._connections = {}      # socket -> handler (None until it has one)
        self._buckets = {}          # client address -> [tokens, last refill]
        self._date = (0, "")
        self.static_headers = self._static_headers()
        self.housekeeper = Housekeeper(self)
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, ChatHandler)
        self.housekeeper.start()

    def _static_headers(self):
        headers = "Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n"
        if self.config.cors_origin:
            headers += ("Access-Control-Allow-Origin: %s\r\nVary: Origin\r\n" % self.config.cors_origin)
        return headers

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
            self._refuse(request, "the server has too many open connections")
            return
        try:
            self.pool.submit(self.process_request_thread, request, client_address)
        except RuntimeError:
            with self._lock:
                self._connections.pop(request, None)
            self._refuse(request, "the server cannot start another thread")

    def _refuse(self, request, reason):
        data = self.render(HTTPStatus.SERVICE_UNAVAILABLE, json_bytes({"error": reason}),
                           headers={"Retry-After": str(RETRY_AFTER_S)}, close=True)
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
               headers=None, close=False, head_only=False):
        """A complete HTTP/1.1 response as bytes, to be sent in one write."""
        lines = [STATUS_LINES[status], "Date: %s\r\nServer: chat_server/%s\r\nContent-Type: %s\r\n"
                 "Content-Length: %d\r\n%s" % (self.http_date(), __version__, content_type, len(body),
                                                 self.static_headers)]
        for name, value in (headers or {}).items():
            lines.append("%s: %s\r\n" % (name, value))
        if close:
            lines.append("Connection: close\r\n")
        lines.append("\r\n")
        head = "".join(lines).encode("latin-1")
        return head if head_only else head + body

    def wake(self, room):
        """Answer every waiter of `room` that has news: write to its socket, then wake its thread.

        Writing here, one non-blocking send per waiter with one shared answer per
        cursor, costs far less than waking thousands of threads to each build and
        send their own; the threads are woken afterwards only to read their next request.
        """
        claimed = self.registry.claim_answerable(room, self._answer_for(room))
        responses = {}
        with self.fanout_lock:
            for waiter, body in claimed:
                key = (id(body), waiter.close)
                if key not in responses:
                    responses[key] = self.render(HTTPStatus.OK, body, close=waiter.close)
                waiter.send_nowait(responses[key])
                if waiter.outcome is None:
                    waiter.outcome = ANSWERED
        for waiter, _ in claimed:
            waiter.event.set()

    def _answer_for(self, room):
        def answer(after, limit):
            try:
                messages = self.store.newer(room, after, limit)
            except HTTPError:
                return b""      # e.g. a cursor from another life: let the waiter ask again
            return encode_list(messages) if messages else b""
        return answer

    # -- limits --

    def allow_post(self, client):
        """Token bucket per client address: True if `client` may post now."""
        rate = self.config.rate
        if not rate:
            return True
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(client, (self.config.burst, now))
            tokens = min(self.config.burst, tokens + (now - last) * rate)
            if tokens < 1:
                self._buckets[client] = (tokens, now)
                return False
            self._buckets[client] = (tokens - 1, now)
            return True

    def forget_idle_clients(self, now):
        """Drop rate-limit buckets that have refilled, so the table stays small."""
        if not self.config.rate:
            return
        full_after = self.config.burst / self.config.rate
        with self._lock:
            for client, (_, last) in list(self._buckets.items()):
                if now - last > full_after:
                    del self._buckets[client]

    # -- status and shutdown --

    def stats(self):
        with self._lock:
            connections = len(self._connections)
        stats = {"waiters": self.registry.count, "connections": connections,
                 "wakeups": self.registry.wakeups}
        stats.update(self.pool.stats())
        stats.update(self.store.stats())
        stats["uptime"] = round(time.monotonic() - self.started, 3)
        stats["rss_bytes"] = resident_bytes()
        return stats

    def log(self, message):
        sys.stderr.write("chat_server: %s\n" % message)

    def server_close(self):
        """Stop listening, answer every parked waiter with [], and let the threads finish."""
        self.closing = True
        super().server_close()
        self.housekeeper.stop()
        goodbye = self.render(HTTPStatus.OK, b"[]", close=True)
        waiters = self.registry.claim_all()
        for waiter in waiters:
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


def resident_bytes():
    """This process's resident memory in bytes, where the platform says."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def json_bytes(obj):
    return JSON_ENCODER.encode(obj).encode()


# ---------------------------------------------------------------------------
# HTTP handler
# ---------------------------------------------------------------------------

class _RequestReader(io.RawIOBase):
    """The socket as seen by a handler's rfile, with the connection's time limits.

    Between requests a connection may stay silent for `idle_timeout` seconds; once a
    request's first byte arrives, all of it (line, headers, body) must arrive within
    `request_timeout`, so a client trickling bytes (slowloris) cannot hold a thread.
    """

    __slots__ = ("sock", "idle_timeout", "request_timeout", "idle", "_deadline")

    def __init__(self, sock, idle_timeout, request_timeout):
        super().__init__()
        self.sock, self.idle_timeout, self.request_timeout = sock, idle_timeout, request_timeout
        self.idle = True
        self._deadline = 0.0

    def expect_request(self):
        self.idle = True

    def readable(self):
        return True

    def readinto(self, buffer):
        if self.idle:
            timeout = self.idle_timeout
        else:
            timeout = self._deadline - time.monotonic()
            if timeout <= 0:
                raise socket.timeout("the request took longer than %g s to arrive" % self.request_timeout)
        if self.sock.gettimeout() != timeout:
            self.sock.settimeout(timeout)   # a system call: skipped in the usual case
        count = self.sock.recv_into(buffer)
        if self.idle and count:
            self.idle = False
            self._deadline = time.monotonic() + self.request_timeout
        return count


class ChatHandler(BaseHTTPRequestHandler):
    """Routes a request to one of the methods named in ROUTES and answers it in JSON."""

    protocol_version = "HTTP/1.1"
    server_version = "chat_server/" + __version__

    ROUTES = {
        "/": {"GET": "get_page"},
        "/messages": {"GET": "get_messages", "POST": "post_message"},
        "/rooms/<room>/messages": {"GET": "get_messages", "POST": "post_message"},
        "/healthz": {"GET": "get_health"},
        "/stats": {"GET": "get_stats"},
    }
    OPEN_PATHS = {"/", "/healthz"}      # answered without the token

    def setup(self):
        self.connection = self.request
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        config = self.server.config
        self.reader = _RequestReader(self.connection, config.idle_timeout, config.request_timeout)
        self.rfile = io.BufferedReader(self.reader, READ_BUFFER_BYTES)
        self.wfile = _SocketWriter(self)
        self.server.track(self.connection, self)

    def finish(self):
        self.rfile.close()

    def interrupt_if_idle(self):
        """At shutdown: end a keep-alive connection that is between requests."""
        if self.reader.idle:
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_one_request(self):
        self.reader.expect_request()
        super().handle_one_request()

    # -- dispatch --

    def do_GET(self):
        self._dispatch()

    def do_POST(self):
        self._dispatch()

    def do_OPTIONS(self):
        path, _ = self._split_path()
        methods = self._methods_for(path)
        if methods is None:
            return self.send_error(HTTPStatus.NOT_FOUND, "no such path: %s" % path[:200])
        allow = ", ".join(sorted(set(methods) | {"OPTIONS"}))
        headers = {"Allow": allow}
        if self.server.config.cors_origin:
            headers.update({"Access-Control-Allow-Methods": allow,
                            "Access-Control-Allow-Headers": "Authorization, Content-Type",
                            "Access-Control-Max-Age": "600"})
        self._discard_body()
        self._respond(HTTPStatus.NO_CONTENT, b"", headers=headers)

    def _split_path(self):
        if self.path.startswith("/"):   # the usual origin-form; urlsplit is for the rest
            path, _, query = self.path.partition("?")
            return path, query.partition("#")[0]
        parts = urllib.parse.urlsplit(self.path)
        return parts.path or "/", parts.query

    def _methods_for(self, path):
        """(route methods, room) for a path, or None if it is not one of ours."""
        if path.startswith("/rooms/") and path.endswith("/messages"):
            return self.ROUTES["/rooms/<room>/messages"]
        return self.ROUTES.get(path)

    def _dispatch(self):
        path, query = self._split_path()
        self._body_read = False
        try:
            methods = self._methods_for(path)
            if methods is None:
                raise HTTPError(404, "no such path: %s" % path[:200])
            if self.command not in methods:
                raise HTTPError(405, "%s does not accept %s" % (path[:200], self.command),
                                headers={"Allow": ", ".join(sorted(set(methods) | {"OPTIONS"}))})
            if self.server.config.token and path not in self.OPEN_PATHS:
                self._check_token()
            room = self._room_of(path)
            if self.command != "POST":
                self._discard_body()
            getattr(self, methods[self.command])(room, self._parse_query(query))
        except HTTPError as exc:
            if not self._body_read:
                self._discard_body()    # so the next request on this connection starts clean
            self._send_json(exc.status, dict({"error": exc.message}, **exc.extra), exc.headers)
        except socket.timeout:
            self.close_connection = True
            self._send_json(HTTPStatus.REQUEST_TIMEOUT, {"error": "the request took longer than %g s "
                            "to arrive" % self.server.config.request_timeout}, close=True)
        except ConnectionError:
            self.close_connection = True
        except Exception:
            self.log_error("unhandled error in %s %s\n%s", self.command, self.path, traceback.format_exc())
            self._send_json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal server error"}, close=True)

    def _room_of(self, path):
        if not path.startswith("/rooms/"):
            return DEFAULT_ROOM
        name = path[len("/rooms/"):-len("/messages")]
        if not ROOM_NAME.match(name):
            raise HTTPError(400, "room names are 1 to 64 letters, digits, '_', '-' or '.', "
                            "not starting with '.'; got %r" % name[:80])
        return name

    def _parse_query(self, query):
        try:
            return dict(urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=False,
                                               errors="strict"))
        except (ValueError, UnicodeDecodeError):
            raise HTTPError(400, "the query string is not valid UTF-8 form data") from None

    def _check_token(self):
        given = self.headers.get("Authorization", "")
        expected = "Bearer " + self.server.config.token
        if not hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode("utf-8")):
            raise HTTPError(401, "this server needs 'Authorization: Bearer <token>'",
                            headers={"WWW-Authenticate": 'Bearer realm="chat"'})

    # -- routes --

    def get_page(self, room, query):
        body, csp = self.server.page
        self._respond(HTTPStatus.OK, body, "text/html; charset=utf-8",
                      {"Content-Security-Policy": csp, "Referrer-Policy": "no-referrer"})

    def get_health(self, room, query):
        self._send_json(HTTPStatus.OK, {"status": "ok"})

    def get_stats(self, room, query):
        self._send_json(HTTPStatus.OK, self.server.stats())

    def post_message(self, room, query):
        client = self._client_address()
        fields = self._read_message_fields()
        if not self.server.allow_post(client):
            raise HTTPError(429, "too many posts from %s; slow down" % client,
                            headers={"Retry-After": str(max(1, round(1 / self.server.config.rate)))})
        message = self.server.store.add(room, fields["body"], fields.get("author"))
        try:
            self._respond(HTTPStatus.CREATED, message.json)
        finally:
            self.server.wake(room)  # even if the poster has gone, its message was stored

    def get_messages(self, room, query):
        after = parse_cursor(query.get("after"))
        timeout = min(self._number(query, "timeout", DEFAULT_TIMEOUT_S, float), self.server.config.max_timeout)
        newest = "tail" in query
        if newest and after is not None:
            raise HTTPError(400, "use 'after' or 'tail', not both")
        name = "tail" if newest else "limit"
        limit = self._number(query, name, DEFAULT_LIMIT, int)
        if limit < 1 or limit > MAX_LIMIT:
            raise HTTPError(400, "'%s' must be from 1 to %d" % (name, MAX_LIMIT))
        messages = self.server.store.newer(room, after, limit, newest)
        if messages or timeout <= 0:
            return self._respond(HTTPStatus.OK, encode_list(messages))
        self._wait(room, after, limit, timeout)

    def _wait(self, room, after, limit, timeout):
        server = self.server
        waiter = Waiter(room, after, limit, self.close_connection, self.connection)
        if not server.registry.park(waiter):
            raise HTTPError(503, "too many clients are waiting (--max-waiters %d)" % server.registry.max_waiters,
                            headers={"Retry-After": str(RETRY_AFTER_S)})
        self.headers = None     # the request is read; a parked thread keeps as little as it can
        server.housekeeper.watch(waiter)
        try:
            # Look again now that we are registered: a post that landed since the first
            # look either shows up here or will find us in the registry.
            messages = server.store.newer(room, after, limit)
            if messages:
                if server.registry.claim(waiter):
                    return self._respond(HTTPStatus.OK, encode_list(messages))
            elif not waiter.event.wait(timeout - random.random() * min(1.0, timeout * TIMEOUT_JITTER)):
                if server.registry.claim(waiter):
                    return self._respond(HTTPStatus.OK, b"[]")
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
        if waiter.outcome == SENT_EARLY:
            # The client sent its next request before this one was answered: answer
            # this one now, as at a timeout, and go on to the next.
            waiter.unsent = self.server.render(HTTPStatus.OK, b"[]", close=waiter.close)
        elif waiter.outcome == CLOSING:
            self.close_connection = True
        if waiter.unsent:
            self._send_bytes(waiter.unsent)
        self.log_request(HTTPStatus.OK)

    # -- reading requests --

    def _client_address(self):
        if self.server.config.trust_proxy:
            forwarded = self.headers.get("X-Forwarded-For", "")
            if forwarded.strip():
                return forwarded.split(",")[-1].strip()
        return self.client_address[0]

    @staticmethod
    def _number(query, name, default, kind):
        text = query.get(name)
        if text is None or text == "":
            return default
        try:
            value = kind(text)
        except ValueError:
            raise HTTPError(400, "'%s' must be a number, got %r" % (name, text[:40])) from None
        if not math.isfinite(value) or value < 0:
            raise HTTPError(400, "'%s' must be a finite number >= 0, got %r" % (name, text[:40]))
        return value

    def _read_body(self):
        """The request body as bytes, within MAX_BODY_BYTES; HTTPError 400/411/413 otherwise."""
        self._body_read = True
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise HTTPError(411, "send the body with a Content-Length; "
                            "Transfer-Encoding is not supported")
        lengths = self.headers.get_all("Content-Length") or []
        if not lengths:
            raise HTTPError(411, "a Content-Length header is required")
        if len(set(lengths)) != 1 or not lengths[0].strip().isdigit():
            self.close_connection = True
            raise HTTPError(400, "Content-Length must be one non-negative integer, got %r"
                            % ", ".join(lengths)[:80])
        length = int(lengths[0])
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            raise HTTPError(413, "the body is %d bytes; the limit is %d" % (length, MAX_BODY_BYTES))
        body = self.rfile.read(length)
        if len(body) < length:
            self.close_connection = True
            raise HTTPError(400, "the body ended after %d of %d bytes" % (len(body), length))
        return body

    def _discard_body(self):
        self._body_read = True
        length = self.headers.get("Content-Length", "0").strip()
        if self.headers.get("Transfer-Encoding") or not length.isdigit() or int(length) > MAX_BODY_BYTES:
            self.close_connection = True
        elif int(length) and len(self.rfile.read(int(length))) < int(length):
            self.close_connection = True

    def _read_message_fields(self):
        """{"body": ..., "author": ...} from a JSON, text/plain or form body."""
        raw = self._read_body()
        ctype, params = _parse_content_type(self.headers.get("Content-Type", ""))
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
            fields = dict(urllib.parse.parse_qsl(text, keep_blank_values=True))
        elif ctype in ("text/plain", ""):
            fields = {"body": text}
        else:
            raise HTTPError(415, "send the message as application/json ({\"body\": \"...\"}), "
                            "text/plain or form data, not %s" % ctype[:60])
        return _validate_fields(fields)

    # -- writing responses --

    def _respond(self, status, body, content_type="application/json; charset=utf-8", headers=None, close=False):
        if close:
            self.close_connection = True
        data = self.server.render(status, body, content_type, headers, self.close_connection,
                                  head_only=self.command == "HEAD")
        self._send_bytes(data)
        self.log_request(int(status), len(body))

    def _send_json(self, status, obj, headers=None, close=False):
        self._respond(status, json_bytes(obj), headers=headers, close=close)

    def _send_bytes(self, data):
        # A client that does not read its answer gets as long as an idle one.
        if self.connection.gettimeout() != self.server.config.idle_timeout:
            self.connection.settimeout(self.server.config.idle_timeout)
        self.connection.sendall(data)

    def send_error(self, code, message=None, explain=None):
        """The stdlib's own errors (bad request line, 414, 431, 501, ...) as JSON too."""
        try:
            status = HTTPStatus(code)
        except ValueError:
            status = HTTPStatus.BAD_REQUEST
        self.log_error("code %d, message %s", status, message)
        if message is None:
            message = status.phrase
        if status == HTTPStatus.NOT_IMPLEMENTED and self.command:
            message = "method %s is not supported" % self.command[:20]
        # The request's own framing is unknown or unread, so close after answering.
        self._send_json(status, {"error": message}, close=True)

    def log_request(self, code="-", size="-"):
        if not self.server.config.quiet:
            super().log_request(code, size)

    def log_message(self, format, *args):
        if not self.server.config.quiet:
            super().log_message(format, *args)

    def version_string(self):
        return self.server_version


class _SocketWriter:
    """The handler's wfile (the stdlib writes 100 Continue to it): sendall, with a time limit."""

    __slots__ = ("_handler",)

    def __init__(self, handler):
        self._handler = handler

    def write(self, data):
        self._handler._send_bytes(data)
        return len(data)

    def flush(self):
        pass


def _parse_content_type(header):
    ctype, _, rest = header.partition(";")
    params = {}
    for item in rest.split(";"):
        name, _, value = item.partition("=")
        if name.strip():
            params[name.strip().lower()] = value.strip().strip('"')
    return ctype.strip().lower(), params


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
        raise HTTPError(400, "the body is not valid JSON: %s" % exc) from None
    if not isinstance(value, dict):
        raise HTTPError(400, 'the JSON body must be an object like {"body": "hello"}')
    return value


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _validate_fields(fields):
    body, author = fields.get("body"), fields.get("author")
    if not isinstance(body, str):
        raise HTTPError(400, "'body' is required and must be a string" if body is None
                        else "'body' must be a string, not %s" % type(body).__name__)
    if not body.strip():
        raise HTTPError(400, "'body' is empty")
    if _CONTROL.search(body):
        raise HTTPError(400, "'body' contains control characters")
    if author is not None:
        if not isinstance(author, str):
            raise HTTPError(400, "'author' must be a string, not %s" % type(author).__name__)
        author = author.strip() or None
        if author and (len(author) > MAX_AUTHOR_CHARS or _CONTROL.search(author) or "\n" in author):
            raise HTTPError(400, "'author' must be one line of at most %d characters" % MAX_AUTHOR_CHARS)
    return {"body": body, "author": author}


# ---------------------------------------------------------------------------
# Web page
# ---------------------------------------------------------------------------

def build_page(html):
    """The page as bytes and a Content-Security-Policy that allows exactly its inline code."""
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
<title>Chat</title>
<style>
:root {
  --bg: #ffffff; --fg: #1b1c1f; --muted: #5c6068; --line: #d5d7dc; --card: #f1f3f6;
  --mine: #e3ecfd; --accent: #0b57d0; --on-accent: #ffffff; --bad: #b3261e; --ok: #1e7b34;
  color-scheme: light dark;
}
@media (prefers-color-scheme: dark) {
  :root {
    --bg: #131417; --fg: #e4e5e9; --muted: #9da1a9; --line: #363940; --card: #1f2126;
    --mine: #1d2a44; --accent: #8ab4f8; --on-accent: #0b1a33; --bad: #f2b8b5; --ok: #7fd68f;
  }
}
* { box-sizing: border-box; }
[hidden] { display: none !important; }
html, body { height: 100%; }
body {
  margin: 0; display: flex; flex-direction: column; height: 100vh; height: 100dvh;
  background: var(--bg); color: var(--fg);
  font: 16px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
}
form { margin: 0; }
header, #token-form, #send-form {
  display: flex; flex-wrap: wrap; align-items: center; gap: .5rem; padding: .5rem .75rem;
}
header, #token-form { border-bottom: 1px solid var(--line); }
#send-form { border-top: 1px solid var(--line); flex-wrap: nowrap; }
#room-form, .field { display: flex; align-items: center; gap: .35rem; }
label { font-size: .9rem; color: var(--muted); }
input, textarea, button {
  font: inherit; color: inherit; background: var(--bg);
  border: 1px solid var(--line); border-radius: 6px; padding: .4rem .6rem; min-width: 0;
}
button { background: var(--accent); border-color: var(--accent); color: var(--on-accent); cursor: pointer; }
:focus-visible { outline: 3px solid var(--accent); outline-offset: 2px; }
#room { width: 8.5rem; }
#name { width: 9rem; }
#status { margin: 0 0 0 auto; font-size: .85rem; color: var(--muted); white-space: nowrap; }
#status::before {
  content: ""; display: inline-block; width: .6em; height: .6em; margin-right: .4em;
  border-radius: 50%; background: var(--muted);
}
#status.ok::before { background: var(--ok); }
#status.bad::before { background: var(--bad); }
main { flex: 1; overflow-y: auto; padding: .75rem; }
#messages { list-style: none; margin: 0; padding: 0; display: flex; flex-direction: column; gap: .45rem; }
#messages:empty::after { content: "No messages yet."; color: var(--muted); font-style: italic; }
#messages li { background: var(--card); border-radius: 8px; padding: .35rem .65rem; }
#messages li.mine { background: var(--mine); }
.meta { display: flex; gap: .6rem; align-items: baseline; font-size: .8rem; color: var(--muted); }
.author { font-weight: 600; color: var(--fg); overflow-wrap: anywhere; }
.text { white-space: pre-wrap; overflow-wrap: anywhere; }
#body { flex: 1; resize: none; overflow-y: auto; max-height: 8rem; }
.anon { font-style: italic; font-weight: 400; }
#note { margin: 0; padding: 0 .75rem; font-size: .85rem; color: var(--bad); }
#note:empty { display: none; }
.sr { position: absolute; width: 1px; height: 1px; overflow: hidden; clip: rect(0 0 0 0); white-space: nowrap; }
@media (max-width: 520px) {
  header { gap: .35rem .5rem; }
  #status { flex-basis: 100%; margin: 0; }
  #room, #name { width: 6rem; }
}
</style>
</head>
<body>
<header>
  <form id="room-form" autocomplete="off">
    <label for="room">Room</label>
    <input id="room" maxlength="64" spellcheck="false" autocapitalize="off">
    <button>Go</button>
  </form>
  <div class="field">
    <label for="name">Name</label>
    <input id="name" maxlength="100" autocomplete="nickname" placeholder="anonymous">
  </div>
  <p id="status" role="status">connecting</p>
</header>
<form id="token-form" hidden>
  <label for="token">This server needs an access token</label>
  <input id="token" type="password" autocomplete="current-password">
  <button>Save</button>
</form>
<main id="log" tabindex="0" aria-label="Messages">
  <ol id="messages" aria-live="polite"></ol>
</main>
<p id="note" role="alert"></p>
<form id="send-form" autocomplete="off">
  <label for="body" class="sr">Message</label>
  <textarea id="body" rows="1" maxlength="10000" placeholder="Message" title="Enter sends, Shift+Enter adds a new line"></textarea>
  <button>Send</button>
</form>
<script>
'use strict';
(function () {
  const $ = (id) => document.getElementById(id);
  const list = $('messages'), log = $('log'), statusEl = $('status'), note = $('note');
  const roomInput = $('room'), nameInput = $('name'), bodyInput = $('body');
  const tokenForm = $('token-form'), tokenInput = $('token');
  const ROOM_RE = /^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}$/;
  const LONG_POLL = 25, MAX_BACKOFF = 30000, RECENT = 100;
  const saved = {
    get(k) { try { return localStorage.getItem('chat.' + k) || ''; } catch (e) { return ''; } },
    set(k, v) { try { if (v) localStorage.setItem('chat.' + k, v); else localStorage.removeItem('chat.' + k); } catch (e) { /* private mode */ } }
  };
  let room = 'default', cursor = null, seen = new Set(), gen = 0, ctrl = null, live = false;

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
  const roomUrl = (r) => '/rooms/' + encodeURIComponent(r) + '/messages';
  function setStatus(text, cls) { statusEl.textContent = text; statusEl.className = cls || ''; }
  function headers(extra) {
    const h = Object.assign({}, extra), token = saved.get('token');
    if (token) h.Authorization = 'Bearer ' + token;
    return h;
  }

  function when(iso) {
    const t = document.createElement('time'), d = new Date(iso);
    if (isNaN(d.getTime())) return t;
    const today = d.toDateString() === new Date().toDateString();
    t.dateTime = iso;
    t.title = d.toLocaleString();
    t.textContent = today ? d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' })
      : d.toLocaleString([], { month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit' });
    return t;
  }

  // Render one message (as text only), once per id, kept in id (= time) order.
  function add(m) {
    if (!m || typeof m.id !== 'string' || seen.has(m.id) || (m.room && m.room !== room)) return;
    seen.add(m.id);
    const li = document.createElement('li'), meta = document.createElement('div');
    const who = document.createElement('span'), text = document.createElement('div');
    li.dataset.id = m.id;
    if (m.author && m.author === nameInput.value.trim()) li.className = 'mine';
    meta.className = 'meta';
    who.className = m.author ? 'author' : 'author anon';
    who.textContent = m.author || 'anonymous';
    meta.append(who, when(m.created_at));
    text.className = 'text';
    text.textContent = m.body;
    li.append(meta, text);
    let before = null;
    for (let el = list.lastElementChild; el && el.dataset.id > m.id; el = el.previousElementSibling) before = el;
    const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 60;
    list.insertBefore(li, before);
    if (atBottom) log.scrollTop = log.scrollHeight;
  }

  function reset() { cursor = null; seen = new Set(); list.textContent = ''; }

  // One long-polling loop per generation; a newer generation (room switch, hidden tab) ends it.
  async function poll(g, signal) {
    let fails = 0;
    while (g === gen) {
      let res = null, data = null;
      try {
        const q = '?timeout=' + (live ? LONG_POLL : 0) + (cursor ? '&after=' + encodeURIComponent(cursor) : '&tail=' + RECENT);
        res = await fetch(roomUrl(room) + q, { headers: headers(), signal: signal, cache: 'no-store' });
        data = await res.json().catch(() => null);
      } catch (e) { res = null; }
      if (g !== gen) return;
      if (res && res.ok && Array.isArray(data)) {
        fails = 0;
        live = true;
        setStatus('connected', 'ok');
        data.forEach(add);
        if (data.length) cursor = data[data.length - 1].id;
        continue;
      }
      if (res && (res.status === 410 || (res.status === 400 && data && 'latest' in data))) {
        reset();  // cursor too old, or from before a server restart: reload the room from scratch
        continue;
      }
      if (res && res.status === 401) { live = false; askToken(); return; }
      live = false;
      let wait = Math.min(MAX_BACKOFF, 1000 * Math.pow(2, fails++)) * (0.5 + Math.random() / 2);
      const retryAfter = res ? Number(res.headers.get('Retry-After')) : 0;
      if (retryAfter > 0) wait = Math.max(wait, Math.min(retryAfter * 1000, MAX_BACKOFF));
      const end = Date.now() + wait;
      while (g === gen && Date.now() < end) {
        setStatus('reconnecting in ' + Math.ceil((end - Date.now()) / 1000) + ' s', 'bad');
        await sleep(Math.min(1000, end - Date.now()));
      }
    }
  }

  function stop() { gen++; if (ctrl) ctrl.abort(); ctrl = null; live = false; }
  function start() {
    stop();
    if (!tokenForm.hidden) return;
    if (document.visibilityState === 'hidden') { setStatus('paused while hidden'); return; }
    ctrl = new AbortController();
    setStatus('connecting');
    poll(gen, ctrl.signal);
  }

  function askToken() {
    stop();
    setStatus('access token needed', 'bad');
    if (tokenForm.hidden) {
      saved.set('token', '');
      tokenForm.hidden = false;
      tokenInput.value = '';
      tokenInput.focus();
    }
  }
  tokenForm.addEventListener('submit', (e) => {
    e.preventDefault();
    const token = tokenInput.value.trim();
    if (!token) { tokenInput.focus(); return; }
    saved.set('token', token);
    tokenForm.hidden = true;
    bodyInput.focus();
    start();
  });

  function openRoom() {
    let r = '';
    try { r = decodeURIComponent(location.hash.slice(1)); } catch (e) { r = ''; }
    if (r && !ROOM_RE.test(r)) { note.textContent = 'Not a valid room name: ' + r; r = ''; }
    room = r || 'default';
    roomInput.value = room;
    document.title = room + ' - chat';
    reset();
    start();
  }
  window.addEventListener('hashchange', openRoom);
  $('room-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const r = roomInput.value.trim();
    if (!ROOM_RE.test(r)) {
      note.textContent = 'Room names are 1-64 letters, digits, _ - or . (not starting with .)';
      roomInput.focus();
      return;
    }
    note.textContent = '';
    if (r !== room) location.hash = encodeURIComponent(r);
  });

  async function send() {
    const body = bodyInput.value, author = nameInput.value.trim(), target = room;
    if (!body.trim()) return;
    try {
      const res = await fetch(roomUrl(target), {
        method: 'POST', headers: headers({ 'Content-Type': 'application/json' }),
        body: JSON.stringify(author ? { body: body, author: author } : { body: body })
      });
      const data = await res.json().catch(() => null);
      if (res.status === 401) { askToken(); note.textContent = 'Enter the access token, then send again.'; return; }
      if (!res.ok) throw new Error((data && data.error) || 'HTTP ' + res.status);
      note.textContent = '';
      if (bodyInput.value === body) bodyInput.value = '';
      if (target === room) add(data);  // the poll will bring it too; add() ignores the duplicate
    } catch (err) {
      note.textContent = 'Not sent: ' + err.message;
    }
  }
  $('send-form').addEventListener('submit', (e) => { e.preventDefault(); send(); });
  bodyInput.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
  });

  nameInput.value = saved.get('name');
  nameInput.addEventListener('input', () => saved.set('name', nameInput.value.trim()));
  document.addEventListener('visibilitychange', () => {
    if (document.visibilityState === 'hidden') { stop(); setStatus('paused while hidden'); } else start();
  });
  window.addEventListener('online', () => { if (!live) start(); });
  openRoom();
}());
</script>
</body>
</html>
"""


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def make_server(host=DEFAULT_HOST, port=DEFAULT_PORT, **options):
    """A ChatServer listening on (host, port); options are Config's (db defaults to ':memory:')."""
    config = Config(host=host, port=port, **options)
    database = None if config.db in (None, ":memory:") else Database(config.db)
    store = MessageStore(config.history, config.max_rooms, database)
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


def build_parser():
    parser = argparse.ArgumentParser(
        prog="chat_server.py", description=__doc__.splitlines()[0],
        epilog="Environment: CHAT_TOKEN sets --token without showing it in the process list.")
    add = parser.add_argument
    add("--host", default=DEFAULT_HOST, help="address to listen on (default: %(default)s)")
    add("--port", type=int, default=DEFAULT_PORT, help="port; 0 picks a free one (default: %(default)s)")
    add("--db", default=DEFAULT_DB, metavar="PATH",
        help="SQLite file for the history, or :memory: to keep nothing on disk (default: %(default)s)")
    add("--quiet", action="store_true", help="do not log each request to stderr")
    add("--max-timeout", type=float, default=MAX_TIMEOUT_S, metavar="SECONDS",
        help="longest long-poll wait a client may ask for (default: %(default)s)")
    add("--history", type=int, default=HISTORY_PER_ROOM, metavar="N",
        help="messages of each room kept in memory; with :memory: the whole history (default: %(default)s)")
    add("--max-rooms", type=int, default=MAX_ROOMS, metavar="N", help="rooms at most (default: %(default)s)")
    add("--retain-count", type=int, default=0, metavar="N",
        help="messages of each room kept in the database; 0 keeps all (default: %(default)s)")
    add("--retain-days", type=float, default=0, metavar="DAYS",
        help="delete messages older than this from the database; 0 keeps all (default: %(default)s)")
    add("--max-waiters", type=int, default=MAX_WAITERS, metavar="N",
        help="long polls waiting at once; more get 503 (default: %(default)s)")
    add("--max-connections", type=int, default=MAX_CONNECTIONS, metavar="N",
        help="open connections at once, further capped by the open-files limit (default: %(default)s)")
    add("--request-timeout", type=float, default=REQUEST_TIMEOUT_S, metavar="SECONDS",
        help="time for a request to arrive once it has started (default: %(default)s)")
    add("--idle-timeout", type=float, default=IDLE_TIMEOUT_S, metavar="SECONDS",
        help="close keep-alive connections idle this long (default: %(default)s)")
    add("--rate", type=float, default=0, metavar="PER_SECOND",
        help="posts per second allowed per client address; 0 for no limit (default: %(default)s)")
    add("--burst", type=int, default=0, metavar="N",
        help="posts a client may make at once before --rate applies (default: twice the rate)")
    add("--trust-proxy", action="store_true",
        help="take the client address from X-Forwarded-For (only behind a proxy you run)")
    add("--token", default=os.environ.get("CHAT_TOKEN"), metavar="SECRET",
        help="require 'Authorization: Bearer SECRET' on the API (default: $CHAT_TOKEN, else none)")
    add("--cors-origin", metavar="ORIGIN", help="let pages from ORIGIN call the API (default: none)")
    return parser


def main(argv=None):
    """Run the server until Ctrl-C or SIGTERM; return the exit status."""
    args = build_parser().parse_args(argv)
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
        max_connections = min(max_connections, open_files - FD_RESERVE)
    threading.stack_size(THREAD_STACK_BYTES)
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    options = dict(vars(args))
    del options["host"], options["port"]
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
    print("chat_server: serving on http://%s:%d/ with messages %s (Ctrl-C to quit)" % (url_host, port, where),
          flush=True)
    if not args.token and not _is_loopback(host):
        print("chat_server: warning: listening on %s without --token: anyone who can reach it can "
              "read and post" % host, file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def _is_loopback(host):
    return host in ("localhost", "::1") or host.startswith("127.")


if __name__ == "__main__":
    sys.exit(main())
