"""The JobQueue contract, for the local queue and the Redis queue (a real redis-server);
then what only a shared queue does: settling the ids of a node that vanished, node leases,
and the Redis bus (kills, finishes, live output, project files)."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from python_executor_server.errors import PayloadTooLarge, QueueFull
from python_executor_server.execution.jobs import Job, JobLimits
from python_executor_server.execution.output import OutputCapture
from python_executor_server.queue import create_bus, create_queue
from python_executor_server.queue.base import JobQueue, QueueUnavailable
from python_executor_server.queue.bus import RedisBus
from python_executor_server.queue.keys import RedisKeys
from python_executor_server.settings import Settings

MakeQueue = Callable[..., JobQueue]


def _settings(kind: str, request: pytest.FixtureRequest, **values: object) -> Settings:
    if kind == "local":
        return Settings.model_validate({"queue": "local", **values})
    namespace = request.node.__dict__.setdefault("ns", f"test-{uuid.uuid4().hex[:12]}")
    return Settings.model_validate(
        {
            "queue": "redis",
            "store": "redis",
            "redis_url": request.getfixturevalue("redis_url"),
            "redis_namespace": namespace,
            **values,
        }
    )


@pytest.fixture(params=["local", pytest.param("redis", marks=pytest.mark.redis)])
async def make_queue(request: pytest.FixtureRequest) -> AsyncIterator[MakeQueue]:
    made: list[JobQueue] = []

    def make(**values: object) -> JobQueue:
        queue = create_queue(_settings(str(request.param), request, **values))
        made.append(queue)
        return queue

    yield make
    for queue in made:
        await queue.close()


async def _never_lost(execution_id: str) -> bool:
    raise AssertionError(f"nothing should be lost, got {execution_id}")


async def _until(check: Callable[[], bool]) -> None:
    async with asyncio.timeout(10):
        while not check():  # noqa: ASYNC110 - the handlers under test set no event
            await asyncio.sleep(0.01)


async def test_every_id_is_handled_once_in_order(make_queue: MakeQueue) -> None:
    queue = make_queue(max_concurrent=1, max_queue=10)
    seen: list[str] = []

    async def handler(execution_id: str) -> None:
        seen.append(execution_id)

    ids = [f"exe_{n}" for n in range(8)]
    for execution_id in ids:
        await queue.put(execution_id)
    await queue.start(handler, _never_lost)
    await _until(lambda: len(seen) == len(ids))
    await asyncio.sleep(0.1)
    assert seen == ids
    assert await queue.depth() == 0


async def test_at_most_max_concurrent_handlers(make_queue: MakeQueue) -> None:
    queue = make_queue(max_concurrent=2, max_queue=10)
    running, peak, done = 0, 0, 0

    async def handler(execution_id: str) -> None:
        nonlocal running, peak, done
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.1)
        running -= 1
        done += 1

    await queue.start(handler, _never_lost)
    for n in range(6):
        await queue.put(f"exe_{n}")
    await _until(lambda: done == 6)
    assert peak == 2


async def test_put_beyond_the_bound_raises_queue_full(make_queue: MakeQueue) -> None:
    queue = make_queue(max_concurrent=1, max_queue=2, retry_after_seconds=7)
    await queue.put("exe_1")
    assert not await queue.full()
    await queue.put("exe_2")
    assert await queue.depth() == 2
    assert await queue.full()
    with pytest.raises(QueueFull) as raised:
        await queue.put("exe_3")
    assert raised.value.retry_after == 7
    assert await queue.depth() == 2


async def test_a_claim_is_a_free_slot_that_overtakes_nothing(make_queue: MakeQueue) -> None:
    queue = make_queue(max_concurrent=2, max_queue=10)
    release = asyncio.Event()
    started: list[str] = []
    finished: list[str] = []

    async def handler(execution_id: str) -> None:
        started.append(execution_id)
        await release.wait()
        finished.append(execution_id)

    await queue.start(handler, _never_lost)
    claim = queue.claim()
    if not queue.exclusive:  # a shared queue: every id goes through it
        assert claim is None
        return
    assert claim is not None
    await queue.put("exe_put")  # the other slot
    await _until(lambda: started == ["exe_put"])
    assert queue.claim() is None  # both slots taken (one claimed, one running)
    await queue.put("exe_waits")  # waits: the claimed slot is not free
    claim.start("exe_claimed")
    await _until(lambda: started == ["exe_put", "exe_claimed"])
    assert await queue.depth() == 1
    with pytest.raises(RuntimeError):
        claim.release()  # used once
    release.set()
    await _until(lambda: len(finished) == 3)
    assert started == ["exe_put", "exe_claimed", "exe_waits"]
    claims = [queue.claim(), queue.claim(), queue.claim()]
    assert [c is not None for c in claims] == [True, True, False]  # two slots, both free
    for spare in claims[:2]:
        assert spare is not None
        spare.release()
    await queue.put("exe_after")  # released slots run what comes next
    await _until(lambda: started[-1] == "exe_after")


# --- shared queue only -------------------------------------------------------------


@pytest.fixture()
async def redis_settings(redis_url: str) -> Settings:
    return Settings(
        queue="redis",
        store="redis",
        redis_url=redis_url,
        redis_namespace=f"test-{uuid.uuid4().hex[:12]}",
        redis_lease_seconds=1,
        max_concurrent=2,
    )


@pytest.fixture()
async def redis_client(redis_url: str) -> AsyncIterator[object]:
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.mark.redis
async def test_ids_of_a_vanished_node_are_requeued_or_dropped(
    redis_settings: Settings, redis_client: object
) -> None:
    keys = RedisKeys(redis_settings.redis_namespace)
    r = redis_client
    # "ghost" took four ids and died (no lease): two never started, two were running.
    await r.rpush(keys.taken("ghost"), "exe_r1", "exe_p1", "exe_r2", "exe_p2")  # type: ignore[attr-defined]
    await r.sadd(keys.nodes, "ghost")  # type: ignore[attr-defined]
    handled: list[str] = []
    asked: list[str] = []

    async def handler(execution_id: str) -> None:
        handled.append(execution_id)

    async def lost(execution_id: str) -> bool:
        asked.append(execution_id)
        return execution_id.startswith("exe_p")

    queue = create_queue(redis_settings.model_copy(update={"node_id": "survivor"}))
    await queue.start(handler, lost)
    try:
        await _until(lambda: len(handled) == 2)
        async with asyncio.timeout(10):  # the requeued ones can be handled before it is done
            while await r.sismember(keys.nodes, "ghost"):  # type: ignore[attr-defined]  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        assert sorted(asked) == ["exe_p1", "exe_p2", "exe_r1", "exe_r2"]
        assert sorted(handled) == ["exe_p1", "exe_p2"]
        assert await r.llen(keys.taken("ghost")) == 0  # type: ignore[attr-defined]
        assert await r.smembers(keys.nodes) == {"survivor"}  # type: ignore[attr-defined]
    finally:
        await queue.close()
    assert await r.llen(keys.taken("survivor")) == 0  # type: ignore[attr-defined]
    assert await r.smembers(keys.nodes) == set()  # type: ignore[attr-defined]


@pytest.mark.redis
async def test_a_live_node_id_cannot_be_taken_twice(redis_settings: Settings) -> None:
    settings = redis_settings.model_copy(update={"node_id": "twin"})
    first, second = create_queue(settings), create_queue(settings)
    await first.start(_handler_noop, _never_lost)
    try:
        with pytest.raises(QueueUnavailable, match="in use by another live process"):
            await second.start(_handler_noop, _never_lost)
    finally:
        await second.close()  # never held the lease: must not touch the first one's lists
        await first.close()
    # Once the first is gone, the id is free again at once (its lease was released).
    third = create_queue(settings)
    await third.start(_handler_noop, _never_lost)
    await third.close()


async def _handler_noop(execution_id: str) -> None:
    pass


# --- the Redis bus ------------------------------------------------------------------


@pytest.fixture()
async def bus_pair(redis_settings: Settings) -> AsyncIterator[tuple[RedisBus, RedisBus]]:
    buses = [create_bus(redis_settings) for _ in range(2)]
    yield buses[0], buses[1]  # type: ignore[misc]
    for bus in buses:
        await bus.close()


async def _recording_start(bus: RedisBus) -> tuple[list[str], list[str]]:
    kills: list[str] = []
    finishes: list[str] = []
    await bus.start(on_kill=kills.append, on_finished=finishes.append)
    return kills, finishes


@pytest.mark.redis
async def test_kills_and_finishes_reach_every_node(bus_pair: tuple[RedisBus, RedisBus]) -> None:
    api, worker = bus_pair
    api_kills, api_finishes = await _recording_start(api)
    worker_kills, worker_finishes = await _recording_start(worker)
    await api.publish_kill("exe_k")
    await worker.publish_finished("exe_f")
    await _until(lambda: worker_kills == ["exe_k"] and api_finishes == ["exe_f"])
    assert api_kills == ["exe_k"] and worker_finishes == ["exe_f"]


@pytest.mark.redis
async def test_output_reaches_a_late_follower_whole(bus_pair: tuple[RedisBus, RedisBus]) -> None:
    worker, api = bus_pair
    capture = OutputCapture(cap=1 << 20)
    capture.write("stdout", b"before anyone follows\n")
    publishing = asyncio.create_task(worker.publish_output("exe_o", capture))
    finished = False

    async def is_finished() -> bool:
        return finished

    async def follow() -> list[tuple[str, str]]:
        follower = api.follow_output("exe_o", is_finished)
        assert follower is not None
        return [(e.stream, e.text) async for e in follower]

    await asyncio.sleep(0.2)
    following = asyncio.create_task(follow())
    await asyncio.sleep(0.2)
    capture.write("stderr", b"oops\n")
    capture.write("stdout", "caf\u00e9\n".encode()[:4])  # a character split across chunks
    capture.write("stdout", "caf\u00e9\n".encode()[4:])
    capture.close()
    await publishing
    events = await asyncio.wait_for(following, 10)
    text = {s: "".join(t for stream, t in events if stream == s) for s in ("stdout", "stderr")}
    assert text == {"stdout": "before anyone follows\ncaf\u00e9\n", "stderr": "oops\n"}
    # A follower of an execution that never produced output stops once it is finished.
    finished = True
    silent = api.follow_output("exe_silent", is_finished)
    assert silent is not None
    assert [e async for e in silent] == []


def _job(project_dir: Path | None) -> Job:
    limits = JobLimits(timeout_seconds=5, memory_mb=64, disk_mb=64, cpu_shares=1024, network=False)
    return Job(
        kind="exec",
        entrypoint="main.py",
        python_version="3.11",
        limits=limits,
        project_dir=None if project_dir is None else str(project_dir),
    )


@pytest.mark.redis
async def test_project_files_travel_between_nodes(
    bus_pair: tuple[RedisBus, RedisBus], tmp_path: Path
) -> None:
    api, worker = bus_pair
    project = tmp_path / "api" / "project"
    (project / "pkg" / "empty").mkdir(parents=True)
    (project / "main.py").write_text("print('hi')\n")
    (project / "pkg" / "data.bin").write_bytes(os.urandom(5 << 20))  # more than one chunk
    (project / "link.py").symlink_to("main.py")
    assert await api.ship_project("exe_p", _job(project))
    staging = tmp_path / "worker" / "exe_p"
    job = await worker.fetch_project("exe_p", _job(project), staging)
    got = Path(job.project_dir or "")
    assert got == staging / "project"
    assert (got / "main.py").read_text() == "print('hi')\n"
    assert (got / "pkg" / "data.bin").read_bytes() == (project / "pkg" / "data.bin").read_bytes()
    assert (got / "pkg" / "empty").is_dir()
    assert os.readlink(got / "link.py") == "main.py"
    with pytest.raises(Exception, match="no longer in Redis"):  # fetched once: the key is gone
        await worker.fetch_project("exe_p", _job(project), tmp_path / "again")
    assert not await api.ship_project("exe_eval", _job(None))


@pytest.mark.redis
async def test_oversized_project_is_refused(redis_settings: Settings, tmp_path: Path) -> None:
    bus = create_bus(redis_settings.model_copy(update={"redis_max_project_bytes": 50_000}))
    project = tmp_path / "project"
    project.mkdir()
    (project / "big.txt").write_text("x" * 60_000)
    try:
        with pytest.raises(PayloadTooLarge, match="PYEXEC_REDIS_MAX_PROJECT_BYTES"):
            await bus.ship_project("exe_big", _job(project))
        assert not (tmp_path / "project.tar").exists()
    finally:
        await bus.close()
