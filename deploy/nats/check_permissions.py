#!/usr/bin/env python3
"""Checks the NATS permissions of deploy/nats/nats-server.conf against a real nats-server.

usage: check_permissions.py [--quiet] [--self-test] NATS_SERVER_BIN PORT
       check_permissions.py --nsc

Starts the server on 127.0.0.1:PORT with that config (monitoring on a free port, JetStream in a
temporary directory), declares the devsync topology as `admin` the way `devsyncctl bootstrap`
does (crates/runtime/src/topology.rs: no DEVSYNC_IN stream; DEVSYNC_FANOUT holds
devsync.fanout.> and devsync.webhook.>), then plays each user's part with the requests
async-nats 0.51 sends for what the services do (raw protocol, not a client's KV or object store
helpers, so what is checked is what the services need):

  * requestor: serves device messages as the queue groups `requestor` / `requestor-refresh`
    and answers on the device's inbox; publishes sync requests, campaign batches, audit events
    and dead letters; runs the DLQ sweeper (`dlq-sweeper`: get + delete in a work stream);
    takes, renews and releases the scheduler lease (KV devsync-members, key lease.scheduler);
    stores and reads claim-checked blobs;
  * reconciler: pulls every reconcile-<lane>-<k> in the priority group `owner`, unpins, acks;
    publishes follow-ups and pushes; heartbeats, lists, reads and deletes its membership keys;
  * fanout: pulls `fanout` and `fanout-webhook`; puts and reads per-device keys of KV
    devsync-desired; reads and watches push_policy in KV devsync-config; notifies devices on
    devsync.out.<id>.desired; queues webhook tasks devsync.webhook.<id>;
  * audit: pulls `audit`; serves devsync.api.audit.search and the $SRV discovery subjects;
  * devices: publish and hear only their own subjects, read only their own desired state;
  * and every user is refused what belongs to someone else, and any JetStream API beyond that.

A refusal passes only once the server's permission error for that exact subject arrived; an
allowed action passes only once its effect is seen (the JetStream acknowledgement from the
expected stream, the message at the receiver, the value read back).

--self-test proves that every check can fail: after the normal run (which must pass), it runs
the same checks against two mutated copies of the config, "open" (every user may publish and
subscribe to everything, anonymous connections land as admin, device-a and device-b share a
password) and "closed" (every user, admin included, may use nothing), and requires each check
to fail in at least one of them.

--nsc prints the `nsc add user` commands for the service users, made from the config, for
operator mode (deploy/nats/README.md).

Prints one line per check and exits 1 on any violation (2 on a usage or start-up error). Each
run is bounded (a minute at most; a few seconds normally) and the server is always stopped.
Needs the `nats-py` package (except --nsc). With CHECK_PERMISSIONS_TRACE=1 the server traces the
protocol and its log is kept as /tmp/check_permissions.log.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable
from pathlib import Path

CONFIG = Path(__file__).resolve().with_name("nats-server.conf")

SERVICES = ("requestor", "reconciler", "fanout", "audit")
DEVICES = ("device-a", "device-b")
# Few partitions keep the test short; the permissions do not depend on the count.
PARTITIONS = 4
LANES = ("rt", "bulk")
RECONCILE_GROUP = "owner"
WORK_STREAMS = ("DEVSYNC_REQ", "DEVSYNC_FANOUT", "DEVSYNC_AUDIT")
BLOBS = "devsync-blobs"
RUN_TIMEOUT = 60.0
START_TIMEOUT = 10.0


class Timing:
    """Timeouts of one run. Mutated runs only need failures, so they wait less."""

    def __init__(self, fast: bool) -> None:
        # How long a request may take.
        self.request = 0.5 if fast else 2.0
        # How long a refusal may take to come back before the action counts as allowed. The
        # server sends the error before the PONG of the flush that follows, so this is a margin.
        self.violation = 0.05 if fast else 1.0


TIMING = Timing(fast=False)


class Denied(Exception):
    """The server refused something an allowed action needed."""


# ------------------------------------------------------------------------------------------
# The config file: users and passwords, mutations for --self-test, nsc commands
# ------------------------------------------------------------------------------------------


def passwords(config_text: str) -> dict[str, str]:
    """user -> password of every static user of the config."""
    found = dict(re.findall(r"user:\s*([\w-]+)\s*,?\s*password:\s*([\w-]+)", config_text))
    if not set(SERVICES) | set(DEVICES) | {"admin"} <= set(found):
        raise ValueError(f"users missing from {CONFIG.name}: {sorted(found)}")
    return found


def block_end(text: str, start: int) -> int:
    """Index just past the `}` matching the `{` at `start` (skips strings and # comments)."""
    depth = 0
    i = start
    while i < len(text):
        ch = text[i]
        if ch == "#":
            i = text.index("\n", i)
            continue
        if ch == '"':
            i = text.index('"', i + 1)
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    raise ValueError("unbalanced braces in the config")


def permission_blocks(text: str) -> list[tuple[str, int, int]]:
    """(user, start, end) of every `permissions: {...}` block, in order."""
    blocks = []
    for match in re.finditer(r"permissions:\s*\{", text):
        users = re.findall(r"user:\s*([\w-]+)", text[: match.start()])
        start = match.end() - 1
        blocks.append((users[-1], match.start(), block_end(text, start)))
    return blocks


def mutate(text: str, mode: str) -> str:
    """The config with every user's permissions opened or closed (see --self-test)."""
    if mode == "open":
        replacement = 'permissions: { publish: { allow: [">"] }, subscribe: { allow: [">"] }, allow_responses: true }'
    else:
        replacement = (
            'permissions: { publish: { allow: ["nothing.at.all"] }, subscribe: { allow: ["nothing.at.all"] } }'
        )
    for user, start, end in reversed(permission_blocks(text)):
        if mode == "open" and user == "admin":
            continue
        text = text[:start] + replacement + text[end:]
    if mode == "open":
        text = text.replace("system_account: SYS", "system_account: SYS\nno_auth_user: admin", 1)
        text = re.sub(r"(user:\s*device-a\s*\n\s*password:\s*)[\w-]+", r"\1device-b-local", text)
    return text


def parse_list(block: str, key: str) -> list[str]:
    match = re.search(key + r":\s*\{\s*allow:\s*\[(.*?)\]", block, re.S)
    if not match:
        return []
    body = "\n".join(line.split("#", 1)[0] for line in match.group(1).splitlines())
    return re.findall(r'"([^"]+)"', body)


def nsc_commands(text: str) -> str:
    """`nsc add user` for every service user, from the config's permission blocks."""
    out = ["# Service users of the account DEVSYNC, signed with the services' signing key."]
    for user, start, end in permission_blocks(text):
        if user not in SERVICES:
            continue
        block = text[start:end]
        args = [f"nsc add user -a DEVSYNC --name {user} -K \"$SK_SERVICES\""]
        args += [f"--allow-pub '{s}'" for s in parse_list(block, "publish")]
        args += [f"--allow-sub '{s}'" for s in parse_list(block, "subscribe")]
        if re.search(r"allow_responses:\s*true", block):
            args.append("--allow-pub-response=1")
        out.append(" \\\n  ".join(args))
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------


class Report:
    """Collects check results; a check is a unique name and a verdict."""

    def __init__(self, quiet: bool = False, silent: bool = False) -> None:
        self.quiet = quiet
        self.silent = silent
        self.results: dict[str, bool] = {}
        self.failures: list[str] = []

    @property
    def passed(self) -> int:
        return sum(self.results.values())

    def record(self, name: str, ok: bool, why: str = "") -> None:
        if name in self.results:
            raise RuntimeError(f"duplicate check name: {name}")
        self.results[name] = ok
        if ok:
            if not (self.quiet or self.silent):
                print(f"  ok    {name}")
        else:
            self.failures.append(f"{name}: {why}")
            if not self.silent:
                print(f"  FAIL  {name}: {why}")

    async def check(self, name: str, probe: Awaitable[None]) -> None:
        """Runs `probe`; any exception is a failure of this check, never of the whole run."""
        try:
            await asyncio.wait_for(probe, TIMING.request * 4)
        except Exception as exc:  # noqa: BLE001 - every error is a verdict here
            self.record(name, False, f"{type(exc).__name__}: {exc}")
        else:
            self.record(name, True)


# ------------------------------------------------------------------------------------------
# One NATS user, speaking the JetStream API the way async-nats does
# ------------------------------------------------------------------------------------------


def status_of(msg) -> str | None:
    return (msg.headers or {}).get("Status")


class User:
    """One connection as one NATS user, remembering the permission errors the server sent."""

    def __init__(self, name: str, nc) -> None:
        self.name = name
        self.nc = nc
        self.errors: list[str] = []

    @classmethod
    async def connect(cls, url: str, name: str, password: str, inbox_prefix: str | None = None) -> User:
        import nats

        errors: list[str] = []

        async def on_error(exc: Exception) -> None:
            errors.append(str(exc))

        options = {"inbox_prefix": inbox_prefix} if inbox_prefix else {}
        nc = await nats.connect(
            url,
            user=name,
            password=password,
            name=f"check-{name}",
            error_cb=on_error,
            allow_reconnect=False,
            connect_timeout=2.0,
            **options,
        )
        user = cls(name, nc)
        user.errors = errors
        return user

    # --- permission errors ------------------------------------------------------------------

    def violation(self, kind: str, subject: str, since: int = 0) -> bool:
        # nats-py lowercases the server's error line.
        wanted = f'permissions violation for {kind} to "{subject}"'.lower()
        return any(wanted in e.lower() for e in self.errors[since:])

    def new_violations(self, since: int) -> list[str]:
        return [e for e in self.errors[since:] if "permissions violation" in e.lower()]

    async def settle(self) -> None:
        """Returns once everything sent so far was processed by the server.

        nats-py writes its PING ahead of commands still in its buffer, so one flush can return
        before an earlier SUB or PUB reached the server; the second PING goes out after them.
        """
        await self.nc.flush(timeout=TIMING.request)
        await self.nc.flush(timeout=TIMING.request)

    async def wait_for_violation(self, kind: str, subject: str, since: int) -> bool:
        """True once the server's permission error for `subject` arrived (bounded wait)."""
        await self.settle()
        deadline = time.monotonic() + TIMING.violation
        while not self.violation(kind, subject, since):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    async def expect_publish_denied(self, subject: str) -> None:
        since = len(self.errors)
        await self.nc.publish(subject, b"{}")
        if not await self.wait_for_violation("publish", subject, since):
            raise AssertionError(f"{self.name} was allowed to publish on {subject}")

    async def expect_subscribe_denied(self, subject: str, queue: str = "") -> None:
        since = len(self.errors)
        sub = await self.nc.subscribe(subject, queue=queue)
        denied = await self.wait_for_violation("subscription", subject, since)
        await sub.unsubscribe()
        if not denied:
            raise AssertionError(f"{self.name} was allowed to subscribe to {subject} {queue}".rstrip())

    async def expect_no_violation(self, since: int) -> None:
        await self.settle()
        if self.new_violations(since):
            raise Denied(f"{self.name}: {self.new_violations(since)}")

    async def subscribe(self, subject: str, queue: str = ""):
        """A subscription the server accepted (a refusal raises Denied at once)."""
        since = len(self.errors)
        sub = await self.nc.subscribe(subject, queue=queue)
        await self.expect_no_violation(since)
        return sub

    async def next_message(self, sub, since: int | None = None):
        """The next message of `sub`; raises Denied as soon as a permission error arrives."""
        deadline = time.monotonic() + TIMING.request
        while True:
            if since is not None and self.new_violations(since):
                raise Denied(f"{self.name}: {self.new_violations(since)}")
            try:
                return await sub.next_msg(timeout=0.05)
            except asyncio.TimeoutError:
                if time.monotonic() >= deadline:
                    raise
            except Exception as exc:  # nats-py raises its own TimeoutError subclass
                if "timeout" not in type(exc).__name__.lower() or time.monotonic() >= deadline:
                    raise

    # --- requests ---------------------------------------------------------------------------

    async def request(self, subject: str, payload: bytes = b"", headers: dict | None = None):
        """Request/reply that fails at once (Denied) when the server refuses any part of it."""
        since = len(self.errors)
        task = asyncio.ensure_future(
            self.nc.request(subject, payload, timeout=TIMING.request, headers=headers)
        )
        while not task.done():
            if self.new_violations(since):
                task.cancel()
                raise Denied(f"{self.name}: {self.new_violations(since)}")
            await asyncio.wait({task}, timeout=0.02)
        return task.result()

    async def api(self, subject: str, body: dict | None = None) -> dict:
        """A JetStream API call; an API error is raised."""
        reply = await self.request(subject, json.dumps(body).encode() if body is not None else b"")
        answer = json.loads(reply.data or b"{}")
        if "error" in answer:
            raise AssertionError(f"{subject}: {answer['error']}")
        return answer

    async def js_publish(self, subject: str, stream: str, payload: bytes = b"{}", headers: dict | None = None) -> int:
        """A JetStream publish that must be stored in `stream`; returns its sequence."""
        reply = await self.request(subject, payload, headers=headers)
        ack = json.loads(reply.data or b"{}")
        if "error" in ack:
            raise AssertionError(f"{subject}: {ack['error']}")
        if ack.get("stream") != stream:
            raise AssertionError(f"{subject} stored in {ack.get('stream')}, expected {stream}")
        return ack["seq"]

    # --- consumers --------------------------------------------------------------------------

    async def fetch(self, stream: str, consumer: str, want: int, group: str | None = None) -> list:
        """Pulls up to `want` messages from a durable pull consumer (what `messages()` sends)."""
        since = len(self.errors)
        inbox = self.nc.new_inbox()
        sub = await self.subscribe(inbox)
        subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        # no_wait: what is stored now, then a 404 status (the services' long pulls use expires;
        # the subject, and so the permission, is the same)
        request = {"batch": want, "no_wait": True}
        if group:
            request["group"] = group
        await self.nc.publish(subject, json.dumps(request).encode(), reply=inbox)
        got = []
        try:
            while len(got) < want:
                try:
                    msg = await self.next_message(sub, since)
                except Denied:
                    raise
                except Exception:  # noqa: BLE001 - nothing more within the request timeout
                    break
                status = status_of(msg)
                if status == "100":
                    continue
                if status:
                    break  # 404 no messages, 408 expired, 409 ...
                got.append(msg)
        finally:
            await sub.unsubscribe()
        return got

    async def ack(self, msg) -> None:
        """Acknowledges a delivery and waits for the server's confirmation (AckSync)."""
        await self.request(msg.reply, b"+ACK")

    async def fetch_and_ack(self, stream: str, consumer: str, want: int, group: str | None = None) -> list:
        got = await self.fetch(stream, consumer, want, group)
        for msg in got:
            await self.ack(msg)
        if len(got) < want:
            raise AssertionError(f"fetched {len(got)} of {want} from {stream}/{consumer}")
        return got

    async def ordered_consumer(
        self, stream: str, filter_subject: str, deliver_policy: str = "all", headers_only: bool = False
    ) -> list:
        """What async-nats' KV watch / keys and object reads do: an unnamed ordered push
        consumer (flow control, heartbeats), read until nothing is pending."""
        since = len(self.errors)
        inbox = self.nc.new_inbox()
        sub = await self.subscribe(inbox)
        config = {
            "deliver_subject": inbox,
            "filter_subject": filter_subject,
            "deliver_policy": deliver_policy,
            "ack_policy": "none",
            "max_deliver": 1,
            "replay_policy": "instant",
            "flow_control": True,
            "idle_heartbeat": 5 * 10**9,
            "headers_only": headers_only,
            "mem_storage": True,
            "num_replicas": 1,
            "inactive_threshold": 30 * 10**9,
        }
        info = await self.api(f"$JS.API.CONSUMER.CREATE.{stream}", {"stream_name": stream, "config": config})
        got = []
        try:
            pending = info.get("num_pending", 0)
            while pending > 0:
                msg = await self.next_message(sub, since)
                if status_of(msg) == "100":
                    if msg.reply and msg.reply.startswith("$JS.FC."):
                        await self.nc.publish(msg.reply, b"")
                    continue
                got.append(msg)
                pending = int(msg.reply.split(".")[-1])  # $JS.ACK.<...>.<pending>
            await self.expect_no_violation(since)
        finally:
            await sub.unsubscribe()
        return got

    # --- KV, as async-nats' kv::Store does it (allow_direct buckets) ------------------------

    async def kv_get(self, bucket: str, key: str):
        """Store::entry: a direct get of the key's last message; None when absent."""
        msg = await self.request(f"$JS.API.DIRECT.GET.KV_{bucket}.$KV.{bucket}.{key}")
        if status_of(msg) == "404":
            return None
        if status_of(msg):
            raise AssertionError(f"direct get {bucket}/{key}: status {status_of(msg)}")
        return msg

    async def kv_put(self, bucket: str, key: str, value: bytes, expect_revision: int | None = None) -> int:
        """Store::put (no expectation), Store::create (revision 0), Store::update (revision n)."""
        headers = None
        if expect_revision is not None:
            headers = {"Nats-Expected-Last-Subject-Sequence": str(expect_revision)}
        return await self.js_publish(f"$KV.{bucket}.{key}", f"KV_{bucket}", value, headers)

    async def kv_delete(self, bucket: str, key: str, expect_revision: int | None = None) -> int:
        headers = {"KV-Operation": "DEL"}
        if expect_revision is not None:
            headers["Nats-Expected-Last-Subject-Sequence"] = str(expect_revision)
        return await self.js_publish(f"$KV.{bucket}.{key}", f"KV_{bucket}", b"", headers)

    async def kv_keys(self, bucket: str) -> set[str]:
        """Store::keys: a headers-only ordered consumer, last message per key."""
        messages = await self.ordered_consumer(
            f"KV_{bucket}", f"$KV.{bucket}.>", deliver_policy="last_per_subject", headers_only=True
        )
        prefix = f"$KV.{bucket}."
        return {
            m.subject[len(prefix) :]
            for m in messages
            if (m.headers or {}).get("KV-Operation") not in ("DEL", "PURGE")
        }

    # --- the object store, as async-nats' object_store::ObjectStore does it ----------------

    async def obj_info(self, name: str) -> dict | None:
        meta = base64.urlsafe_b64encode(name.encode()).decode()
        msg = await self.request(f"$JS.API.DIRECT.GET.OBJ_{BLOBS}.$O.{BLOBS}.M.{meta}")
        if status_of(msg) == "404":
            return None
        return json.loads(msg.data)

    async def obj_put(self, name: str, data: bytes) -> None:
        existing = await self.obj_info(name)
        nuid = secrets.token_hex(11)
        await self.js_publish(f"$O.{BLOBS}.C.{nuid}", f"OBJ_{BLOBS}", data)
        meta = base64.urlsafe_b64encode(name.encode()).decode()
        info = {
            "name": name,
            "bucket": BLOBS,
            "nuid": nuid,
            "size": len(data),
            "chunks": 1,
            "digest": "SHA-256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode(),
        }
        await self.js_publish(
            f"$O.{BLOBS}.M.{meta}", f"OBJ_{BLOBS}", json.dumps(info).encode(), headers={"Nats-Rollup": "sub"}
        )
        if existing:
            await self.api(f"$JS.API.STREAM.PURGE.OBJ_{BLOBS}", {"filter": f"$O.{BLOBS}.C.{existing['nuid']}"})

    async def obj_get(self, name: str) -> bytes:
        info = await self.obj_info(name)
        if info is None:
            raise AssertionError(f"no object {name}")
        chunks = await self.ordered_consumer(f"OBJ_{BLOBS}", f"$O.{BLOBS}.C.{info['nuid']}")
        return b"".join(m.data for m in chunks)

    async def close(self) -> None:
        if not self.nc.is_closed:
            await self.nc.close()


async def ignore(_exc: Exception) -> None:
    """Error callback for connections expected to be refused (keeps nats-py quiet)."""


# ------------------------------------------------------------------------------------------
# Topology, declared by admin as `devsyncctl bootstrap` does (crates/runtime/src/topology.rs)
# ------------------------------------------------------------------------------------------


def stream(name: str, subjects: list[str], retention: str = "workqueue", **extra) -> dict:
    config = {
        "name": name,
        "subjects": subjects,
        "retention": retention,
        "storage": "file",
        "num_replicas": 1,
        "discard": "new" if retention == "workqueue" else "old",
        "max_age": 7 * 24 * 3600 * 10**9,
        "duplicate_window": 120 * 10**9,
    }
    config.update(extra)
    return config


def kv(bucket: str, history: int) -> dict:
    return {
        "name": f"KV_{bucket}",
        "subjects": [f"$KV.{bucket}.>"],
        "retention": "limits",
        "storage": "file",
        "num_replicas": 1,
        "max_msgs_per_subject": history,
        "discard": "new",
        "allow_rollup_hdrs": True,
        "deny_delete": True,
        "allow_direct": True,
    }


TOPOLOGY = [
    stream(
        "DEVSYNC_REQ",
        ["devsync.req.*.*"],
        subject_transform={
            "src": "devsync.req.*.*",
            "dest": f"devsync.req.{{{{wildcard(1)}}}}.{{{{partition({PARTITIONS},2)}}}}.{{{{wildcard(2)}}}}",
        },
        allow_msg_ttl=True,
    ),
    stream("DEVSYNC_FANOUT", ["devsync.fanout.>", "devsync.webhook.>"]),
    stream("DEVSYNC_AUDIT", ["devsync.audit.>"]),
    stream("DEVSYNC_DLQ", ["devsync.dlq.>"], retention="limits", allow_direct=True),
    stream(
        "DEVSYNC_ADVISORIES",
        [f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{s}.*" for s in WORK_STREAMS],
    ),
    kv("devsync-desired", 1),
    kv("devsync-members", 1),
    kv("devsync-config", 10),
    {
        "name": f"OBJ_{BLOBS}",
        "subjects": [f"$O.{BLOBS}.C.>", f"$O.{BLOBS}.M.>"],
        "retention": "limits",
        "storage": "file",
        "num_replicas": 1,
        "discard": "new",
        "allow_rollup_hdrs": True,
        "allow_direct": True,
    },
]


def durable_consumers() -> list[tuple[str, str, str, bool]]:
    """(stream, consumer, filter, pinned) of every durable consumer bootstrap declares."""
    consumers = [
        ("DEVSYNC_FANOUT", "fanout", "devsync.fanout.>", False),
        ("DEVSYNC_FANOUT", "fanout-webhook", "devsync.webhook.>", False),
        ("DEVSYNC_AUDIT", "audit", "devsync.audit.>", False),
        ("DEVSYNC_ADVISORIES", "dlq-sweeper", "", False),
    ]
    for lane in LANES:
        for k in range(PARTITIONS):
            consumers.append(("DEVSYNC_REQ", f"reconcile-{lane}-{k}", f"devsync.req.{lane}.{k}.*", True))
    return consumers


async def bootstrap(admin: User) -> None:
    for config in TOPOLOGY:
        await admin.api(f"$JS.API.STREAM.CREATE.{config['name']}", config)
    for stream_name, name, filter_subject, pinned in durable_consumers():
        config = {
            "durable_name": name,
            "name": name,
            "deliver_policy": "all",
            "ack_policy": "explicit",
            "ack_wait": 30 * 10**9,
            "max_deliver": 10,
            "max_ack_pending": 5000,
        }
        subject = f"$JS.API.CONSUMER.CREATE.{stream_name}.{name}"
        if filter_subject:
            config["filter_subject"] = filter_subject
            subject += f".{filter_subject}"
        if pinned:
            config.update(
                priority_policy="pinned_client", priority_groups=[RECONCILE_GROUP], priority_timeout=6 * 10**9
            )
        await admin.api(subject, {"stream_name": stream_name, "config": config, "action": "create"})


async def verify_topology(user: User) -> None:
    """What Topology::verify asks: info on every stream, bucket and consumer."""
    for config in TOPOLOGY:
        await user.api(f"$JS.API.STREAM.INFO.{config['name']}")
    for stream_name, consumer, _, _ in durable_consumers():
        await user.api(f"$JS.API.CONSUMER.INFO.{stream_name}.{consumer}")


def partition_subject(lane: str, device: str, msg) -> bool:
    return re.fullmatch(rf"devsync\.req\.{lane}\.\d+\.{re.escape(device)}", msg.subject) is not None


# ------------------------------------------------------------------------------------------
# The checks
# ------------------------------------------------------------------------------------------


async def run_checks(url: str, pw: dict[str, str], report: Report) -> None:
    users: dict[str, User] = {}
    try:
        for name in ("admin", *SERVICES):
            users[name] = await User.connect(url, name, pw[name])
        for device in DEVICES:
            users[device] = await User.connect(url, device, pw[device], inbox_prefix=f"devsync.inbox.{device}")
        await scenario(url, pw, users, report)
    finally:
        for user in users.values():
            await user.close()


async def scenario(url: str, pw: dict[str, str], users: dict[str, User], report: Report) -> None:
    import nats

    admin = users["admin"]
    requestor, reconciler = users["requestor"], users["reconciler"]
    fanout, audit = users["fanout"], users["audit"]
    dev_a, dev_b = users["device-a"], users["device-b"]
    check = report.check

    async def refused(user: User, subjects: list[str]) -> None:
        for subject in subjects:
            await check(f"{user.name} refused: publish {subject}", user.expect_publish_denied(subject))

    async def refused_sub(user: User, subjects: list[str], queue: str = "") -> None:
        for subject in subjects:
            label = f"{subject} (queue {queue})" if queue else subject
            await check(f"{user.name} refused: subscribe {label}", user.expect_subscribe_denied(subject, queue))

    # --- authentication ---------------------------------------------------------------------
    async def refused_connection(**credentials) -> None:
        try:
            nc = await nats.connect(
                url, allow_reconnect=False, connect_timeout=TIMING.request, error_cb=ignore, **credentials
            )
        except Exception:  # noqa: BLE001 - refused, as wanted
            return
        await nc.close()
        raise AssertionError(f"connection accepted with {credentials or 'no credentials'}")

    await check("anonymous connection refused", refused_connection())
    await check(
        "device-a refused with device-b's password",
        refused_connection(user="device-a", password=pw["device-b"]),
    )

    # --- bootstrap as admin ------------------------------------------------------------------
    await check("admin declares the topology (streams, consumers, KV, object store)", bootstrap(admin))

    # --- every service verifies the whole topology and declares none of it -------------------
    for name in SERVICES:
        user = users[name]
        await check(f"{name} verifies the topology (info on every stream and consumer)", verify_topology(user))
    await refused(
        requestor,
        [
            "$JS.API.INFO",
            "$JS.API.STREAM.NAMES",
            "$JS.API.STREAM.CREATE.DEVSYNC_IN",
            "$JS.API.STREAM.UPDATE.DEVSYNC_REQ",
            "$JS.API.STREAM.DELETE.DEVSYNC_AUDIT",
            "$JS.API.STREAM.PURGE.DEVSYNC_FANOUT",
            "$JS.API.CONSUMER.CREATE.DEVSYNC_ADVISORIES.dlq-sweeper",
            "$JS.API.CONSUMER.DELETE.DEVSYNC_ADVISORIES.dlq-sweeper",
        ],
    )
    await refused(
        reconciler,
        [
            "$JS.API.STREAM.CREATE.DEVSYNC_REQ",
            "$JS.API.STREAM.DELETE.DEVSYNC_REQ",
            "$JS.API.STREAM.PURGE.DEVSYNC_REQ",
            "$JS.API.CONSUMER.CREATE.DEVSYNC_REQ.reconcile-rt-0",
            "$JS.API.CONSUMER.DURABLE.CREATE.DEVSYNC_REQ.reconcile-rt-0",
            "$JS.API.CONSUMER.DELETE.DEVSYNC_REQ.reconcile-rt-0",
        ],
    )
    await refused(
        fanout,
        [
            "$JS.API.STREAM.UPDATE.DEVSYNC_FANOUT",
            "$JS.API.STREAM.PURGE.DEVSYNC_FANOUT",
            "$JS.API.CONSUMER.CREATE.DEVSYNC_FANOUT.fanout",
            "$JS.API.CONSUMER.CREATE.DEVSYNC_FANOUT.sneaky",
            "$JS.API.CONSUMER.DELETE.DEVSYNC_FANOUT.fanout-webhook",
        ],
    )
    await refused(
        audit,
        [
            "$JS.API.STREAM.CREATE.DEVSYNC_DLQ",
            "$JS.API.STREAM.PURGE.DEVSYNC_AUDIT",
            "$JS.API.CONSUMER.CREATE.DEVSYNC_AUDIT.audit",
            "$JS.API.CONSUMER.CREATE.DEVSYNC_DLQ.sneaky",
        ],
    )

    # --- requestor: the front door -------------------------------------------------------------
    async def requestor_serves_device() -> None:
        # A device request on devsync.in.<id>.<kind> reaches the queue group `requestor`, becomes
        # durable in DEVSYNC_REQ, and only then is answered on the device's own inbox.
        served = await requestor.subscribe("devsync.in.>", queue="requestor")
        await dev_a.settle()
        since = len(requestor.errors)

        async def serve() -> None:
            msg = await requestor.next_message(served, since)
            if msg.subject != "devsync.in.device-a.report":
                raise AssertionError(f"requestor got {msg.subject}")
            await requestor.js_publish("devsync.req.rt.device-a", "DEVSYNC_REQ")
            await msg.respond(b"accepted")

        server = asyncio.ensure_future(serve())
        try:
            reply = await dev_a.request("devsync.in.device-a.report", b"{}")
            await server
        finally:
            server.cancel()
            await served.unsubscribe()
        if reply.data != b"accepted" or not reply.subject.startswith("devsync.inbox.device-a."):
            raise AssertionError(f"device-a got {reply.data!r} on {reply.subject}")
        await requestor.expect_no_violation(since)

    await check(
        "device-a's report reaches queue group `requestor`, is stored in DEVSYNC_REQ and answered on "
        "devsync.inbox.device-a.*",
        requestor_serves_device(),
    )

    async def requestor_serves_refresh() -> None:
        served = await requestor.subscribe("devsync.in.*.refresh", queue="requestor-refresh")
        since = len(requestor.errors)

        async def serve() -> None:
            msg = await requestor.next_message(served, since)
            await msg.respond(b"up-to-date")

        server = asyncio.ensure_future(serve())
        try:
            reply = await dev_b.request("devsync.in.device-b.refresh", b"{}")
            await server
        finally:
            server.cancel()
            await served.unsubscribe()
        if reply.data != b"up-to-date":
            raise AssertionError(reply.data)

    await check(
        "device-b's refresh reaches queue group `requestor-refresh` and is answered", requestor_serves_refresh()
    )
    await refused_sub(requestor, ["devsync.in.>", "devsync.out.>", "devsync.inbox.>", "devsync.webhook.>"])
    await refused_sub(requestor, ["devsync.in.>"], queue="snoop")
    await refused_sub(requestor, ["devsync.in.*.report"], queue="requestor-refresh")

    await check(
        "requestor publishes a drift re-push devsync.req.bulk.<device> into DEVSYNC_REQ",
        requestor.js_publish("devsync.req.bulk.device-b", "DEVSYNC_REQ"),
    )
    await check(
        "requestor publishes a campaign batch devsync.fanout.wave.c1 into DEVSYNC_FANOUT",
        requestor.js_publish("devsync.fanout.wave.c1", "DEVSYNC_FANOUT"),
    )
    await check(
        "requestor publishes devsync.audit.requestor into DEVSYNC_AUDIT",
        requestor.js_publish("devsync.audit.requestor", "DEVSYNC_AUDIT"),
    )
    await check(
        "requestor dead-letters a refused device message (devsync.dlq.ingress)",
        requestor.js_publish("devsync.dlq.ingress", "DEVSYNC_DLQ"),
    )

    async def scheduler_lease() -> None:
        # devsync_runtime::lease: create (only if absent), a rival's create is refused by
        # JetStream (not by permissions), get, update on the held revision, delete on release,
        # and create again over the delete marker (entry, then update).
        bucket, key = "devsync-members", "lease.scheduler"
        taken = await requestor.kv_put(bucket, key, b"requestor-0", expect_revision=0)
        try:
            await requestor.kv_put(bucket, key, b"requestor-1", expect_revision=0)
        except AssertionError as exc:
            if "wrong last sequence" not in str(exc):
                raise
        else:
            raise AssertionError("a second create of the lease succeeded")
        entry = await requestor.kv_get(bucket, key)
        if entry is None or entry.data != b"requestor-0":
            raise AssertionError(f"lease entry {entry and entry.data!r}")
        renewed = await requestor.kv_put(bucket, key, b"requestor-0", expect_revision=taken)
        released = await requestor.kv_delete(bucket, key, expect_revision=renewed)
        entry = await requestor.kv_get(bucket, key)
        if entry is None or (entry.headers or {}).get("KV-Operation") != "DEL":
            raise AssertionError("the released lease is not a delete marker")
        await requestor.kv_put(bucket, key, b"requestor-1", expect_revision=released)

    await check(
        "requestor takes, renews and releases the scheduler lease (KV devsync-members lease.scheduler)",
        scheduler_lease(),
    )

    async def requestor_claim_check() -> None:
        blob = b"r" * 20_000
        await requestor.obj_put("claim-requestor", blob)
        await requestor.obj_put("claim-requestor", blob)  # again: purges the old chunks
        if await requestor.obj_get("claim-requestor") != blob:
            raise AssertionError("blob read back differs")

    await check("requestor puts (twice) and gets a claim-check blob in devsync-blobs", requestor_claim_check())

    async def requestor_sweeps() -> None:
        # A message that ran out of deliveries in DEVSYNC_FANOUT: its advisory is captured by
        # DEVSYNC_ADVISORIES; the sweeper copies the message to the DLQ, deletes it, acks.
        seq = await admin.js_publish("devsync.webhook.device-z", "DEVSYNC_FANOUT")
        advisory = {"stream": "DEVSYNC_FANOUT", "consumer": "fanout-webhook", "stream_seq": seq, "deliveries": 10}
        await admin.js_publish(
            "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.DEVSYNC_FANOUT.fanout-webhook",
            "DEVSYNC_ADVISORIES",
            json.dumps(advisory).encode(),
        )
        (msg,) = await requestor.fetch_and_ack("DEVSYNC_ADVISORIES", "dlq-sweeper", 1)
        found = json.loads(msg.data)
        original = await requestor.api(
            f"$JS.API.STREAM.MSG.GET.{found['stream']}", {"seq": found["stream_seq"]}
        )
        if original["message"]["subject"] != "devsync.webhook.device-z":
            raise AssertionError(original)
        await requestor.js_publish("devsync.dlq.devsync_fanout", "DEVSYNC_DLQ")
        deleted = await requestor.api(f"$JS.API.STREAM.MSG.DELETE.{found['stream']}", {"seq": found["stream_seq"]})
        if not deleted.get("success"):
            raise AssertionError(deleted)

    await check(
        "requestor (DLQ sweeper) pulls dlq-sweeper, copies a dead message to the DLQ and deletes it",
        requestor_sweeps(),
    )
    await refused(
        requestor,
        [
            "devsync.in.device-a.report",
            "devsync.out.device-a.desired",
            "devsync.fanout.push.device-a",
            "devsync.webhook.device-a",
            "devsync.audit.fanout",
            "devsync.dlq.a.b",
            "$KV.devsync-members.reconciler.r-0",
            "$KV.devsync-members.lease.other",
            "$KV.devsync-desired.device-a",
            "$KV.devsync-config.push_policy",
            "$JS.API.DIRECT.GET.KV_devsync-members.$KV.devsync-members.reconciler.r-0",
            "$JS.API.DIRECT.GET.KV_devsync-desired.$KV.devsync-desired.device-a",
            "$JS.API.STREAM.MSG.GET.KV_devsync-members",
            "$JS.API.CONSUMER.CREATE.KV_devsync-members",
            "$JS.API.CONSUMER.MSG.NEXT.DEVSYNC_FANOUT.fanout",
            "$JS.API.CONSUMER.MSG.NEXT.DEVSYNC_REQ.reconcile-rt-0",
            "$JS.API.STREAM.MSG.DELETE.DEVSYNC_DLQ",
            "$JS.API.STREAM.MSG.GET.DEVSYNC_DLQ",
        ],
    )

    # --- reconciler -----------------------------------------------------------------------------
    async def reconciler_owns_partitions() -> None:
        # The replicas bind every reconcile-<lane>-<k> (consumer info) and pull in the pinned
        # group; the requestor's two requests are found, each in its partition.
        found = []
        for lane in LANES:
            for k in range(PARTITIONS):
                consumer = f"reconcile-{lane}-{k}"
                await reconciler.api(f"$JS.API.CONSUMER.INFO.DEVSYNC_REQ.{consumer}")
                for msg in await reconciler.fetch("DEVSYNC_REQ", consumer, 5, group=RECONCILE_GROUP):
                    if not msg.subject.startswith(f"devsync.req.{lane}.{k}."):
                        raise AssertionError(f"{consumer} delivered {msg.subject}")
                    await reconciler.ack(msg)
                    found.append(msg)
        if not (
            any(partition_subject("rt", "device-a", m) for m in found)
            and any(partition_subject("bulk", "device-b", m) for m in found)
        ):
            raise AssertionError(f"found {[m.subject for m in found]}")

    await check(
        "reconciler pulls reconcile-<lane>-<k> (group owner) on DEVSYNC_REQ and acks",
        reconciler_owns_partitions(),
    )

    async def reconciler_unpins() -> None:
        # owner.rs, when a partition moves away: unpin the group so a standby takes over now.
        answer = await reconciler.api(
            "$JS.API.CONSUMER.UNPIN.DEVSYNC_REQ.reconcile-rt-0", {"group": RECONCILE_GROUP}
        )
        if answer.get("type") != "io.nats.jetstream.api.v1.consumer_unpin_response":
            raise AssertionError(answer)

    await check("reconciler unpins a partition it hands over", reconciler_unpins())
    await check(
        "reconciler publishes a follow-up stage devsync.req.rt.<device>",
        reconciler.js_publish("devsync.req.rt.device-a", "DEVSYNC_REQ"),
    )
    await check(
        "reconciler publishes devsync.fanout.push.<device> into DEVSYNC_FANOUT",
        reconciler.js_publish("devsync.fanout.push.device-a", "DEVSYNC_FANOUT"),
    )
    await check(
        "reconciler publishes devsync.audit.reconciler",
        reconciler.js_publish("devsync.audit.reconciler", "DEVSYNC_AUDIT"),
    )
    await check(
        "reconciler dead-letters devsync.dlq.devsync_req",
        reconciler.js_publish("devsync.dlq.devsync_req", "DEVSYNC_DLQ"),
    )

    async def reconciler_membership() -> None:
        # membership.rs: put its heartbeat, list every key, read each reconciler.* member,
        # delete its own.
        bucket = "devsync-members"
        await reconciler.kv_put(bucket, "reconciler.r-0", b"r-0")
        await reconciler.kv_put(bucket, "reconciler.r-1", b"r-1")
        keys = await reconciler.kv_keys(bucket)
        if not {"reconciler.r-0", "reconciler.r-1", "lease.scheduler"} <= keys:
            raise AssertionError(f"keys: {keys}")
        for key in sorted(k for k in keys if k.startswith("reconciler.")):
            entry = await reconciler.kv_get(bucket, key)
            if entry is None or entry.data != key.split(".", 1)[1].encode():
                raise AssertionError(f"cannot read {key}")
        await reconciler.kv_delete(bucket, "reconciler.r-0")

    await check(
        "reconciler heartbeats, lists, reads and deletes members (KV devsync-members reconciler.*)",
        reconciler_membership(),
    )

    async def reconciler_loads_blob() -> None:
        if await reconciler.obj_get("claim-requestor") != b"r" * 20_000:
            raise AssertionError("blob differs")
        await reconciler.obj_put("claim-reconciler", b"d" * 10_000)

    await check("reconciler loads the requestor's blob and stores its own", reconciler_loads_blob())
    await refused(
        reconciler,
        [
            "devsync.in.device-a.report",
            "devsync.inbox.device-a.x",
            "devsync.out.device-a.desired",
            "devsync.fanout.wave.c1",
            "devsync.webhook.device-a",
            "devsync.audit.requestor",
            "$KV.devsync-members.lease.scheduler",
            "$KV.devsync-members.r-0",
            "$KV.devsync-desired.device-a",
            "$KV.devsync-config.push_policy",
            "$JS.API.DIRECT.GET.KV_devsync-members.$KV.devsync-members.lease.scheduler",
            "$JS.API.DIRECT.GET.KV_devsync-desired.$KV.devsync-desired.device-a",
            "$JS.API.DIRECT.GET.KV_devsync-config.$KV.devsync-config.push_policy",
            "$JS.API.CONSUMER.CREATE.KV_devsync-config",
            "$JS.API.CONSUMER.MSG.NEXT.DEVSYNC_FANOUT.fanout",
            "$JS.API.CONSUMER.MSG.NEXT.DEVSYNC_ADVISORIES.dlq-sweeper",
            "$JS.API.STREAM.MSG.DELETE.DEVSYNC_REQ",
        ],
    )
    await refused_sub(reconciler, ["devsync.in.>"], queue="requestor")

    # --- fan-out --------------------------------------------------------------------------------
    async def fanout_consumes() -> None:
        got = await fanout.fetch_and_ack("DEVSYNC_FANOUT", "fanout", 2)
        subjects = sorted(m.subject for m in got)
        if subjects != ["devsync.fanout.push.device-a", "devsync.fanout.wave.c1"]:
            raise AssertionError(subjects)

    await check("fanout pulls `fanout` (a push and a campaign batch) and acks", fanout_consumes())

    async def fanout_writes_desired() -> None:
        for device in DEVICES:
            await fanout.kv_put("devsync-desired", device, json.dumps({"v": device}).encode())
        entry = await fanout.kv_get("devsync-desired", "device-b")
        if entry is None or json.loads(entry.data) != {"v": "device-b"}:
            raise AssertionError(entry and entry.data)

    await check("fanout puts and reads back per-device keys of KV devsync-desired", fanout_writes_desired())

    async def fanout_notifies_device() -> None:
        since, fanout_since = len(dev_a.errors), len(fanout.errors)
        notes = await dev_a.subscribe("devsync.out.device-a.>")
        await fanout.nc.publish("devsync.out.device-a.desired", b"v2")
        try:
            msg = await dev_a.next_message(notes, since)
        finally:
            await notes.unsubscribe()
        if msg.data != b"v2":
            raise AssertionError(msg.data)
        await fanout.expect_no_violation(fanout_since)

    await check(
        "fanout notifies device-a on devsync.out.device-a.desired (device-a receives it)", fanout_notifies_device()
    )

    async def fanout_webhooks() -> None:
        await fanout.js_publish("devsync.webhook.device-a", "DEVSYNC_FANOUT")
        (msg,) = await fanout.fetch_and_ack("DEVSYNC_FANOUT", "fanout-webhook", 1)
        if msg.subject != "devsync.webhook.device-a":
            raise AssertionError(msg.subject)

    await check(
        "fanout queues devsync.webhook.<device> and pulls it from `fanout-webhook`", fanout_webhooks()
    )
    await check("fanout publishes devsync.audit.fanout", fanout.js_publish("devsync.audit.fanout", "DEVSYNC_AUDIT"))
    await check(
        "fanout dead-letters devsync.dlq.devsync_fanout",
        fanout.js_publish("devsync.dlq.devsync_fanout", "DEVSYNC_DLQ"),
    )

    async def fanout_push_policy() -> None:
        # policy.rs: get push_policy, then watch it (with history).
        await admin.kv_put("devsync-config", "push_policy", b"push-active")
        entry = await fanout.kv_get("devsync-config", "push_policy")
        if entry is None or entry.data != b"push-active":
            raise AssertionError(entry and entry.data)
        seen = await fanout.ordered_consumer(
            "KV_devsync-config", "$KV.devsync-config.push_policy", deliver_policy="last_per_subject"
        )
        if [m.data for m in seen] != [b"push-active"]:
            raise AssertionError([m.data for m in seen])

    await check("fanout reads and watches push_policy in KV devsync-config", fanout_push_policy())

    async def fanout_blobs() -> None:
        if await fanout.obj_get("claim-reconciler") != b"d" * 10_000:
            raise AssertionError("blob differs")
        await fanout.obj_put("claim-fanout", b"f" * 30_000)
        if await fanout.obj_get("claim-fanout") != b"f" * 30_000:
            raise AssertionError("blob differs")

    await check("fanout gets and puts claim-check blobs in devsync-blobs", fanout_blobs())
    await refused(
        fanout,
        [
            "devsync.in.device-a.report",
            "devsync.in.x.report",
            "devsync.req.rt.device-a",
            "devsync.fanout.wave.c1",
            "devsync.fanout.push.device-a",
            "devsync.inbox.device-a.x",
            "devsync.out.device-a.other",
            "devsync.audit.reconciler",
            "$KV.devsync-members.lease.scheduler",
            "$KV.devsync-config.push_policy",
            "$KV.devsync-desired.a.b",
            "$JS.API.DIRECT.GET.KV_devsync-config.$KV.devsync-config.rollout",
            "$JS.API.DIRECT.GET.KV_devsync-members.$KV.devsync-members.lease.scheduler",
            "$JS.API.CONSUMER.CREATE.KV_devsync-desired",
            "$JS.API.CONSUMER.MSG.NEXT.DEVSYNC_AUDIT.audit",
            "$JS.API.CONSUMER.MSG.NEXT.DEVSYNC_REQ.reconcile-rt-0",
        ],
    )
    await refused_sub(fanout, ["devsync.in.>", "devsync.inbox.>"])

    # --- audit ----------------------------------------------------------------------------------
    async def audit_consumes() -> None:
        got = await audit.fetch_and_ack("DEVSYNC_AUDIT", "audit", 3)
        subjects = sorted(m.subject for m in got)
        if subjects != ["devsync.audit.fanout", "devsync.audit.reconciler", "devsync.audit.requestor"]:
            raise AssertionError(subjects)

    await check("audit pulls `audit` (events of three services) and acks", audit_consumes())

    async def audit_serves_search() -> None:
        since = len(audit.errors)
        endpoint = await audit.subscribe("devsync.api.audit.search", queue="q")
        discovery = [
            await audit.subscribe(subject)
            for subject in ("$SRV.PING", "$SRV.INFO.devsync-audit", "$SRV.STATS.devsync-audit.abc123")
        ]

        async def serve() -> None:
            msg = await audit.next_message(endpoint, since)
            await msg.respond(b"[]")  # to the caller's _INBOX: allowed by allow_responses

        server = asyncio.ensure_future(serve())
        try:
            reply = await admin.request("devsync.api.audit.search", b"{}")
            await server
        finally:
            server.cancel()
            await endpoint.unsubscribe()
            for sub in discovery:
                await sub.unsubscribe()
        if reply.data != b"[]":
            raise AssertionError(reply.data)
        await audit.expect_no_violation(since)

    await check("audit serves devsync.api.audit.search and the $SRV discovery subjects", audit_serves_search())
    await check(
        "audit dead-letters a poison event (devsync.dlq.devsync_audit)",
        audit.js_publish("devsync.dlq.devsync_audit", "DEVSYNC_DLQ"),
    )
    await refused(
        audit,
        [
            "_INBOX.not-a-request",
            "devsync.audit.audit",
            "devsync.audit.requestor",
            "devsync.req.rt.device-a",
            "devsync.out.device-a.desired",
            "devsync.inbox.device-a.x",
            "$KV.devsync-desired.device-a",
            f"$O.{BLOBS}.C.x",
            f"$JS.API.DIRECT.GET.OBJ_{BLOBS}.$O.{BLOBS}.M.x",
            f"$JS.API.CONSUMER.CREATE.OBJ_{BLOBS}",
            "$JS.API.CONSUMER.MSG.NEXT.DEVSYNC_FANOUT.fanout",
        ],
    )
    await refused_sub(audit, ["devsync.api.>", "$SRV.PING.other-service", "devsync.in.>"])

    # --- devices --------------------------------------------------------------------------------
    async def device_reads_own_desired() -> None:
        msg = await dev_a.request("$JS.API.DIRECT.GET.KV_devsync-desired.$KV.devsync-desired.device-a")
        headers = msg.headers or {}
        if headers.get("Nats-Subject") != "$KV.devsync-desired.device-a" or json.loads(msg.data) != {"v": "device-a"}:
            raise AssertionError(f"unexpected direct get answer: {headers} {msg.data!r}")
        if not msg.subject.startswith("devsync.inbox.device-a."):
            raise AssertionError(f"answer on {msg.subject}")

    await check(
        "device-a reads its own desired state (KV direct get, answer on its own inbox)", device_reads_own_desired()
    )
    await refused(
        dev_a,
        [
            "devsync.in.device-b.report",
            "devsync.in.device-a",  # not under its own prefix's wildcard level
            "devsync.req.rt.device-a",
            "devsync.fanout.push.device-a",
            "devsync.webhook.device-a",
            "devsync.audit.device-a",
            "devsync.out.device-a.desired",
            "devsync.inbox.device-b.x",
            "$KV.devsync-desired.device-a",
            "$JS.API.INFO",
            "$JS.API.STREAM.NAMES",
            "$JS.API.STREAM.LIST",
            "$JS.API.STREAM.INFO.KV_devsync-desired",
            "$JS.API.STREAM.CREATE.DEVSYNC_IN",
            "$JS.API.STREAM.MSG.GET.KV_devsync-desired",
            "$JS.API.STREAM.PURGE.KV_devsync-desired",
            "$JS.API.STREAM.DELETE.DEVSYNC_REQ",
            "$JS.API.DIRECT.GET.KV_devsync-desired",
            "$JS.API.DIRECT.GET.KV_devsync-desired.$KV.devsync-desired.device-b",
            "$JS.API.DIRECT.GET.KV_devsync-desired.$KV.devsync-desired.*",
            "$JS.API.DIRECT.GET.KV_devsync-desired.$KV.devsync-desired.>",
            "$JS.API.CONSUMER.CREATE.KV_devsync-desired",
            "$JS.API.CONSUMER.MSG.NEXT.DEVSYNC_FANOUT.fanout",
            "$JS.ACK.DEVSYNC_FANOUT.fanout.1.1.1.1.1",
        ],
    )
    await refused_sub(
        dev_a,
        [
            "devsync.out.device-b.>",
            "devsync.out.*.desired",
            "devsync.inbox.device-b.>",
            "devsync.inbox.>",
            "_INBOX.>",
            "devsync.in.>",
            "$KV.devsync-desired.>",
            ">",
        ],
    )

    async def device_b_own_notification() -> None:
        since = len(dev_b.errors)
        notes = await dev_b.subscribe("devsync.out.device-b.>")
        await fanout.nc.publish("devsync.out.device-b.desired", b"for-b")
        try:
            msg = await dev_b.next_message(notes, since)
        finally:
            await notes.unsubscribe()
        if msg.data != b"for-b":
            raise AssertionError(msg.data)

    await check("device-b receives its own notification", device_b_own_notification())
    await refused(
        dev_b,
        [
            "devsync.in.device-a.report",
            "$JS.API.DIRECT.GET.KV_devsync-desired.$KV.devsync-desired.device-a",
        ],
    )
    await refused_sub(dev_b, ["devsync.out.device-a.>", "devsync.inbox.device-a.>"])


# ------------------------------------------------------------------------------------------
# Server lifecycle
# ------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"nats-server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nats-server did not listen on {port} within {timeout}s")


class StartError(Exception):
    pass


def run_once(binary: str, port: int, config_text: str, report: Report, label: str) -> None:
    """Starts a server with `config_text`, runs every check into `report`, stops the server."""
    store = Path(tempfile.mkdtemp(prefix="devsync-nats-check-"))
    log_path = store / "nats-server.log"
    # The server refuses --store_dir next to a store_dir in the file: run a copy of the config
    # that differs only in its store_dir.
    text, count = re.subn(r"(?m)^(\s*store_dir:).*$", lambda m: f'{m.group(1)} "{store / "js"}"', config_text)
    if count != 1:
        raise StartError(f"expected one store_dir in {CONFIG}")
    config = store / CONFIG.name
    config.write_text(text)
    cmd = [
        binary,
        "-c",
        str(config),
        "-a",
        "127.0.0.1",
        "-p",
        str(port),
        "-m",
        str(free_port()),
        "-l",
        str(log_path),
        *(["-DV"] if os.environ.get("CHECK_PERMISSIONS_TRACE") else []),
    ]
    print(f"check_permissions: {Path(binary).name} on 127.0.0.1:{port} with {CONFIG.name} ({label})")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        try:
            wait_for_port(port, proc, START_TIMEOUT)
        except RuntimeError as exc:
            tail = log_path.read_text()[-2000:] if log_path.exists() else ""
            raise StartError(f"{exc}\n{tail}") from exc
        url = f"nats://127.0.0.1:{port}"
        try:
            asyncio.run(asyncio.wait_for(run_checks(url, passwords(text), report), RUN_TIMEOUT))
        except (TimeoutError, asyncio.TimeoutError):
            report.record(f"run ({label})", False, f"did not finish within {RUN_TIMEOUT:.0f}s")
        except Exception as exc:  # noqa: BLE001 - a broken run is a failed run
            report.record(f"run ({label})", False, f"{type(exc).__name__}: {exc}")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if os.environ.get("CHECK_PERMISSIONS_TRACE"):
            shutil.copy(log_path, f"/tmp/check_permissions{'' if label == 'as written' else '-' + label}.log")
        shutil.rmtree(store, ignore_errors=True)


def self_test(binary: str, port: int, text: str, normal: Report) -> int:
    """Every check must fail against the open or the closed mutation of the config."""
    global TIMING
    TIMING = Timing(fast=True)
    failed_somewhere: set[str] = set()
    for mode in ("open", "closed"):
        mutated = Report(silent=True)
        run_once(binary, port, mutate(text, mode), mutated, mode)
        flipped = {name for name, ok in mutated.results.items() if not ok}
        failed_somewhere |= flipped
        print(f"check_permissions: {mode} config: {len(flipped)} of {len(mutated.results)} checks failed, as they may")
    cannot_fail = [name for name in normal.results if name not in failed_somewhere]
    for name in cannot_fail:
        print(f"  FAIL  self-test: this check passed against both mutated configs: {name}")
    print(
        f"check_permissions: self-test: {len(normal.results) - len(cannot_fail)} of {len(normal.results)} "
        "checks proven able to fail"
    )
    return 1 if cannot_fail else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("nats_server", nargs="?", help="path of the nats-server binary (2.12 or newer)")
    parser.add_argument("port", nargs="?", type=int, help="free loopback port for the client listener")
    parser.add_argument("--quiet", action="store_true", help="print only failures and the summary")
    parser.add_argument("--self-test", action="store_true", help="also prove that every check can fail")
    parser.add_argument("--nsc", action="store_true", help="print nsc commands for the service users")
    args = parser.parse_args()

    text = CONFIG.read_text()
    if args.nsc:
        print(nsc_commands(text), end="")
        return 0
    if args.nats_server is None or args.port is None:
        parser.error("NATS_SERVER_BIN and PORT are required")
    try:
        import nats  # noqa: F401
    except ImportError:  # pragma: no cover - environment problem, not a check failure
        print("check_permissions: the nats-py package is required (pip install nats-py)", file=sys.stderr)
        return 2
    binary = shutil.which(args.nats_server) or args.nats_server
    if not Path(binary).is_file():
        print(f"check_permissions: no nats-server at {args.nats_server}", file=sys.stderr)
        return 2

    report = Report(quiet=args.quiet)
    try:
        run_once(binary, args.port, text, report, "as written")
        print(f"check_permissions: {report.passed} passed, {len(report.failures)} failed")
        if report.failures:
            return 1
        if args.self_test:
            return self_test(binary, args.port, text, report)
    except StartError as exc:
        print(f"check_permissions: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
