"""A short soak (``benchmark.soak``) on the shared server, after every other test on it but the fuzzer:
sustained streaming decode, jobs submitted, published, cancelled and completed, adapters requested while
new versions swap in. Zero failed requests, no memory growth from cycle to cycle, and every KV page back in
the pool at the end (the server checks every lent page on return: ``--harli-kv-poison``)."""

from benchmark.soak import run_soak


def test_soak_loses_nothing_and_leaks_nothing(server):
    report = run_soak(server, cycles=4, min_requests=60)
    assert report.failures == 0, report.failure_samples
    assert report.requests > 50 and report.adapter_requests > 0
    assert report.job_states == {
        "soak-0": "completed",
        "soak-1": "cancelled",
        "soak-2": "completed",
        "soak-3": "cancelled",
    }
    assert report.versions_published >= 6
    # Memory after the first cycle (everything warmed up) bounds every later cycle's.
    assert max(report.rss_mib[1:]) - report.rss_mib[0] < 0.02 * report.rss_mib[0], report.rss_mib
    assert report.lent_tokens_end == 0 and report.poison_violations == 0
    assert report.free_tokens_end + report.cached_tokens_end == report.pool_tokens
    assert report.ordinary_activation_bytes_end == 0
