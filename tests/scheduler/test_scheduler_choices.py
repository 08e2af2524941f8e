"""A request's ``n`` choices are routed once and reserve one prompt plus ``n`` decode tails."""

from scheduler import DecodeInstanceState, RequestSpec, RouteDecision, Scheduler, SchedulerConfig


def test_n_choices_reserve_the_prompt_once_and_a_tail_each():
    s = Scheduler(SchedulerConfig(default_prefill_tokens_per_s=10_000.0), clock=lambda: 100.0)
    s.add_instance("p0", "prefill")
    s.add_instance("d0", "decode")
    s.update_decode(DecodeInstanceState("d0", 1000, 1000))
    prompt = list(range(1000, 1300))  # 300 tokens: 4 full 64-token pages and 44 more
    one = s.route(RequestSpec.from_token_ids("one", prompt, 100, 64))
    three = s.route(RequestSpec.from_token_ids("three", prompt, 100, 64, num_choices=3))
    assert isinstance(one, RouteDecision) and isinstance(three, RouteDecision)
    assert one.num_reserved_pages == 7  # ceil(400 / 64)
    assert three.num_reserved_pages == 7 + 2 * (7 - 4)  # choices 2 and 3 share the full pages
    assert s.reserved_pages("d0") == 7 + 13
    s.on_finished("three")
    assert s.reserved_pages("d0") == 7
