"""A TTFT objective through the real server (``--harli-ttft-slo-ms``, on the shared keyed server): a
request that arrives while finetune work runs beside decode has its prefill held one decode step while
the objective leaves room, decode outputs stay token for token, and the first tokens are measured against
the objective. (Without an objective no prefill is held: ``test_colocation``; the rule itself, with a fake
clock: ``test_prefill``.)"""

from helpers.jobs import PROMPTS, job_spec, wait_for
from helpers.servers import ADMIN_KEY, USER_KEY
from helpers.streams import LOAD_ROUNDS, decode_load
from sglang_harli.server_process import RunningServer

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}  # what changes state: submit, cancel
USER = {"Authorization": f"Bearer {USER_KEY}"}  # generate, read


class Keyed(RunningServer):
    """The keyed server, each call with the key it needs (``test_auth``)."""

    def post(self, path, body, **kwargs):
        return super().post(path, body, headers=ADMIN, **kwargs)

    def get(self, path, **kwargs):
        return super().get(path, headers=USER, **kwargs)


def test_with_an_objective_a_prefill_arriving_during_work_waits_one_decode_step(keyed_server):
    server = Keyed(keyed_server.url)
    reference = decode_load(server, headers=USER)  # in lockstep: the same outputs as staggered, below
    resp = server.post(
        "/harli/jobs", job_spec("held", {"records": [{"text": p} for p in PROMPTS]}, epochs=1000)
    )
    assert resp.status_code == 201, resp.text
    wait_for(server, "held", lambda s: s["step"] >= 1)
    # staggered, so that requests arrive while others decode: every request completed, token for token
    assert decode_load(server, stagger_s=0.07, headers=USER) == reference
    stats = server.get("/harli/stats").json()
    job = server.post("/harli/jobs/held/cancel", {}).json()
    assert job["state"] == "cancelled" and job["tokens_trained"] > 0

    prefill = stats["colocation"]["prefill"]
    assert stats["config"]["ttft_slo_ms"] == 60000 and prefill["ttft"]["objective_set"]
    assert prefill["ttft"]["objective_ms"] == 60000 and prefill["ttft"]["slo_attainment"] == 1.0
    assert prefill["ttft"]["count"] >= 2 * 8 * LOAD_ROUNDS
    # clients sent their next prompt as one finished, while units ran: those prefills came after a
    # decode step, and each was a hold the objective allowed
    assert stats["prefills_deferred"] > 0 and prefill["held"] >= stats["prefills_deferred"]
