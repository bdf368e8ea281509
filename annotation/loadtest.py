"""A load generator for the vote API: many annotators at once, each asking for an item and voting on it.

    result = run_load("http://127.0.0.1:7860", accounts, total_votes=2000)
    print(result.summary())

Each account runs in its own thread with its own HTTP connection: sign in, ``GET /api/v1/next``, then until
``total_votes`` new votes have been sent (a shared budget): ``POST /api/v1/votes`` with a fresh UUID as the
vote id and ``next: true`` (the answer carries the next task), and with probability ``resubmit_rate`` the
*same* POST again, as a client does when it did not
see the answer (the server must answer "duplicate" and store nothing new). A vote is *acknowledged* when
the server answered 200 / 201. Only for loopback servers that you started yourself.

``login_flood`` measures what a flood of wrong sign-ins does to everyone else: ``attackers`` threads send
wrong passwords as fast as the server answers while one signed-in annotator times a light request.
"""

from __future__ import annotations

import random
import statistics
import threading
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx

CHOICES = ("A", "B", "tie", "both_bad")


@dataclass(frozen=True)
class Attempt:
    uid: str
    token: str
    assignment_id: int
    choice: str


@dataclass
class LoadResult:
    attempts: list[Attempt] = field(default_factory=list)  # every vote sent (acknowledged or not)
    acknowledged: set[str] = field(default_factory=set)  # uids the server confirmed
    resubmits: int = 0
    duplicate_answers: int = 0  # resubmits answered "duplicate: true"
    errors: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def votes_per_s(self) -> float:
        return len(self.acknowledged) / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        return (
            f"{len(self.acknowledged)} votes acknowledged ({len(self.attempts)} sent, {self.resubmits} resent, "
            f"{self.duplicate_answers} answered as duplicates) in {self.seconds:.1f} s: "
            f"{self.votes_per_s:.0f} votes/s; errors {dict(self.errors) or 'none'}"
        )


def sign_in(client: httpx.Client, username: str, password: str, tries: int = 5) -> str:
    """A bearer token; a 503 (too many sign-ins being checked) is retried after its Retry-After."""
    for _ in range(tries - 1):
        r = client.post("/api/v1/login", json={"username": username, "password": password})
        if r.status_code != 503:
            break
        time.sleep(float(r.headers.get("retry-after", "1")))
    else:
        r = client.post("/api/v1/login", json={"username": username, "password": password})
    r.raise_for_status()
    return r.json()["token"]


def run_load(
    base_url: str,
    accounts: Sequence[tuple[str, str]],
    total_votes: int,
    resubmit_rate: float = 0.1,
    seed: int = 0,
    stop: threading.Event | None = None,
    timeout_s: float = 30.0,
) -> LoadResult:
    result = LoadResult()
    lock = threading.Lock()
    budget = [total_votes]
    stop = stop or threading.Event()
    ready = threading.Barrier(len(accounts) + 1)

    def take() -> bool:
        with lock:
            if budget[0] <= 0:
                return False
            budget[0] -= 1
            return True

    def worker(i: int, username: str, password: str) -> None:
        rng = random.Random(f"{seed}|{i}")
        with httpx.Client(base_url=base_url, timeout=timeout_s) as client:
            try:
                token = sign_in(client, username, password)
            except httpx.HTTPError as e:
                with lock:
                    result.errors[f"login: {type(e).__name__}"] += 1
                ready.wait()
                return
            headers = {"Authorization": f"Bearer {token}"}
            ready.wait()
            task: dict | None = None  # the next task comes with each vote's answer (next: true)
            while not stop.is_set() and take():
                try:
                    if task is None:
                        r = client.get("/api/v1/next", headers=headers)
                        r.raise_for_status()
                        task = r.json()["task"]
                    if task is None:
                        with lock:
                            budget[0] += 1  # nothing left for this annotator: give the vote back
                        return
                    attempt = Attempt(
                        f"load-{uuid.uuid4().hex}", token, task["assignment_id"], rng.choice(CHOICES)
                    )
                    body = {
                        "uid": attempt.uid,
                        "assignment_id": attempt.assignment_id,
                        "choice": attempt.choice,
                        "time_spent_s": round(rng.uniform(2, 30), 2),
                        "guideline_version": "load-test",
                        "next": True,
                    }
                    with lock:
                        result.attempts.append(attempt)
                    r = client.post("/api/v1/votes", json=body, headers=headers)
                    r.raise_for_status()
                    with lock:
                        result.acknowledged.add(attempt.uid)
                    task = r.json()["next"]
                    if rng.random() < resubmit_rate:
                        again = client.post("/api/v1/votes", json=body, headers=headers)
                        again.raise_for_status()
                        with lock:
                            result.resubmits += 1
                            result.duplicate_answers += again.status_code == 200 and again.json()["duplicate"]
                except httpx.HTTPStatusError as e:
                    with lock:
                        result.errors[f"HTTP {e.response.status_code}"] += 1
                    task = None
                except httpx.HTTPError as e:  # the server went away (the crash test kills it)
                    with lock:
                        result.errors[type(e).__name__] += 1
                    return

    threads = [
        threading.Thread(target=worker, args=(i, u, p), daemon=True) for i, (u, p) in enumerate(accounts)
    ]
    for t in threads:
        t.start()
    ready.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    result.seconds = time.perf_counter() - start
    return result


