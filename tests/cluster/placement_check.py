"""Run by test_placement.py in its own process: a Ray cluster of two fake nodes
(``ray.cluster_utils.Cluster``), one offering the custom resource ``pool-prefill`` and the other
``pool-decode``; a pool manager asked for prefill ranks on the first and decode ranks on the
second. Prints one JSON line with where every instance landed."""

import json
import sys
import time

import ray
from ray.cluster_utils import Cluster


def main(model_dir: str) -> None:
    from cluster.pool import PoolManager
    from cluster.settings import ServeSettings

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    prefill_node = cluster.add_node(num_cpus=1, resources={"pool-prefill": 4})
    decode_node = cluster.add_node(num_cpus=1, resources={"pool-decode": 4})
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    try:
        config = ServeSettings(
            model=model_dir,
            prefill=1,
            decode=1,
            cpus_per_rank=0.25,
            num_pages=32,
            prefill_resources={"pool-prefill": 1},
            decode_resources={"pool-decode": 1},
        ).to_config()
        pool = ray.remote(PoolManager).options(num_cpus=0).remote(config)
        deadline = time.monotonic() + 180
        while not ray.get(pool.health.remote())["is_ready"]:
            assert time.monotonic() < deadline, "pools did not come up"
            time.sleep(0.5)
        snap = ray.get(pool.snapshot.remote())
        print(
            json.dumps(
                {
                    "prefill_node": prefill_node.node_id,
                    "decode_node": decode_node.node_id,
                    "instances": [
                        {"role": i["role"], "state": i["state"], "node_ids": i["node_ids"]}
                        for i in snap["instances"]
                    ],
                    "available": ray.available_resources(),
                }
            )
        )
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
