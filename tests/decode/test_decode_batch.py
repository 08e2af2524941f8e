"""Stop conditions and batch selection (plain Python)."""

from decode.batch import DecodeSeq, SeqState, select_batch, stop_ids_for
from decode.jobs import DecodeJob


def seq_for(job, eos=(2,)):
    return DecodeSeq(job, stop_ids_for(job, eos), SeqState.RUNNING)


def test_eos_stops_unless_ignored_and_stop_ids_always_stop():
    job = DecodeJob("r", [1], max_tokens=10, stop_token_ids=(9,))
    seq = seq_for(job)
    assert seq.accept(5) == (True, None)
    assert seq.accept(2) == (False, "stop")
    ignoring = seq_for(DecodeJob("r", [1], max_tokens=10, stop_token_ids=(9,), ignore_eos=True))
    assert ignoring.accept(2) == (True, None)
    assert ignoring.accept(9) == (False, "stop")
    assert ignoring.num_output == 1 and ignoring.last_token_id == 2


def test_max_tokens_gives_length_and_positions_advance():
    seq = seq_for(DecodeJob("r", [1, 2, 3], max_tokens=2))
    assert seq.accept(7) == (True, None)
    assert seq.position == 3  # output token 0 sits right after the 3-token prompt
    assert seq.accept(8) == (True, "length")


def test_select_batch_skips_blocked_and_caps_size():
    seqs = [seq_for(DecodeJob(f"r{i}", [1], max_tokens=4)) for i in range(5)]
    batch = select_batch(seqs, 3, lambda s: s.request_id == "r1")
    assert [s.request_id for s in batch] == ["r0", "r2", "r3"]
