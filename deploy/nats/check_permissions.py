#!/usr/bin/env python3
"""Checks the NATS permissions of deploy/nats/nats-server.conf against a real nats-server.

usage: check_permissions.py [--quiet] NATS_SERVER_BIN PORT

Starts the server on 127.0.0.1:PORT with that config (monitoring on a free port, JetStream in a
temporary directory), declares the devsync topology as `admin` the way `devsyncctl bootstrap`
does, then plays each user's part:

  * every service user does its job: publishes its subjects into their streams (and gets the
    JetStream acknowledgement), binds to its own durable consumer, fetches and acknowledges,
    reads and writes the KV keys it owns, answers devices on their inbox;
  * every service user may inspect the whole topology (what Topology::verify asks) but declare
    nothing except its own durable consumers, and is refused what belongs to another service;
  * device-a publishes its own reports, receives its own notifications and replies and reads
    its own desired state, and is refused everything of device-b and every other JetStream API.

Prints one line per check and exits 1 on any violation (2 on a usage or start-up error). The
whole run is bounded (about a minute at most; a few seconds normally) and the server is always
stopped. Needs the `nats-py` package. With CHECK_PERMISSIONS_TRACE=1 the server traces the
protocol and its log is kept as /tmp/check_permissions.log.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable
from pathlib import Path

try:
    import nats
    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from nats.js.api import AckPolicy, ConsumerConfig
except ImportError:  # pragma: no cover - environment problem, not a check failure
    print("check_permissions: the nats-py package is required (pip install nats-py)", file=sys.stderr)
    sys.exit(2)

CONFIG = Path(__file__).resolve().with_name("nats-server.conf")


def password(user: str) -> str:
    """The password of a static test user (see nats-server.conf)."""
    return f"{user}-local"


SERVICES = ("requestor", "reconciler", "fanout", "audit")
# Few partitions keep the test short; the permissions do not depend on the count.
PARTITIONS = 4
LANES = ("rt", "bulk")
REQUEST_TIMEOUT = 2.0
# How long a refusal may take to come back before the action counts as allowed.
VIOLATION_WAIT = 1.0
RUN_TIMEOUT = 60.0
START_TIMEOUT = 10.0


class Report:
    """Collects check results; a check is a name and a verdict."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.passed = 0
        self.failures: list[str] = []

    def ok(self, name: str) -> None:
        self.passed += 1
        if not self.quiet:
            print(f"  ok    {name}")

    def fail(self, name: str, why: str) -> None:
        self.failures.append(f"{name}: {why}")
        print(f"  FAIL  {name}: {why}")

    async def check(self, name: str, probe: Awaitable[None]) -> None:
        """Runs `probe`; any exception is a failure of this check, never of the whole run."""
        try:
            await asyncio.wait_for(probe, REQUEST_TIMEOUT * 3)
        except Exception as exc:  # noqa: BLE001 - every error is a verdict here
            self.fail(name, f"{type(exc).__name__}: {exc}")
        else:
            self.ok(name)


