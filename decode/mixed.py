"""The colocated baseline: one instance prefills and decodes, no KV transfer.

Every prompt is prefilled here in chunks of ``prefill_token_budget`` tokens, interleaved with the
decode steps of the running batch (the same code path as decode-local prefill), with a prefix
cache of full KV pages shared across requests. This is the configuration every disaggregation
claim is measured against, so it runs the same engine calls, batch sizes and prefix reuse as the
disaggregated stages; only the transfer is absent.
"""

from __future__ import annotations

from decode.jobs import DecodeConfig, DecodeJob
from decode.stage import DecodeStage

MIXED_DEFAULTS = DecodeConfig(enable_prefix_cache=True)


class MixedStage(DecodeStage):
    """The DecodeStage API on an instance that prefills every prompt itself.

    ``start(job)`` takes jobs with ``first_token_id=None``; ``reserve`` is refused (there is no
    receiver: route transfers to decode instances).
    """

    def __init__(self, engine, config: DecodeConfig = MIXED_DEFAULTS) -> None:
        super().__init__(engine, config, receiver=None)

    def start(self, job: DecodeJob) -> None:
        if job.first_token_id is not None:
            raise ValueError(
                f"request {job.request_id!r}: a mixed instance prefills its prompts itself; "
                "send first_token_id=None"
            )
        super().start(job)
