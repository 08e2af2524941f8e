"""The cluster on Ray: rank workers, instances and pools, the Serve ingress, metrics, CLI.

| module | what |
|---|---|
| `config.py` | `ClusterConfig`, `PoolConfig`, `RankResources`, `EngineSpec` (frozen) |
| `settings.py` | `ServeSettings`: the YAML `args` / CLI flags, validated; `.to_config()` |
| `messages.py` | `WorkerError`, `WorkerInfo`, `WorkerStats`, `InstanceView` |
| `worker.py` | `RankWorker` actor: engine + stage by role, step loop, reports, `set_role` |
| `placement.py` | one placement group per instance, one bundle per rank |
| `instance.py` | `Instance` (ranks, rank 0 leads), `start_instance`, `stop_instance` |
| `pool.py` | `PoolManager`: targets per pool, grow/shrink/heal/move, health loop |
| `planning.py` | `PlannerFeed`: measured windows -> P:D recommendation |
| `flow.py` | `Flow`: one request through scheduler, prefill, decode; re-route and resume |
| `protocol.py` | OpenAI request bodies (pydantic): known, unhonourable (400) and unknown fields |
| `text.py` | `TextStream`: incremental text + stop strings |
| `tool_calls.py` | `ToolCallParser`: K2's tool-call section -> OpenAI `tool_calls` (incremental) |
| `responses.py` | `Response`, `Choice`: n choices' text, tool calls, logprobs as JSON or SSE |
| `errors.py` | `ApiError` in OpenAI's error shape |
| `ingress.py` | FastAPI routes on a Serve deployment |
| `metrics.py` | `tidal_*` metrics via `ray.util.metrics`; `/metrics` scrape |
| `app.py` | `build_app(args)` for `serve run` / `serve deploy` |
| `serve.py` | `run_from_args` behind `tidal serve` |
| `cli.py` | the `tidal` command |

Failure policy (docs/architecture.md): a worker that refuses work sends the request back to the
scheduler; a dead prefill worker's request is re-routed; a dead decode worker's request is
*resumed* on another decode instance from its prompt plus the tokens already streamed, so the
client's stream continues (greedy output unchanged). Dead instances are replaced.
"""