def resubmit(base_url: str, attempts: Sequence[Attempt], timeout_s: float = 30.0) -> Counter:
    """Send each attempt again (the same uid): after a crash, this completes what was unacknowledged.
    Returns the status codes seen (201: stored now, 200: it had been stored)."""
    codes: Counter = Counter()
    with httpx.Client(base_url=base_url, timeout=timeout_s) as client:
        for a in attempts:
            r = client.post(
                "/api/v1/votes",
                json={"uid": a.uid, "assignment_id": a.assignment_id, "choice": a.choice},
                headers={"Authorization": f"Bearer {a.token}"},
            )
            codes[r.status_code] += 1
    return codes


@dataclass
class FloodResult:
    latencies_s: list[float] = field(default_factory=list)  # the signed-in annotator's requests, in order
    login_codes: Counter = field(default_factory=Counter)  # what the wrong sign-ins were answered
    seconds: float = 0.0

    def quantile(self, q: float) -> float:
        xs = sorted(self.latencies_s)
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")

    def summary(self) -> str:
        median = statistics.median(self.latencies_s) if self.latencies_s else float("nan")
        return (
            f"{len(self.latencies_s)} requests of the signed-in annotator in {self.seconds:.1f} s: median "
            f"{median * 1000:.1f} ms, p95 {self.quantile(0.95) * 1000:.1f} ms, max "
            f"{max(self.latencies_s, default=float('nan')) * 1000:.1f} ms; wrong sign-ins answered "
            f"{dict(sorted(self.login_codes.items()))}"
        )


def _flood(base_url: str, target: str, attackers: int, seconds: float, timeout_s: float) -> Counter:
    """The attackers of ``login_flood`` (run in a process of their own: ``python -m
    glmwb.annotation.loadtest flood ...``, so that their threads do not slow down the measuring client)."""
    stop = time.monotonic() + seconds
    lock = threading.Lock()
    counts: Counter = Counter()

    def attacker(i: int) -> None:
        with httpx.Client(base_url=base_url, timeout=timeout_s) as c:
            n = 0
            while time.monotonic() < stop:
                n += 1
                body = {"username": target, "password": f"wrong-{i}-{n}"}
                try:
                    code = str(c.post("/api/v1/login", json=body).status_code)
                except httpx.HTTPError as e:
                    code = type(e).__name__
                with lock:
                    counts[code] += 1

    threads = [threading.Thread(target=attacker, args=(i,), daemon=True) for i in range(attackers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + timeout_s)
    return counts


def login_flood(
    base_url: str,
    victim: tuple[str, str],
    target: str,
    attackers: int = 40,
    seconds: float = 10.0,
    path: str = "/api/v1/progress",
    timeout_s: float = 60.0,
) -> FloodResult:
    """``attackers`` threads (in a child process) send wrong passwords for ``target`` (``POST
    /api/v1/login``) for ``seconds``, while ``victim`` (signed in before the flood) sends ``GET path`` one
    after another; returns the victim's latencies and the codes the flood got. ``attackers=0`` measures the
    same requests without a flood."""
    import json
    import subprocess
    import sys

    result = FloodResult()
    with httpx.Client(base_url=base_url, timeout=timeout_s) as client:
        headers = {"Authorization": f"Bearer {sign_in(client, *victim)}"}
        flood = None
        if attackers:
            warmup = min(1.0, seconds / 5)
            args = [base_url, target, str(attackers), str(seconds + warmup), str(timeout_s)]
            flood = subprocess.Popen(
                [sys.executable, "-m", "glmwb.annotation.loadtest", "flood", *args], stdout=subprocess.PIPE
            )
            time.sleep(warmup + 0.5)  # let the flood build up
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            t0 = time.perf_counter()
            client.get(path, headers=headers).raise_for_status()
            result.latencies_s.append(time.perf_counter() - t0)
            time.sleep(0.02)
        result.seconds = time.perf_counter() - start
        if flood is not None:
            out, _ = flood.communicate(timeout=seconds + timeout_s)
            result.login_codes = Counter(json.loads(out or b"{}"))
    return result


if __name__ == "__main__":  # the attackers' process of login_flood
    import json
    import sys

    if sys.argv[1:2] == ["flood"]:
        url, who, n, secs, timeout = sys.argv[2:7]
        print(json.dumps(_flood(url, who, int(n), float(secs), float(timeout))))
