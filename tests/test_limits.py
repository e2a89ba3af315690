"""The limits' own logic, with explicit clocks (no servers): the per-principal rate limit, the
failed-login limit, the cap on waiting requests, and the page cap of the OCI listings."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import REGISTRY

from services.auth.http import FailureLimiter, RateLimiter
from services.core.objectstore import ObjectStore
from services.core.records import ManifestStored, TagMoved, new_id
from services.core.settings import Settings
from services.core.waits import WaitLimit
from services.query.http import QueryApi
from services.query.index import Index
from services.query.oci import MAX_PAGE
from tests.registry_events import digest_of, image_manifest, repository_event

# RateLimiter: `rate` a second, bursts of twice that, per key.


def test_a_burst_of_twice_the_rate_goes_then_the_next_request_waits():
    limiter = RateLimiter(5)
    assert [limiter.wait("alice", now=100.0) for _ in range(10)] == [0.0] * 10
    assert limiter.wait("alice", now=100.0) == pytest.approx(0.2)
    # Refused requests are not counted: asking again at once is told the same wait.
    assert limiter.wait("alice", now=100.0) == pytest.approx(0.2)


def test_the_bucket_refills_at_the_rate_and_no_further_than_the_burst():
    limiter = RateLimiter(5)
    for _ in range(10):
        limiter.wait("alice", now=0.0)
    assert limiter.wait("alice", now=0.1) == pytest.approx(0.1)  # half a token back
    assert limiter.wait("alice", now=0.2) == 0.0  # one token back, and spent
    assert limiter.wait("alice", now=0.2) > 0
    # An hour idle fills the bucket to the burst, not to 18,000 requests.
    assert [limiter.wait("alice", now=3600.0) for _ in range(10)] == [0.0] * 10
    assert limiter.wait("alice", now=3600.0) > 0


def test_each_principal_has_a_bucket_of_its_own():
    limiter = RateLimiter(1)
    assert limiter.wait("alice", now=0.0) == limiter.wait("alice", now=0.0) == 0.0
    assert limiter.wait("alice", now=0.0) == pytest.approx(1.0)
    assert limiter.wait("carol", now=0.0) == 0.0
    assert limiter.wait("ip:10.0.0.1", now=0.0) == 0.0


def test_forgetting_idle_buckets_forgets_only_full_ones():
    limiter = RateLimiter(1)
    limiter.wait("busy", now=10.0)
    limiter.wait("busy", now=10.0)
    limiter.wait("idle", now=0.0)
    limiter._forget_full(10.5)
    assert set(limiter.buckets) == {"busy"}
    assert limiter.wait("busy", now=10.5) == pytest.approx(0.5)  # still empty, still waits


# FailureLimiter: failed logins per key in a sliding window.


def test_failures_up_to_the_limit_then_a_wait_until_the_oldest_leaves_the_window():
    limiter = FailureLimiter(3, window=60.0)
    for at in (0.0, 10.0):
        limiter.failed("user:alice", now=at)
        assert limiter.wait("user:alice", now=at) == 0.0
    limiter.failed("user:alice", now=20.0)
    assert limiter.wait("user:alice", now=20.0) == pytest.approx(40.0)
    assert limiter.wait("user:alice", now=59.0) == pytest.approx(1.0)
    # At 60 the first failure is a window old: two remain, one more attempt may go.
    assert limiter.wait("user:alice", now=60.0) == 0.0
    assert limiter.wait("user:carol", now=20.0) == 0.0


def test_failures_past_the_limit_wait_until_enough_have_left_the_window():
    # Attempts that were checked together and failed together can leave more failures than
    # the limit: the wait is until fewer than the limit remain, not until the oldest leaves.
    limiter = FailureLimiter(2, window=60.0)
    for at in (0.0, 1.0, 2.0, 3.0):
        limiter.failed("ip:10.0.0.1", now=at)
    assert limiter.wait("ip:10.0.0.1", now=3.0) == pytest.approx(59.0)
    assert limiter.wait("ip:10.0.0.1", now=61.5) == pytest.approx(0.5)
    assert limiter.wait("ip:10.0.0.1", now=62.0) == 0.0


def test_a_key_whose_failures_all_left_the_window_is_forgotten():
    limiter = FailureLimiter(1, window=5.0)
    limiter.failed("user:alice", now=0.0)
    assert limiter.wait("user:alice", now=4.9) == pytest.approx(0.1)
    assert limiter.wait("user:alice", now=5.0) == 0.0
    assert "user:alice" not in limiter.failures


# WaitLimit: at most `limit` requests wait at once.


def _sample(name: str) -> float:
    value = REGISTRY.get_sample_value(name)
    return 0.0 if value is None else value


def test_a_wait_limit_refuses_past_its_limit_and_counts_what_it_holds_and_refuses():
    waiting, refused = _sample("layerlog_waiting_requests"), _sample("layerlog_wait_refusals_total")
    limit = WaitLimit(2)
    assert limit.try_take() and limit.try_take()
    assert _sample("layerlog_waiting_requests") == waiting + 2
    assert not limit.try_take()
    assert limit.waiting == 2
    assert _sample("layerlog_wait_refusals_total") == refused + 1
    limit.give()
    assert limit.try_take()
    limit.give()
    limit.give()
    assert limit.waiting == 0 and _sample("layerlog_waiting_requests") == waiting


def test_a_wait_limit_below_one_is_refused():
    with pytest.raises(ValueError, match="at least 1"):
        WaitLimit(0)


# The page cap: ?n= past MAX_PAGE gets MAX_PAGE and a Link to the rest.


async def test_a_page_is_at_most_max_page_whatever_n_asks(tmp_path):
    index = Index(str(tmp_path / "index.sqlite"))
    name = "limits/pages"
    body = image_manifest("paged")
    digest = digest_of(body)
    stored = repository_event(
        ManifestStored,
        name,
        new_id(),
        digest=digest,
        media_type="application/vnd.oci.image.manifest.v1+json",
        size=len(body),
        body=body,
        object_key=f"manifests/{name}/{digest}",
        subject=None,
        artifact_type=None,
    )
    tags = [f"t{i:05d}" for i in range(MAX_PAGE + 5)]
    moves = [
        repository_event(TagMoved, name, new_id(), tag=tag, digest=digest, previous_digest=None)
        for tag in tags
    ]
    # The index as the projection builds it, from the events themselves.
    index.apply("limits.events", [stored, *moves], {0: len(moves) + 1})
    api = QueryApi(index, ObjectStore(Settings()), None)  # storage is not asked
    async with TestClient(TestServer(api.app())) as client:
        for query in ("", "?n=20000", f"?n={'9' * 50}"):
            response = await client.get(f"/v2/{name}/tags/list{query}")
            assert response.status == 200
            assert (await response.json())["tags"] == tags[:MAX_PAGE]
            link = response.headers["Link"]
            assert link == (
                f'</v2/{name}/tags/list?n={MAX_PAGE}&last={tags[MAX_PAGE - 1]}>; rel="next"'
            )
        response = await client.get(link[1 : link.index(">")])
        assert (await response.json())["tags"] == tags[MAX_PAGE:]
        assert "Link" not in response.headers