class User:
    """One connection as one NATS user, remembering the permission errors the server sent."""

    def __init__(self, name: str, nc: Client) -> None:
        self.name = name
        self.nc = nc
        self.js = nc.jetstream(timeout=REQUEST_TIMEOUT)
        self.errors: list[str] = []

    @classmethod
    async def connect(cls, url: str, name: str, inbox_prefix: str | None = None) -> User:
        errors: list[str] = []

        async def on_error(exc: Exception) -> None:
            errors.append(str(exc))

        options = {}
        if inbox_prefix:
            options["inbox_prefix"] = inbox_prefix
        nc = await nats.connect(
            url,
            user=name,
            password=password(name),
            name=f"check-{name}",
            error_cb=on_error,
            allow_reconnect=False,
            connect_timeout=REQUEST_TIMEOUT,
            **options,
        )
        user = cls(name, nc)
        user.errors = errors
        return user

    def violation(self, kind: str, subject: str) -> bool:
        # nats-py lowercases the server's error line.
        wanted = f'permissions violation for {kind} to "{subject}"'.lower()
        return any(wanted in e.lower() for e in self.errors)

    async def wait_for_violation(self, kind: str, subject: str) -> bool:
        """True once the server's permission error for `subject` arrived (bounded wait).

        The server sends the error before the PONG that answers the flush; the error is still
        awaited by itself, up to VIOLATION_WAIT, so a slow machine cannot turn a refusal into
        a pass.
        """
        await self.settle()
        deadline = time.monotonic() + VIOLATION_WAIT
        while not self.violation(kind, subject):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    async def expect_publish_denied(self, subject: str, reply: str = "") -> None:
        """Publishes and expects the server's permission error (it arrives before the PONG)."""
        await self.nc.publish(subject, b"{}", reply=reply)
        if not await self.wait_for_violation("publish", subject):
            raise AssertionError(f"{self.name} was allowed to publish on {subject}")

    async def expect_subscribe_denied(self, subject: str) -> None:
        sub = await self.nc.subscribe(subject)
        denied = await self.wait_for_violation("subscription", subject)
        await sub.unsubscribe()
        if not denied:
            raise AssertionError(f"{self.name} was allowed to subscribe to {subject}")

    async def settle(self) -> None:
        """Returns once everything sent so far was processed by the server.

        nats-py writes its PING ahead of commands still in its buffer, so one flush can return
        before an earlier SUB or PUB reached the server; the second PING goes out after them.
        """
        await self.nc.flush(timeout=REQUEST_TIMEOUT)
        await self.nc.flush(timeout=REQUEST_TIMEOUT)

    async def expect_no_violation(self, since: int = 0) -> None:
        """No permission error arrived after the first `since` ones."""
        await self.settle()
        if self.errors[since:]:
            raise AssertionError(f"{self.name} got errors: {self.errors[since:]}")

    async def js_publish(self, subject: str, stream: str) -> None:
        """A JetStream publish that must be stored in `stream` (proves publish + inbox)."""
        ack = await self.js.publish(subject, b"{}", timeout=REQUEST_TIMEOUT)
        if ack.stream != stream:
            raise AssertionError(f"{subject} stored in {ack.stream}, expected {stream}")

    async def fetch_and_ack(self, stream: str, consumer: str, filter_subject: str, want: int = 1) -> list[Msg]:
        """Creates or binds the durable `consumer`, fetches `want` messages, acks each one."""
        sub = await self.js.pull_subscribe(
            filter_subject,
            durable=consumer,
            stream=stream,
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, max_deliver=5),
        )
        got: list[Msg] = []
        deadline = time.monotonic() + REQUEST_TIMEOUT * 2
        while len(got) < want and time.monotonic() < deadline:
            try:
                batch = await sub.fetch(want - len(got), timeout=0.5)
            except nats.errors.TimeoutError:
                continue
            for msg in batch:
                await msg.ack_sync(timeout=REQUEST_TIMEOUT)
                got.append(msg)
        await sub.unsubscribe()
        if len(got) < want:
            raise AssertionError(f"fetched {len(got)} of {want} from {stream}/{consumer}")
        return got

    async def close(self) -> None:
        if not self.nc.is_closed:
            await self.nc.close()


async def ignore(_exc: Exception) -> None:
    """Error callback for connections expected to be refused (keeps nats-py quiet)."""


async def next_message(sub, timeout: float = REQUEST_TIMEOUT) -> Msg:
    return await sub.next_msg(timeout=timeout)


# ------------------------------------------------------------------------------------------
# Topology, declared by admin as `devsyncctl bootstrap` does (R1, file storage).
# ------------------------------------------------------------------------------------------


def stream(name: str, subjects: list[str], retention: str = "workqueue", **extra) -> dict:
    config = {
        "name": name,
        "subjects": subjects,
        "retention": retention,
        "storage": "file",
        "num_replicas": 1,
        "discard": "old",
        "max_age": 7 * 24 * 3600 * 10**9,
    }
    config.update(extra)
    return config


