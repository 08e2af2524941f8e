"""Run by test_placement.py in its own process: one expert-parallel instance over two fake nodes.

A Ray cluster of two nodes (``ray.cluster_utils.Cluster``, one CPU each) and a pool manager
asked for one colocated instance of two ranks with one rank per node: the placement group puts
one bundle on each node, the ranks meet over gloo, and each rank serves a request of its own
(the worker's real decode path, prompt prefilled there). Prints one JSON line: where the ranks
landed and the tokens each request produced.
"""

import json
import sys
import time

import ray
from ray.cluster_utils import Cluster

PROMPTS = [[5, 17, 99, 3, 250, 31, 7], [11, 2, 480, 64, 64, 9, 120, 33, 1]]
MAX_TOKENS = 8


def main(model_dir: str) -> None:
    from cluster.pool import PoolManager
    from cluster.settings import ServeSettings
    from decode.jobs import DecodeJob

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    try:
        config = ServeSettings(
            model=model_dir,
            colocated=1,
            colocated_ranks=2,
            ranks_per_node=1,
            cpus_per_rank=0.5,
            num_pages=64,
        ).to_config()
        pool = ray.remote(PoolManager).options(num_cpus=0).remote(config)
        deadline = time.monotonic() + 180
        while not (health := ray.get(pool.health.remote()))["is_ready"]:
            assert health["last_error"] is None, health["last_error"]
            assert time.monotonic() < deadline, "pools did not come up"
            time.sleep(0.5)
        snap = ray.get(pool.snapshot.remote())
        units = ray.get(pool.handles.remote())
        outputs = {}
        for (uid, handle), prompt in zip(sorted(units.items()), PROMPTS, strict=True):
            job = DecodeJob(f"req-{uid}", prompt, None, max_tokens=MAX_TOKENS, ignore_eos=True)
            assert ray.get(handle.start.remote(job)) is None
            ids: list[int] = []
            while True:
                batch = ray.get(handle.poll.remote(job.request_id, len(ids), 5.0))
                assert batch.error is None, batch.error
                ids += batch.token_ids
                if batch.finished:
                    break
            outputs[uid] = ids
        print(
            json.dumps(
                {
                    "nodes": [n.node_id for n in nodes],
                    "instances": [
                        {
                            "state": i["state"],
                            "num_ranks": i["num_ranks"],
                            "node_ids": i["node_ids"],
                        }
                        for i in snap["instances"]
                    ],
                    "outputs": outputs,
                }
            )
        )
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
