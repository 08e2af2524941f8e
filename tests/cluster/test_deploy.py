"""The deploy files: Prometheus keeps its own target labels, KubeRay pods declare the metrics
port and the PodMonitor selects them by labels KubeRay really sets."""

from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_prometheus_config_keeps_target_labels_and_scrapes_ray():
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "ray" and job["honor_labels"] is False
    assert job["file_sd_configs"][0]["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]


def test_kuberay_pods_expose_metrics_and_the_monitor_matches_them():
    service, monitor = yaml.safe_load_all((DEPLOY / "kuberay" / "rayservice-h200.yaml").read_text())
    cluster = service["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        assert group["rayStartParams"]["metrics-export-port"] == "8080"
        (container,) = group["template"]["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["metrics"] == 8080, group.get("groupName", "head")
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert "/models" in mounts  # the ingress (maybe on the head) reads config + tokenizer
    head_env = {
        e["name"] for e in cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert "TIDAL_ADMIN_TOKEN" in head_env
    selector = monitor["spec"]["selector"]
    assert "ray.io/cluster" not in selector.get("matchLabels", {})  # KubeRay adds a hash
    assert selector["matchLabels"]["ray.io/originated-from-cr-name"] == service["metadata"]["name"]
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics"