def kv(bucket: str) -> dict:
    return {
        "name": f"KV_{bucket}",
        "subjects": [f"$KV.{bucket}.>"],
        "retention": "limits",
        "storage": "file",
        "num_replicas": 1,
        "max_msgs_per_subject": 1,
        "discard": "new",
        "allow_rollup_hdrs": True,
        "deny_delete": True,
        "allow_direct": True,
    }


TOPOLOGY = [
    stream("DEVSYNC_IN", ["devsync.in.>"]),
    stream(
        "DEVSYNC_REQ",
        ["devsync.req.*.*"],
        subject_transform={
            "src": "devsync.req.*.*",
            "dest": f"devsync.req.{{{{wildcard(1)}}}}.{{{{partition({PARTITIONS},2)}}}}.{{{{wildcard(2)}}}}",
        },
    ),
    stream("DEVSYNC_FANOUT", ["devsync.fanout.>"]),
    stream("DEVSYNC_AUDIT", ["devsync.audit.>"]),
    stream("DEVSYNC_DLQ", ["devsync.dlq.>"], retention="limits"),
    stream("DEVSYNC_ADVISORIES", ["$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.>"], retention="limits"),
    kv("devsync-desired"),
    kv("devsync-members"),
    kv("devsync-config"),
]


async def bootstrap(admin: User) -> None:
    for config in TOPOLOGY:
        resp = await admin.nc.request(
            f"$JS.API.STREAM.CREATE.{config['name']}", json.dumps(config).encode(), timeout=REQUEST_TIMEOUT
        )
        body = json.loads(resp.data)
        if "error" in body:
            raise RuntimeError(f"creating {config['name']}: {body['error']}")
    await admin.js.create_object_store("devsync-blobs")


def durable_consumers() -> list[tuple[str, str, str]]:
    """(stream, consumer, filter) of every durable consumer bootstrap declares."""
    consumers = [
        ("DEVSYNC_IN", "requestor", "devsync.in.>"),
        ("DEVSYNC_FANOUT", "fanout", "devsync.fanout.>"),
        ("DEVSYNC_AUDIT", "audit", "devsync.audit.>"),
        ("DEVSYNC_ADVISORIES", "dlq-sweeper", "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.>"),
    ]
    for lane in LANES:
        for k in range(PARTITIONS):
            consumers.append(("DEVSYNC_REQ", f"reconcile-{lane}-{k}", f"devsync.req.{lane}.{k}.*"))
    return consumers


async def create_consumers(user: User, consumers: list[tuple[str, str, str]] | None = None) -> None:
    """Creates durable consumers; with the same config again, the create is a no-op."""
    for stream_name, consumer, filter_subject in consumers or durable_consumers():
        await user.js.add_consumer(
            stream_name,
            ConsumerConfig(
                durable_name=consumer,
                name=consumer,
                filter_subject=filter_subject,
                ack_policy=AckPolicy.EXPLICIT,
                max_deliver=5,
            ),
        )


async def verify_topology(user: User) -> None:
    """What Topology::verify asks: info on every stream, bucket and consumer."""
    for config in TOPOLOGY:
        await user.js.stream_info(config["name"])
    await user.js.stream_info("OBJ_devsync-blobs")
    for stream_name, consumer, _ in durable_consumers():
        await user.js.consumer_info(stream_name, consumer)


# ------------------------------------------------------------------------------------------
# The checks
# ------------------------------------------------------------------------------------------


async def run_checks(url: str, report: Report) -> None:
    users: dict[str, User] = {}
    try:
        users["admin"] = await User.connect(url, "admin")
        for name in SERVICES:
            users[name] = await User.connect(url, name)
        for device in ("device-a", "device-b"):
            users[device] = await User.connect(url, device, inbox_prefix=f"devsync.inbox.{device}")
        await scenario(url, users, report)
    finally:
        for user in users.values():
            await user.close()


