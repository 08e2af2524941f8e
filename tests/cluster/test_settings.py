"""ServeSettings -> ClusterConfig, and the request bodies' validation (no Ray needed)."""

import pytest
from pydantic import ValidationError

from cluster.protocol import ChatCompletionRequest, CompletionRequest
from cluster.settings import ServeSettings


def test_disaggregated_config_from_model_dir(tiny_model_dir):
    cfg = ServeSettings(
        model=str(tiny_model_dir), prefill=2, decode=1, cpus_per_rank=0.5
    ).to_config()
    assert cfg.pool("prefill").num_instances == 2 and cfg.pool("decode").num_instances == 1
    assert cfg.pool("mixed").num_instances == 0
    assert cfg.scheduler.max_model_len == 8192  # k2-tiny's max_position_embeddings
    assert cfg.pool("decode").resources.bundle(has_gpus=False) == {"CPU": 0.5}
    assert cfg.pool("decode").resources.bundle(has_gpus=True) == {"CPU": 0.5, "GPU": 1.0}
    # kv_format auto with the float32 default: fp32 latent, (kv_lora_rank 128 + rope 16) x 4
    # bytes x 3 layers, on the wire too
    assert cfg.engine.kv_format == "fp32" and cfg.wire_format == "fp32"
    assert cfg.scheduler.kv_bytes_per_token == (128 + 16) * 4 * 3


def test_kv_format_auto_follows_the_dtype_and_names_stay_available(tiny_model_dir):
    def formats(**kw):
        cfg = ServeSettings(model=str(tiny_model_dir), **kw).to_config()
        return cfg.engine.kv_format, cfg.wire_format, cfg.scheduler.kv_bytes_per_token

    assert formats(dtype="bfloat16") == ("bf16", "bf16", (128 + 16) * 2 * 3)
    assert formats(kv_format="bf16") == ("bf16", "bf16", (128 + 16) * 2 * 3)
    assert formats(kv_format="fp8", wire_format="fp8")[:2] == ("fp8", "fp8")
    assert formats(dtype="float16", kv_format="fp32")[0] == "fp32"
    with pytest.raises(ValidationError, match="float16 has no KV format"):
        ServeSettings(dtype="float16")


def test_colocated_replaces_pools(tiny_model_dir):
    cfg = ServeSettings(
        model=str(tiny_model_dir), colocated=3, mixed_resources={"x": 1}
    ).to_config()
    assert set(cfg.pools) == {"mixed"} and cfg.pool("mixed").num_instances == 3
    assert cfg.pool("mixed").resources.bundle(False) == {"CPU": 1.0, "x": 1}


def test_bad_settings_say_what_to_fix(tmp_path):
    with pytest.raises(ValidationError, match="no decode instance"):
        ServeSettings(prefill=1, decode=0)
    with pytest.raises(ValidationError, match="Extra inputs"):
        ServeSettings(prefil=1)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ServeSettings(model=str(tmp_path)).model_dir()


def test_request_bodies():
    ok = CompletionRequest.model_validate({"model": "m", "prompt": [[1, 2, 3]], "top_k": -1})
    assert ok.prompt == [1, 2, 3] and ok.sampling().top_k == 0
    assert CompletionRequest.model_validate(
        {"model": "m", "prompt": "hi", "stop": "x"}
    ).stop_strings == ["x"]
    for bad in (
        {"model": "m", "prompt": "hi", "max_tokens": -1},
        {"model": "m", "prompt": ["a", "b"]},
        {"model": "m", "prompt": []},
        {"model": "m", "prompt": "hi", "n": 2},
        {"model": "m", "prompt": "hi", "bogus": 1},
        {"model": "m", "prompt": "hi", "temperature": "hot"},
    ):
        with pytest.raises(ValidationError):
            CompletionRequest.model_validate(bad)
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"model": "m", "messages": []})
    chat = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}],
            "max_completion_tokens": 5,
        }
    )
    assert chat.max_new_tokens == 5 and chat.messages[0].text() == "a"


def test_serve_configs_in_deploy_validate():
    """Every Serve config in deploy/ imports cluster.app:build_app with valid args."""
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[2]
    configs = {p: yaml.safe_load(p.read_text()) for p in (root / "deploy").glob("serve-*.yaml")}
    assert configs, "deploy/serve-local.yaml is missing"
    for path in (root / "deploy" / "kuberay").glob("*.yaml"):  # RayService: embedded Serve config
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and "serveConfigV2" in doc.get("spec", {}):
                configs[path] = yaml.safe_load(doc["spec"]["serveConfigV2"])
    for path, config in configs.items():
        for app in config["applications"]:
            assert app["import_path"] == "cluster.app:build_app", path
            ServeSettings(**app.get("args", {}))  # raises on an unknown key or a bad value


def test_build_app_validates_args(tiny_model_dir):
    from cluster.app import build_app

    app = build_app({"model": str(tiny_model_dir), "colocated": 1, "cpus_per_rank": 0.5})
    assert type(app).__name__ == "Application"
    with pytest.raises(ValidationError, match="colocatd"):
        build_app({"colocatd": 1})
