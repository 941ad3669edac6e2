"""Webhooks under load with faults: a sender posting at a steady rate, 10% of its posts repeats
of an earlier event and 5% malformed or badly signed, the receiver (``sync-pipelines serve``, a
real process on 127.0.0.1) SIGKILLed and restarted twice mid-load, the sender retrying every
non-2xx answer and connection error with the same ``webhook-id``, and delivery runs going on
meanwhile. Afterwards, by the target-side apply log: every accepted event was applied exactly
once, every bad post got its 4xx and left nothing, and nothing acknowledged was lost.

Each event writes its own key, so the apply log counts applies per event (compaction cannot
merge two events); per-key order under many quick webhooks is test_webhook's.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import yaml

from sync_pipelines.engine import deliver_pipeline, load_spec

from .support.pipelines import execute, rows
from .support.receiver import OTHER_SECRET, SECRET, event, sign
from .support.versioned import TARGET_DDL

EVENTS = 500
RATE = 120.0  # posts per second, steady
SENDERS = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Receiver:
    """``sync-pipelines serve`` as its own process, killable with SIGKILL and restartable on the
    same port."""

    def __init__(self, spec_path: str, env: dict[str, str]) -> None:
        self.spec_path, self.env = spec_path, env
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sync_pipelines.cli", "serve", "--spec", self.spec_path,
             "--port", str(self.port)], env=self.env,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"receiver exited: {self.proc.stderr.read().decode()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.05)
        raise AssertionError("receiver did not start")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@dataclass
class Post:
    webhook_id: str
    body: str
    secret: str = SECRET
    expect: int | None = None  # a bad post: the 4xx it must get
    statuses: list[int] = field(default_factory=list)


def _plan(rng: random.Random) -> tuple[list[Post], dict[int, str]]:
    """The posts in sending order; and the good events' item ids → webhook ids."""
    posts: list[Post] = []
    good: dict[int, str] = {}
    for n in range(EVENTS):
        roll = rng.random()
        if roll < 0.10 and posts and any(p.expect is None for p in posts):
            first = rng.choice([p for p in posts if p.expect is None])
            posts.append(Post(first.webhook_id, first.body))  # a repeat: same id, same body
        elif roll < 0.125:
            posts.append(Post(f"bad-{n}", "{\"type\": \"item.updated\", \"data\": {",
                              expect=400))
        elif roll < 0.15:
            posts.append(Post(f"bad-{n}", event("item.updated", {"id": 10_000 + n,
                                                                 "version": 1, "qty": 1}),
                              secret=OTHER_SECRET, expect=401))
        else:
            good[n] = f"evt-{n}"
            posts.append(Post(f"evt-{n}", event("item.updated", {
                "id": n, "version": n + 1, "qty": n % 7, "note": f"event {n}"})))
    return posts, good


def _send(client: httpx.Client, post: Post, stop: threading.Event) -> None:
    """Post until an answer the sender may stop at: 2xx, or the 4xx a bad post must get.
    Every retry is signed afresh (new timestamp) with the same webhook-id."""
    while not stop.is_set():
        try:
            r = client.post("/ingest/shop", content=post.body,
                            headers=sign(post.secret, post.webhook_id, post.body))
        except httpx.HTTPError:
            post.statuses.append(0)
            time.sleep(0.05)
            continue
        post.statuses.append(r.status_code)
        if r.is_success or (post.expect is not None and r.status_code == post.expect):
            return
        time.sleep(float(r.headers.get("retry-after", "0.05")) if r.status_code == 429
                   else 0.05)


def test_load_with_duplicates_bad_posts_and_two_receiver_kills(tmp_path, monkeypatch, state_dsn,
                                                               target_dsn):
    execute(target_dsn, *TARGET_DDL)
    spec_path = tmp_path / "sync.yaml"
    spec_path.write_text(yaml.safe_dump({
        "state": {"dsn_env": "L_STATE_DSN"},
        "pipelines": {"shop": {
            "source": {"kind": "webhook", "secret_env": "L_SECRET", "records": {"items": {
                "key": ["id"], "data": "data", "event_types": ["item.*"],
                "fields": {"id": {"path": "id", "type": "int", "required": True},
                           "version": {"path": "version", "type": "int"},
                           "qty": {"path": "qty", "type": "int"}, "note": "note"}}}},
            "tables": ["items"],
            "targets": {"replica": {"dsn_env": "L_TARGET_DSN"}},
            "initial_backfill": False,
        }},
    }))
    env = {**os.environ, "L_STATE_DSN": state_dsn, "L_TARGET_DSN": target_dsn,
           "L_SECRET": SECRET}
    for k in ("L_STATE_DSN", "L_TARGET_DSN", "L_SECRET"):
        monkeypatch.setenv(k, env[k])
    spec = load_spec(str(spec_path))
    posts, good = _plan(random.Random(11))
    receiver = Receiver(str(spec_path), env)
    receiver.start()
    stop = threading.Event()

    def deliver_meanwhile() -> None:  # the delivery runs, racing the receiver
        while not stop.is_set():
            deliver_pipeline(spec, "shop")
            time.sleep(0.2)

    deliverer = threading.Thread(target=deliver_meanwhile, daemon=True)
    deliverer.start()
    kills = {len(posts) // 3, 2 * len(posts) // 3}
    try:
        with httpx.Client(base_url=receiver.url, timeout=10) as client, ThreadPoolExecutor(
                SENDERS) as pool:
            started = time.monotonic()
            futures = []
            for i, post in enumerate(posts):
                time.sleep(max(0.0, started + i / RATE - time.monotonic()))  # steady rate
                if i in kills:
                    receiver.kill()  # mid-load: requests in flight get connection errors
                    restart = threading.Thread(target=receiver.start)
                    restart.start()
                futures.append(pool.submit(_send, client, post, stop))
                if i in kills:
                    restart.join()
            for f in futures:
                f.result(timeout=120)
        # Everything acknowledged is staged: delivery alone now brings the target level.
        stop.set()
        deliverer.join(30)
        deliver_pipeline(spec, "shop")
    finally:
        stop.set()
        receiver.stop()

    # The faults happened: connection errors around the kills, bad posts refused.
    assert sum(s == 0 for p in posts for s in p.statuses) > 0, "no request met a kill"
    for p in posts:
        if p.expect is not None:
            assert p.statuses == [p.expect] or (
                set(p.statuses[:-1]) <= {0} and p.statuses[-1] == p.expect), p
        else:
            assert p.statuses and 200 <= p.statuses[-1] < 300, p
    # Exactly once: one apply per good event, none for the bad ones, nothing else.
    applied = rows(target_dsn, "SELECT id, version, count(*) FROM apply_log GROUP BY id, "
                   "version ORDER BY id")
    assert [(i, v) for i, v, _ in applied] == [(n, n + 1) for n in sorted(good)]
    assert all(c == 1 for _, _, c in applied), [a for a in applied if a[2] != 1]
    assert rows(target_dsn, "SELECT count(*) FROM items")[0][0] == len(good)
    # One receipt per distinct accepted webhook-id.
    assert rows(state_dsn, "SELECT count(*) FROM sync_state.webhook_receipt WHERE "
                "pipeline = 'shop'")[0][0] == len(good)