async def scenario(url: str, users: dict[str, User], report: Report) -> None:
    admin = users["admin"]
    requestor, reconciler = users["requestor"], users["reconciler"]
    fanout, audit = users["fanout"], users["audit"]
    dev_a, dev_b = users["device-a"], users["device-b"]
    check = report.check

    # --- authentication ---------------------------------------------------------------------
    async def anonymous_refused() -> None:
        try:
            nc = await nats.connect(url, allow_reconnect=False, connect_timeout=REQUEST_TIMEOUT, error_cb=ignore)
        except Exception:  # noqa: BLE001 - refused, as wanted
            return
        await nc.close()
        raise AssertionError("an anonymous connection was accepted")

    async def wrong_password_refused() -> None:
        try:
            nc = await nats.connect(
                url,
                user="device-a",
                password="device-b-local",
                allow_reconnect=False,
                connect_timeout=REQUEST_TIMEOUT,
                error_cb=ignore,
            )
        except Exception:  # noqa: BLE001 - refused, as wanted
            return
        await nc.close()
        raise AssertionError("device-a connected with device-b's password")

    await check("anonymous connection refused", anonymous_refused())
    await check("wrong password refused", wrong_password_refused())

    # --- bootstrap as admin ------------------------------------------------------------------
    await check("admin declares the topology (streams, KV, object store)", bootstrap(admin))

    # --- every service can verify the whole topology, and declare none of it -----------------
    await check("admin creates every durable consumer (as bootstrap does)", create_consumers(admin))
    own = {
        "requestor": [
            ("DEVSYNC_IN", "requestor", "devsync.in.>"),
            ("DEVSYNC_ADVISORIES", "dlq-sweeper", "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.>"),
        ],
        "reconciler": [c for c in durable_consumers() if c[0] == "DEVSYNC_REQ"],
        "fanout": [("DEVSYNC_FANOUT", "fanout", "devsync.fanout.>")],
        "audit": [("DEVSYNC_AUDIT", "audit", "devsync.audit.>")],
    }
    for name, consumers in own.items():
        await check(
            f"{name} may re-declare its own durable consumers ({len(consumers)})",
            create_consumers(users[name], consumers),
        )
    for name in SERVICES:
        await check(f"{name} verifies the topology (info on every stream and consumer)", verify_topology(users[name]))
        for subject in (
            "$JS.API.STREAM.CREATE.DEVSYNC_IN",
            "$JS.API.STREAM.UPDATE.DEVSYNC_REQ",
            "$JS.API.STREAM.DELETE.DEVSYNC_AUDIT",
            "$JS.API.STREAM.PURGE.DEVSYNC_FANOUT",
            "$JS.API.CONSUMER.DELETE.DEVSYNC_IN.requestor",
            "$JS.API.CONSUMER.CREATE.DEVSYNC_DLQ.sneaky",
        ):
            await check(f"{name} refused: publish {subject}", users[name].expect_publish_denied(subject))

    # --- device-a publishes and is acknowledged on its own inbox ----------------------------
    await check(
        "device-a publishes devsync.in.device-a.report into DEVSYNC_IN (ack on its own inbox)",
        dev_a.js_publish("devsync.in.device-a.report", "DEVSYNC_IN"),
    )

    # --- requestor ------------------------------------------------------------------------------
    await check(
        "requestor consumes DEVSYNC_IN with its durable consumer `requestor` and acks",
        requestor.fetch_and_ack("DEVSYNC_IN", "requestor", "devsync.in.>"),
    )

    async def requestor_answers_device() -> None:
        # The requestor may also serve devsync.in.> as a core queue group and answer the device
        # on its inbox; the device gets that answer (and the stream's ack) on its own prefix.
        served = await requestor.nc.subscribe("devsync.in.>", queue="requestor")
        inbox = await dev_a.nc.subscribe("devsync.inbox.device-a.check.>")
        await requestor.settle()
        await dev_a.settle()
        await dev_a.nc.publish("devsync.in.device-a.refresh", b"{}", reply="devsync.inbox.device-a.check.1")
        request = await next_message(served)
        await request.respond(b"answered")
        replies = {(await next_message(inbox)).data, (await next_message(inbox)).data}
        await served.unsubscribe()
        await inbox.unsubscribe()
        if b"answered" not in replies:
            raise AssertionError(f"device-a did not get the requestor's answer: {replies}")
        # drain the refresh from the stream so later fetches see only what they expect
        await requestor.fetch_and_ack("DEVSYNC_IN", "requestor", "devsync.in.>")

    await check("requestor answers device-a on devsync.inbox.device-a.*", requestor_answers_device())
    await check(
        "requestor publishes devsync.req.rt.<device> into DEVSYNC_REQ",
        requestor.js_publish("devsync.req.rt.device-a", "DEVSYNC_REQ"),
    )
    await check(
        "requestor publishes devsync.fanout.wave.<campaign> into DEVSYNC_FANOUT",
        requestor.js_publish("devsync.fanout.wave.campaign-1", "DEVSYNC_FANOUT"),
    )
    await check(
        "requestor publishes devsync.audit.requestor into DEVSYNC_AUDIT",
        requestor.js_publish("devsync.audit.requestor", "DEVSYNC_AUDIT"),
    )
    await check(
        "requestor publishes dead letters into DEVSYNC_DLQ",
        requestor.js_publish("devsync.dlq.devsync_in", "DEVSYNC_DLQ"),
    )
    await check(
        "requestor writes its lease in KV devsync-members",
        requestor.js_publish("$KV.devsync-members.lease-scheduler", "KV_devsync-members"),
    )

    async def requestor_reads_config() -> None:
        await admin.js_publish("$KV.devsync-config.push-policy", "KV_devsync-config")
        kv = await requestor.js.key_value("devsync-config")
        entry = await kv.get("push-policy")
        if entry.value != b"{}":
            raise AssertionError(f"unexpected value {entry.value!r}")

    await check("requestor reads KV devsync-config", requestor_reads_config())

    async def requestor_sweeps() -> None:
        await requestor.js.pull_subscribe(
            "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.>", durable="dlq-sweeper", stream="DEVSYNC_ADVISORIES"
        )
        seq_ack = await admin.js.publish("devsync.in.device-b.report", b"{}")
        resp = await requestor.nc.request(
            "$JS.API.STREAM.MSG.GET.DEVSYNC_IN", json.dumps({"seq": seq_ack.seq}).encode(), timeout=REQUEST_TIMEOUT
        )
        if "error" in json.loads(resp.data):
            raise AssertionError(resp.data.decode())
        resp = await requestor.nc.request(
            "$JS.API.STREAM.MSG.DELETE.DEVSYNC_IN", json.dumps({"seq": seq_ack.seq}).encode(), timeout=REQUEST_TIMEOUT
        )
        if not json.loads(resp.data).get("success"):
            raise AssertionError(resp.data.decode())

    await check("requestor (DLQ sweeper) binds dlq-sweeper, copies and deletes a dead message", requestor_sweeps())

    for subject in (
        "devsync.out.device-a.desired",
        "devsync.fanout.push.device-a",
        "devsync.audit.fanout",
        "$KV.devsync-desired.device-a",
        "$JS.API.STREAM.DELETE.DEVSYNC_IN",
        "$JS.API.STREAM.UPDATE.DEVSYNC_IN",
        "$JS.API.STREAM.PURGE.DEVSYNC_REQ",
        "$JS.API.CONSUMER.MSG.NEXT.DEVSYNC_FANOUT.fanout",
        "$JS.API.CONSUMER.DELETE.DEVSYNC_IN.requestor",
    ):
        await check(f"requestor refused: publish {subject}", requestor.expect_publish_denied(subject))
    await check("requestor refused: subscribe devsync.out.>", requestor.expect_subscribe_denied("devsync.out.>"))

    # --- reconciler -----------------------------------------------------------------------------
    async def reconciler_owns_partitions() -> None:
        # The request published by the requestor landed in one partition; the reconciler binds
        # every reconcile-rt-<k> consumer (as its replicas would) and finds it in one of them.
        found = 0
        for lane in LANES:
            for k in range(PARTITIONS):
                sub = await reconciler.js.pull_subscribe(
                    f"devsync.req.{lane}.{k}.*",
                    durable=f"reconcile-{lane}-{k}",
                    stream="DEVSYNC_REQ",
                    config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, max_deliver=5),
                )
                try:
                    for msg in await sub.fetch(1, timeout=0.2):
                        if not msg.subject.startswith(f"devsync.req.{lane}.{k}."):
                            raise AssertionError(f"unexpected subject {msg.subject}")
                        await msg.ack_sync(timeout=REQUEST_TIMEOUT)
                        found += 1
                except nats.errors.TimeoutError:
                    pass
                await sub.unsubscribe()
        if found != 1:
            raise AssertionError(f"found {found} requests across the partitions, expected 1")

    await check(
        "reconciler binds reconcile-<lane>-<k> on DEVSYNC_REQ (partitioned), fetches, acks",
        reconciler_owns_partitions(),
    )
    await check(
        "reconciler publishes a follow-up stage devsync.req.bulk.<device>",
        reconciler.js_publish("devsync.req.bulk.device-a", "DEVSYNC_REQ"),
    )
    await check(
        "reconciler publishes devsync.fanout.push.<device> into DEVSYNC_FANOUT",
        reconciler.js_publish("devsync.fanout.push.device-a", "DEVSYNC_FANOUT"),
    )
    await check(
        "reconciler publishes devsync.audit.reconciler",
        reconciler.js_publish("devsync.audit.reconciler", "DEVSYNC_AUDIT"),
    )

    async def reconciler_membership() -> None:
        # What membership.rs does: put a heartbeat, list the members, read one, delete its own.
        kv = await reconciler.js.key_value("devsync-members")
        await kv.put("member-reconciler-0", b"reconciler-0")
        keys = await kv.keys()
        if "member-reconciler-0" not in keys:
            raise AssertionError(f"keys: {keys}")
        entry = await kv.get("member-reconciler-0")
        if entry.value != b"reconciler-0":
            raise AssertionError(entry.value)
        await kv.delete("member-reconciler-0")

    await check(
        "reconciler heartbeats, lists, reads and deletes members in KV devsync-members", reconciler_membership()
    )

    async def reconciler_answers_device() -> None:
        inbox = await dev_a.nc.subscribe("devsync.inbox.device-a.>")
        await dev_a.settle()
        await reconciler.nc.publish("devsync.inbox.device-a.abc.1", b"delta")
        msg = await next_message(inbox)
        await inbox.unsubscribe()
        if msg.data != b"delta":
            raise AssertionError(msg.data)

    await check("reconciler answers device-a on its inbox", reconciler_answers_device())

    for subject in (
        "devsync.in.device-a.report",
        "devsync.out.device-a.desired",
        "devsync.fanout.wave.campaign-1",
        "devsync.audit.requestor",
        "$KV.devsync-desired.device-a",
        "$JS.API.CONSUMER.MSG.NEXT.DEVSYNC_IN.requestor",
        "$JS.API.STREAM.DELETE.DEVSYNC_REQ",
    ):
        await check(f"reconciler refused: publish {subject}", reconciler.expect_publish_denied(subject))

    # --- fan-out --------------------------------------------------------------------------------
    await check(
        "fanout consumes DEVSYNC_FANOUT with `fanout` (wave + push) and acks",
        fanout.fetch_and_ack("DEVSYNC_FANOUT", "fanout", "devsync.fanout.>", want=2),
    )
    for device in ("device-a", "device-b"):
        await check(
            f"fanout writes KV devsync-desired key {device}",
            fanout.js_publish(f"$KV.devsync-desired.{device}", "KV_devsync-desired"),
        )

    async def fanout_notifies_device() -> None:
        notes = await dev_a.nc.subscribe("devsync.out.device-a.>")
        await dev_a.settle()
        await fanout.nc.publish("devsync.out.device-a.desired", b"v2")
        msg = await next_message(notes)
        await notes.unsubscribe()
        if msg.data != b"v2":
            raise AssertionError(msg.data)

    await check(
        "fanout notifies device-a on devsync.out.device-a.desired (device-a receives it)", fanout_notifies_device()
    )
    await check(
        "fanout schedules its next campaign wave", fanout.js_publish("devsync.fanout.wave.campaign-1", "DEVSYNC_FANOUT")
    )
    await check("fanout publishes devsync.audit.fanout", fanout.js_publish("devsync.audit.fanout", "DEVSYNC_AUDIT"))

    async def fanout_uses_blobs() -> None:
        store = await fanout.js.object_store("devsync-blobs")
        await store.put("claim-1", b"x" * 20_000)
        got = await store.get("claim-1")
        if len(got.data) != 20_000:
            raise AssertionError(len(got.data))

    await check("fanout puts and gets a claim-check blob in devsync-blobs", fanout_uses_blobs())

    for subject in (
        "devsync.req.rt.device-a",
        "devsync.inbox.device-a.x",
        "devsync.in.device-a.report",
        "devsync.audit.reconciler",
        "$KV.devsync-members.x",
        "$JS.API.STREAM.PURGE.DEVSYNC_FANOUT",
        "$JS.API.CONSUMER.MSG.NEXT.DEVSYNC_AUDIT.audit",
    ):
        await check(f"fanout refused: publish {subject}", fanout.expect_publish_denied(subject))

    # --- audit ----------------------------------------------------------------------------------
    await check(
        "audit consumes DEVSYNC_AUDIT with `audit` and acks (events of 3 services)",
        audit.fetch_and_ack("DEVSYNC_AUDIT", "audit", "devsync.audit.>", want=3),
    )

    async def audit_serves_search() -> None:
        before = len(audit.errors)
        endpoint = await audit.nc.subscribe("devsync.api.audit.search", queue="devsync-audit")
        ping = await audit.nc.subscribe("$SRV.PING.devsync-audit")
        await audit.settle()

        async def serve() -> None:
            msg = await next_message(endpoint)
            await msg.respond(b"[]")  # to the caller's _INBOX: allowed by allow_responses

        server = asyncio.ensure_future(serve())
        reply = await admin.nc.request("devsync.api.audit.search", b"{}", timeout=REQUEST_TIMEOUT)
        await server
        await endpoint.unsubscribe()
        await ping.unsubscribe()
        if reply.data != b"[]":
            raise AssertionError(reply.data)
        await audit.expect_no_violation(since=before)

    await check("audit answers a search request (micro service endpoint, allow_responses)", audit_serves_search())
    for subject in (
        "devsync.audit.requestor",
        "devsync.req.rt.device-a",
        "devsync.out.device-a.desired",
        "devsync.inbox.device-a.x",
        "$KV.devsync-desired.device-a",
    ):
        await check(f"audit refused: publish {subject}", audit.expect_publish_denied(subject))

    # --- devices --------------------------------------------------------------------------------
    async def device_reads_own_desired() -> None:
        msg = await dev_a.nc.request(
            "$JS.API.DIRECT.GET.KV_devsync-desired.$KV.devsync-desired.device-a", b"", timeout=REQUEST_TIMEOUT
        )
        headers = msg.headers or {}
        if headers.get("Nats-Subject") != "$KV.devsync-desired.device-a":
            raise AssertionError(f"unexpected direct get answer: {headers} {msg.data!r}")

    await check("device-a reads its own desired state (KV direct get on its own key)", device_reads_own_desired())

    for subject in (
        "devsync.in.device-b.report",
        "devsync.in.device-a",  # not under its own prefix's wildcard level
        "devsync.req.rt.device-a",
        "devsync.out.device-a.desired",
        "devsync.inbox.device-b.x",
        "$KV.devsync-desired.device-a",
        "$JS.API.INFO",
        "$JS.API.STREAM.INFO.DEVSYNC_IN",
        "$JS.API.STREAM.NAMES",
        "$JS.API.STREAM.MSG.GET.KV_devsync-desired",
        "$JS.API.DIRECT.GET.KV_devsync-desired",
        "$JS.API.DIRECT.GET.KV_devsync-desired.$KV.devsync-desired.device-b",
        "$JS.API.DIRECT.GET.KV_devsync-desired.$KV.devsync-desired.>",
        "$JS.API.CONSUMER.CREATE.DEVSYNC_IN",
        "$JS.API.CONSUMER.MSG.NEXT.DEVSYNC_IN.requestor",
        "$JS.ACK.DEVSYNC_IN.requestor.1.1.1.1.1",
    ):
        await check(f"device-a refused: publish {subject}", dev_a.expect_publish_denied(subject))
    for subject in (
        "devsync.out.device-b.>",
        "devsync.out.*.desired",
        "devsync.inbox.device-b.>",
        "devsync.inbox.>",
        "_INBOX.>",
        "devsync.in.>",
        ">",
    ):
        await check(f"device-a refused: subscribe {subject}", dev_a.expect_subscribe_denied(subject))

    async def device_b_not_reached() -> None:
        # device-b's own notifications reach device-b and never device-a.
        before = len(dev_b.errors)
        notes_b = await dev_b.nc.subscribe("devsync.out.device-b.>")
        await dev_b.settle()
        await fanout.nc.publish("devsync.out.device-b.desired", b"for-b")
        msg = await next_message(notes_b)
        await notes_b.unsubscribe()
        if msg.data != b"for-b":
            raise AssertionError(msg.data)
        await dev_b.expect_no_violation(since=before)

    await check("device-b receives its own notification", device_b_not_reached())
    await check(
        "device-b refused: publish devsync.in.device-a.report",
        dev_b.expect_publish_denied("devsync.in.device-a.report"),
    )


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("nats_server", help="path of the nats-server binary (2.12 or newer)")
    parser.add_argument("port", type=int, help="free loopback port for the client listener")
    parser.add_argument("--quiet", action="store_true", help="print only failures and the summary")
    args = parser.parse_args()

    binary = shutil.which(args.nats_server) or args.nats_server
    if not Path(binary).is_file():
        print(f"check_permissions: no nats-server at {args.nats_server}", file=sys.stderr)
        return 2

    store = Path(tempfile.mkdtemp(prefix="devsync-nats-check-"))
    log_path = store / "nats-server.log"
    # The server refuses --store_dir next to a store_dir in the file: run a copy of the config
    # that differs only in its store_dir.
    config = store / CONFIG.name
    text, count = re.subn(r"(?m)^(\s*store_dir:).*$", lambda m: f'{m.group(1)} "{store / "js"}"', CONFIG.read_text())
    if count != 1:
        print(f"check_permissions: expected one store_dir in {CONFIG}", file=sys.stderr)
        return 2
    config.write_text(text)
    cmd = [
        binary,
        "-c",
        str(config),
        "-a",
        "127.0.0.1",
        "-p",
        str(args.port),
        "-m",
        str(free_port()),
        "-l",
        str(log_path),
        *(["-DV"] if os.environ.get("CHECK_PERMISSIONS_TRACE") else []),
    ]
    print(f"check_permissions: {Path(binary).name} on 127.0.0.1:{args.port} with {CONFIG.name}")
    report = Report(quiet=args.quiet)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        try:
            wait_for_port(args.port, proc, START_TIMEOUT)
        except RuntimeError as exc:
            print(f"check_permissions: {exc}", file=sys.stderr)
            if log_path.exists():
                print(log_path.read_text()[-2000:], file=sys.stderr)
            return 2
        url = f"nats://127.0.0.1:{args.port}"
        try:
            asyncio.run(asyncio.wait_for(run_checks(url, report), RUN_TIMEOUT))
        except TimeoutError:
            report.fail("run", f"did not finish within {RUN_TIMEOUT:.0f}s")
        except Exception as exc:  # noqa: BLE001 - a broken run is a failed run
            report.fail("run", f"{type(exc).__name__}: {exc}")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if os.environ.get("CHECK_PERMISSIONS_TRACE"):
            shutil.copy(log_path, "/tmp/check_permissions.log")
        shutil.rmtree(store, ignore_errors=True)

    print(f"check_permissions: {report.passed} passed, {len(report.failures)} failed")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
