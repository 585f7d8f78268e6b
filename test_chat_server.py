"""Tests for chat_server.py: real servers on port 0, spoken to over real sockets.

Run with:  python -m unittest -v test_chat_server
"""

import http.client
import json
import os
import re
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import uuid
from unittest import mock

import chat_server

HERE = os.path.dirname(os.path.abspath(__file__))
SERVER_SCRIPT = os.path.join(HERE, "chat_server.py")
URL_LINE = re.compile(r"http://(\[[^\]]+\]|[^/:\s]+):(\d+)/")


def wait_until(predicate, timeout=5.0, interval=0.01):
    """Poll `predicate` until it is true or `timeout` passes; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


class ServerTestCase(unittest.TestCase):
    """Starts a chat server in this process on a free port for each test."""

    server_options = {}

    def setUp(self):
        self.server = self.start_server(**self.server_options)

    def start_server(self, **options):
        options.setdefault("quiet", True)
        server = chat_server.make_server("127.0.0.1", 0, **options)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
        thread.start()
        self.addCleanup(self.stop_server, server, thread)
        return server

    @staticmethod
    def stop_server(server, thread):
        if thread.is_alive():
            server.shutdown()
            server.server_close()
            thread.join(5)

    @property
    def address(self):
        return self.server.server_address[:2]

    def connect(self, timeout=10):
        conn = http.client.HTTPConnection(*self.address, timeout=timeout)
        self.addCleanup(conn.close)
        return conn

    def request(self, method, path, body=None, headers=None, conn=None):
        """Send one request; return (status, headers, decoded JSON or raw bytes)."""
        conn = conn or self.connect()
        headers = dict(headers or {})
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            headers.setdefault("Content-Type", "application/json")
        conn.request(method, path, body, headers)
        resp = conn.getresponse()
        raw = resp.read()
        data = raw
        if resp.getheader("Content-Type", "").startswith("application/json") and raw:
            data = json.loads(raw)
        return resp.status, resp.headers, data

    def post(self, body, room=None, author=None, **kwargs):
        path = "/rooms/%s/messages" % room if room else "/messages"
        message = {"body": body}
        if author:
            message["author"] = author
        status, _, data = self.request("POST", path, message, **kwargs)
        self.assertEqual(status, 201, data)
        return data

    def get(self, query="", room=None, **kwargs):
        path = ("/rooms/%s/messages" % room if room else "/messages") + (("?" + query) if query else "")
        return self.request("GET", path, **kwargs)

    def raw_exchange(self, data, timeout=5):
        """Send raw bytes; return the first response (or all the server sent before closing)."""
        with socket.create_connection(self.address, timeout=timeout) as sock:
            sock.sendall(data)
            received = b""
            try:
                while not self._complete(received):
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    received += chunk
            except socket.timeout:
                pass
        return received

    @staticmethod
    def _complete(raw):
        head, found, body = raw.partition(b"\r\n\r\n")
        match = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        return bool(found and match and len(body) >= int(match.group(1)))

    def parse_raw(self, raw):
        """(status, headers dict, JSON body) of the first response in `raw`."""
        head, _, body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", len(body)))
        return status, headers, json.loads(body[:length]) if length else None

    def start_poll(self, query, room=None):
        """Run a GET in a thread; return (thread, result dict filled with status/data/elapsed)."""
        result = {}

        def poll():
            started = time.monotonic()
            status, _, data = self.get(query, room=room)
            result.update(status=status, data=data, elapsed=time.monotonic() - started)

        thread = threading.Thread(target=poll)
        thread.start()
        self.addCleanup(thread.join, 10)
        return thread, result

    def wait_for_waiters(self, count):
        self.assertTrue(wait_until(lambda: self.server.registry.count == count),
                        "expected %d parked waiters, have %d" % (count, self.server.registry.count))


# ---------------------------------------------------------------------------
# Store and ids, without HTTP
# ---------------------------------------------------------------------------

class IdTest(unittest.TestCase):
    def test_ids_are_uuid7_and_strictly_increase(self):
        clock = chat_server.IdClock()
        ids = [clock.next_id() for _ in range(10000)]
        self.assertEqual(ids, sorted(set(ids)))
        parsed = uuid.UUID(ids[0])
        self.assertEqual(parsed.version, 7)
        self.assertEqual(parsed.variant, uuid.RFC_4122)
        self.assertEqual(str(parsed), ids[0])

    def test_ids_increase_when_the_clock_steps_back(self):
        clock = chat_server.IdClock()
        with mock.patch("time.time", return_value=2000000000.0):
            first = clock.next_id()
        with mock.patch("time.time", return_value=1000000000.0):
            later = [clock.next_id() for _ in range(5000)]   # also overflows the in-ms counter
        self.assertEqual(later, sorted(later))
        self.assertLess(first, later[0])

    def test_ids_continue_after_the_last_stored_one(self):
        last = chat_server.IdClock().next_id()
        with mock.patch("time.time", return_value=1000000000.0):
            self.assertGreater(chat_server.IdClock(last).next_id(), last)

    def test_cursor_parsing(self):
        some = str(uuid.uuid4())
        self.assertEqual(chat_server.parse_cursor(some.upper()), some)
        self.assertIsNone(chat_server.parse_cursor(chat_server.ZERO_ID))
        self.assertIsNone(chat_server.parse_cursor(""))
        with self.assertRaises(chat_server.HTTPError) as caught:
            chat_server.parse_cursor("not-an-id")
        self.assertEqual(caught.exception.status, 400)


class StoreTest(unittest.TestCase):
    def test_newer_and_limit(self):
        store = chat_server.MessageStore(history=10)
        ids = [store.add("r", "m%d" % i).id for i in range(5)]
        self.assertEqual([m.id for m in store.newer("r", None, 100)], ids)
        self.assertEqual([m.id for m in store.newer("r", ids[1], 2)], ids[2:4])
        self.assertEqual(store.newer("r", ids[-1], 100), [])
        self.assertEqual(store.newer("other", None, 100), [])

    def test_cursor_older_than_history_is_gone(self):
        store = chat_server.MessageStore(history=3)
        ids = [store.add("r", "m%d" % i).id for i in range(5)]
        self.assertEqual([m.id for m in store.newer("r", ids[1], 100)], ids[2:])
        with self.assertRaises(chat_server.HTTPError) as caught:
            store.newer("r", ids[0], 100)
        self.assertEqual(caught.exception.status, 410)
        self.assertEqual(caught.exception.extra["oldest"], ids[2])
        self.assertEqual(store.stats()["dropped"], 2)

    def test_cursor_from_the_future_is_refused(self):
        store = chat_server.MessageStore()
        last = store.add("r", "x").id
        future = chat_server.IdClock(last).next_id()
        with self.assertRaises(chat_server.HTTPError) as caught:
            store.newer("r", future, 100)
        self.assertEqual(caught.exception.status, 400)
        self.assertEqual(caught.exception.extra["latest"], last)

    def test_room_limit(self):
        store = chat_server.MessageStore(max_rooms=2)
        store.add("a", "x")
        store.add("b", "x")
        with self.assertRaises(chat_server.HTTPError) as caught:
            store.add("c", "x")
        self.assertEqual(caught.exception.status, 503)
        store.add("a", "still fine")


# ---------------------------------------------------------------------------
# The seed's API
# ---------------------------------------------------------------------------

class PostTest(ServerTestCase):
    def test_post_json_returns_the_message(self):
        status, headers, data = self.request("POST", "/messages", {"body": "Hello World"})
        self.assertEqual(status, 201)
        self.assertEqual(headers["Content-Type"], "application/json; charset=utf-8")
        self.assertEqual(set(data), {"id", "room", "created_at", "author", "body"})
        self.assertEqual((data["body"], data["room"], data["author"]), ("Hello World", "default", None))
        self.assertEqual(uuid.UUID(data["id"]).version, 7)
        self.assertRegex(data["created_at"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")

    def test_post_form_text_and_unlabelled_json(self):
        form = self.request("POST", "/messages", b"body=hi+there&author=ann",
                            {"Content-Type": "application/x-www-form-urlencoded"})
        text = self.request("POST", "/messages", "plain words".encode(), {"Content-Type": "text/plain"})
        curl_d = self.request("POST", "/messages", b'{"body": "curl -d"}',
                              {"Content-Type": "application/x-www-form-urlencoded"})
        bare = self.request("POST", "/messages", b'{"body": "no type", "author": "bo"}')
        self.assertEqual([r[0] for r in (form, text, curl_d, bare)], [201] * 4)
        self.assertEqual((form[2]["body"], form[2]["author"]), ("hi there", "ann"))
        self.assertEqual(text[2]["body"], "plain words")
        self.assertEqual(curl_d[2]["body"], "curl -d")
        self.assertEqual((bare[2]["body"], bare[2]["author"]), ("no type", "bo"))

    def test_unicode_round_trips(self):
        sent = self.post("h\u00e9llo \u2603 \U0001f600 \"quoted\" <b>")
        _, _, data = self.get()
        self.assertEqual(data[-1]["body"], sent["body"])
        self.assertEqual(sent["body"], "h\u00e9llo \u2603 \U0001f600 \"quoted\" <b>")

    def test_content_length_matches_body_and_keep_alive_works(self):
        conn = self.connect()
        for _ in range(3):
            conn.request("POST", "/messages", b'{"body":"x"}', {"Content-Type": "application/json"})
            resp = conn.getresponse()
            body = resp.read()
            self.assertEqual(int(resp.getheader("Content-Length")), len(body))
            self.assertFalse(resp.will_close)
        self.assertEqual(self.server.stats()["connections"], 1)


class GetTest(ServerTestCase):
    def test_get_without_after_returns_everything_kept_oldest_first(self):
        sent = [self.post("m%d" % i)["id"] for i in range(3)]
        status, _, data = self.get()
        self.assertEqual(status, 200)
        self.assertEqual([m["id"] for m in data], sent)
        self.assertEqual(self.get("after=" + chat_server.ZERO_ID)[2], data)

    def test_after_returns_only_newer(self):
        sent = [self.post("m%d" % i)["id"] for i in range(4)]
        self.assertEqual([m["id"] for m in self.get("after=" + sent[1])[2]], sent[2:])

    def test_limit_gives_the_oldest_first(self):
        sent = [self.post("m%d" % i)["id"] for i in range(5)]
        self.assertEqual([m["id"] for m in self.get("limit=2")[2]], sent[:2])
        self.assertEqual([m["id"] for m in self.get("limit=2&after=" + sent[1])[2]], sent[2:4])

    def test_timeout_answers_empty_list(self):
        last = self.post("x")["id"]
        started = time.monotonic()
        status, _, data = self.get("timeout=0.3&after=" + last)
        elapsed = time.monotonic() - started
        self.assertEqual((status, data), (200, []))
        self.assertGreaterEqual(elapsed, 0.3 * (1 - chat_server.TIMEOUT_JITTER))
        self.assertEqual(self.server.registry.count, 0)

    def test_timeout_zero_answers_at_once(self):
        status, _, data = self.get("timeout=0")
        self.assertEqual((status, data), (200, []))

    def test_waiting_poll_wakes_on_post_well_before_timeout(self):
        last = self.post("x")["id"]
        thread, result = self.start_poll("timeout=30&after=" + last)
        self.wait_for_waiters(1)
        sent = self.post("wake up")
        thread.join(10)
        self.assertEqual(result["status"], 200)
        self.assertEqual([m["id"] for m in result["data"]], [sent["id"]])
        self.assertLess(result["elapsed"], 5)

    def test_waiting_poll_on_empty_room_wakes(self):
        thread, result = self.start_poll("timeout=30", room="fresh")
        self.wait_for_waiters(1)
        sent = self.post("first", room="fresh")
        thread.join(10)
        self.assertEqual(result["data"], [sent])

    def test_many_waiters_all_get_the_message_and_keep_their_connection(self):
        last = self.post("x")["id"]
        conns = [self.connect() for _ in range(20)]
        for conn in conns:
            conn.request("GET", "/messages?timeout=30&after=" + last)
        self.wait_for_waiters(20)
        sent = self.post("to all")
        for conn in conns:
            resp = conn.getresponse()
            self.assertEqual(json.loads(resp.read()), [sent])
        for conn in conns:      # the same connections carry the next request
            conn.request("GET", "/messages?timeout=0&after=" + last)
            self.assertEqual(json.loads(conn.getresponse().read()), [sent])

    def test_timeout_is_clamped_to_max_timeout(self):
        server = self.start_server(max_timeout=0.2)
        conn = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
        self.addCleanup(conn.close)
        started = time.monotonic()
        conn.request("GET", "/messages?timeout=500")
        self.assertEqual(json.loads(conn.getresponse().read()), [])
        self.assertLess(time.monotonic() - started, 5)

    def test_concurrent_posters_and_followers_agree_on_one_order(self):
        posters, per_poster, followers = 6, 30, 3
        total = posters * per_poster
        seen = [[] for _ in range(followers)]

        def follow(index):
            conn = http.client.HTTPConnection(*self.address, timeout=20)
            after, deadline = "", time.monotonic() + 20
            while len(seen[index]) < total and time.monotonic() < deadline:
                conn.request("GET", "/messages?timeout=5&limit=7&after=" + after)
                batch = json.loads(conn.getresponse().read())
                seen[index].extend(m["id"] for m in batch)
                if batch:
                    after = batch[-1]["id"]
            conn.close()

        def post_many(index):
            conn = http.client.HTTPConnection(*self.address, timeout=20)
            for i in range(per_poster):
                conn.request("POST", "/messages", json.dumps({"body": "%d-%d" % (index, i)}).encode(),
                             {"Content-Type": "application/json"})
                resp = conn.getresponse()
                self.assertEqual(resp.status, 201)
                resp.read()
            conn.close()

        threads = [threading.Thread(target=follow, args=(i,)) for i in range(followers)]
        threads += [threading.Thread(target=post_many, args=(i,)) for i in range(posters)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        stored = [m["id"] for m in self.get("limit=1000")[2]]
        self.assertEqual(len(stored), total)
        self.assertEqual(stored, sorted(stored))
        for ids in seen:
            self.assertEqual(ids, stored)   # every message once, in the one order


class RoomTest(ServerTestCase):
    def test_rooms_are_separate(self):
        a = self.post("in a", room="a")
        b = self.post("in b", room="b")
        d = self.post("in default")
        self.assertEqual(self.get(room="a")[2], [a])
        self.assertEqual(self.get(room="b")[2], [b])
        self.assertEqual(self.get()[2], [d])
        self.assertEqual(self.get(room="default")[2], [d])

    def test_waiter_is_not_woken_by_another_room(self):
        thread, result = self.start_poll("timeout=1.5", room="quiet")
        self.wait_for_waiters(1)
        self.post("elsewhere", room="noisy")
        thread.join(10)
        self.assertEqual(result["data"], [])
        self.assertGreater(result["elapsed"], 1.0)

    def test_invalid_room_names(self):
        for name in (".hidden", "a" * 65, "sp%20ace", "%C3%A9t%C3%A9"):
            status, _, data = self.request("POST", "/rooms/%s/messages" % name, {"body": "x"})
            self.assertEqual(status, 400, name)
            self.assertIn("room names", data["error"])
        self.assertEqual(self.request("GET", "/rooms/ok-Room_1.2/messages?timeout=0")[0], 200)


# ---------------------------------------------------------------------------
# Cursor contract and history limits
# ---------------------------------------------------------------------------

class CursorTest(ServerTestCase):
    server_options = {"history": 3}

    def test_malformed_cursor(self):
        status, _, data = self.get("after=yesterday")
        self.assertEqual(status, 400)
        self.assertIn("after", data["error"])

    def test_cursor_older_than_history_gets_410_with_oldest(self):
        ids = [self.post("m%d" % i)["id"] for i in range(5)]
        status, _, data = self.get("after=" + ids[0])
        self.assertEqual(status, 410)
        self.assertEqual(data["oldest"], ids[2])
        self.assertEqual([m["id"] for m in self.get("after=" + ids[1])[2]], ids[2:])
        self.assertEqual([m["id"] for m in self.get()[2]], ids[2:])
        self.assertEqual(self.server.stats()["dropped"], 2)

    def test_cursor_from_the_future_gets_400_with_latest(self):
        last = self.post("x")["id"]
        future = chat_server.IdClock(last).next_id()
        status, _, data = self.get("after=" + future)
        self.assertEqual(status, 400)
        self.assertEqual(data["latest"], last)

    def test_unknown_cursor_in_range_is_a_position(self):
        first = self.post("a")["id"]
        between = chat_server.IdClock(first).next_id()
        second = self.post("b")["id"]
        self.assertEqual([m["id"] for m in self.get("after=" + between)[2]], [second])


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------

class ErrorTest(ServerTestCase):
    def assertJSONError(self, response, status):
        got_status, headers, data = response
        self.assertEqual(got_status, status, data)
        self.assertTrue(headers["Content-Type"].startswith("application/json"), headers)
        self.assertIsInstance(data, dict)
        self.assertTrue(data["error"])
        return data

    def test_bad_bodies(self):
        cases = [
            (b"{not json", "application/json", 400),
            (b"[1, 2]", "application/json", 400),
            (b'{"text": "no body field"}', "application/json", 400),
            (b'{"body": 42}', "application/json", 400),
            (b'{"body": ["x"]}', "application/json", 400),
            (b'{"body": "   "}', "application/json", 400),
            (b'{"body": "x", "author": 7}', "application/json", 400),
            (b'{"body": "x", "author": "' + b"a" * 65 + b'"}', "application/json", 400),
            (b'{"body": "nul \\u0000 inside"}', "application/json", 400),
            (b'{"body": "\xff\xfe"}', "application/json", 400),
            (b"[" * 5000 + b"]" * 5000, "application/json", 400),
            (b'{"body": "x", "n": ' + b"9" * 5000 + b"}", "application/json", 400),
            (b"", "application/json", 400),
            (b"body=", "application/x-www-form-urlencoded", 400),
            (b"<xml/>", "application/xml", 415),
            (b'{"body": "x"}', "application/json; charset=latin-1", 415),
        ]
        for body, ctype, status in cases:
            with self.subTest(body=body[:40], ctype=ctype):
                self.assertJSONError(self.request("POST", "/messages", body, {"Content-Type": ctype}), status)
        self.assertEqual(self.get("timeout=0")[2], [])     # nothing was stored

    def test_body_too_large_is_refused_before_it_is_read(self):
        raw = self.raw_exchange(b"POST /messages HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
                                b"Content-Length: 10000001\r\n\r\n" + b"x" * 1000)
        status, headers, data = self.parse_raw(raw)
        self.assertEqual(status, 413)
        self.assertEqual(headers["connection"], "close")
        self.assertIn("10000", data["error"])
        self.assertJSONError(self.request("POST", "/messages", b"x" * (chat_server.MAX_BODY_BYTES + 1),
                                          {"Content-Type": "text/plain"}), 413)
        self.assertEqual(self.request("POST", "/messages", b"x" * chat_server.MAX_BODY_BYTES,
                                      {"Content-Type": "text/plain"})[0], 201)

    def test_length_required_and_bad_lengths(self):
        for headers, status in [(b"", 411), (b"Transfer-Encoding: chunked\r\n", 411),
                                (b"Content-Length: -5\r\n", 400), (b"Content-Length: abc\r\n", 400),
                                (b"Content-Length: 3\r\nContent-Length: 4\r\n", 400)]:
            with self.subTest(headers=headers):
                raw = self.raw_exchange(b"POST /messages HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\nabc")
                got, _, data = self.parse_raw(raw)
                self.assertEqual(got, status, data)
                self.assertTrue(data["error"])

    def test_unknown_path_and_wrong_method(self):
        self.assertJSONError(self.request("GET", "/nope"), 404)
        self.assertJSONError(self.request("GET", "/rooms/a/other"), 404)
        status, headers, data = self.request("POST", "/healthz", b"{}")
        self.assertJSONError((status, headers, data), 405)
        self.assertEqual(headers["Allow"], "GET, OPTIONS")
        data = self.assertJSONError(self.request("DELETE", "/messages"), 501)
        self.assertIn("DELETE", data["error"])

    def test_stdlib_errors_are_json(self):
        bad_line = self.raw_exchange(b"GARBAGE\r\n\r\n")
        self.assertEqual(self.parse_raw(bad_line)[0], 400)
        long_url = self.raw_exchange(b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n")
        self.assertEqual(self.parse_raw(long_url)[0], 414)
        flood = b"GET /messages HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(200)) + b"\r\n"
        self.assertEqual(self.parse_raw(self.raw_exchange(flood))[0], 431)
        quote = self.raw_exchange(b'GET /"quoted" HTTP/9.9\r\n\r\n')
        status, _, data = self.parse_raw(quote)
        self.assertEqual(status, 505)
        self.assertIn("error", data)

    def test_bad_query_parameters(self):
        for query in ("timeout=soon", "timeout=-1", "timeout=nan", "timeout=inf", "limit=0", "limit=1001",
                      "limit=2.5", "after=%ff"):
            with self.subTest(query=query):
                self.assertJSONError(self.get(query), 400)

    def test_error_with_a_quote_is_valid_json(self):
        data = self.assertJSONError(self.get('after="quoted"'), 400)
        self.assertIn('"quoted"', data["error"])


if __name__ == "__main__":
    unittest.main()
