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
    assert cfg.scheduler.max_model_len == 262144  # k2-tiny's max_position_embeddings
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
    # unknown fields are kept aside, not refused; n > 1 runs several choices
    lenient = CompletionRequest.model_validate({"model": "m", "prompt": "hi", "n": 2, "bogus": 1})
    assert lenient.n == 2 and lenient.unknown_fields() == ["bogus"]


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


def test_ranks_and_weight_format_reach_the_config(tiny_model_dir):
    cfg = ServeSettings(
        model=str(tiny_model_dir),
        prefill_ranks=2,
        decode_ranks=4,
        ranks_per_node=2,
        weight_format="dequantize",
    ).to_config()
    prefill, decode = cfg.pool("prefill"), cfg.pool("decode")
    assert (prefill.num_ranks, prefill.num_nodes, prefill.ranks_per_node) == (2, 1, 2)
    assert (decode.num_ranks, decode.num_nodes) == (4, 2)
    assert cfg.engine.weight_format == "dequantize"
    mixed = ServeSettings(model=str(tiny_model_dir), colocated=2, colocated_ranks=8).to_config()
    assert (mixed.pool("mixed").num_ranks, mixed.pool("mixed").num_nodes) == (8, 1)
    assert ServeSettings(model=str(tiny_model_dir)).to_config().engine.weight_format == "auto"


def test_pool_config_ranks_and_nodes():
    from cluster.config import PoolConfig

    assert PoolConfig(1, 96).num_nodes == 12 and PoolConfig(1, 12).num_nodes == 2
    assert PoolConfig(1, 3, ranks_per_node=1).num_nodes == 3
    with pytest.raises(ValueError, match="cannot have 0 ranks"):
        PoolConfig(1, 0)
    with pytest.raises(ValueError, match="ranks_per_node=0"):
        PoolConfig(1, 2, ranks_per_node=0)


def test_rank_settings_say_what_to_fix(tiny_model_dir, tiny_fp8_model_dir):
    from cluster.memory_plan import PlanError

    with pytest.raises(ValidationError, match="decode_ranks"):
        ServeSettings(decode_ranks=0)
    with pytest.raises(ValidationError, match="ranks_per_node"):
        ServeSettings(ranks_per_node=0)
    with pytest.raises(ValidationError, match="prefill_ranks .*use colocated_ranks"):
        ServeSettings(colocated=1, prefill_ranks=2)
    with pytest.raises(ValidationError, match="colocated_ranks sizes mixed instances"):
        ServeSettings(colocated_ranks=2)
    with pytest.raises(ValidationError, match="reserve_gb 90 leaves nothing"):
        ServeSettings(gpu_mem_gb=80, reserve_gb=90)
    with pytest.raises(ValidationError, match="weight_format"):
        ServeSettings(weight_format="bf16")
    with pytest.raises(ValidationError, match="redundant_experts"):
        ServeSettings(redundant_experts=-1)
    # k2-tiny has 8 routed experts: 3 ranks cannot split them
    with pytest.raises(PlanError, match=r"decode: 8 routed experts .* 3 ranks.*e\.g\. 2 or 4"):
        ServeSettings(model=str(tiny_model_dir), decode_ranks=3).to_config()
    with pytest.raises(PlanError, match="needs a block-FP8 checkpoint"):
        ServeSettings(model=str(tiny_model_dir), weight_format="fp8").to_config()
    fp8 = ServeSettings(model=str(tiny_fp8_model_dir), weight_format="fp8").to_config()
    assert fp8.engine.weight_format == "fp8"


def test_memory_check_on_cpu_is_skipped_unless_gpu_mem_gb_is_set(tiny_model_dir, caplog):
    import logging

    settings = ServeSettings(model=str(tiny_model_dir), decode_ranks=2)
    with caplog.at_level(logging.INFO, logger="cluster.settings"):
        assert settings.check_memory("cpu") is None
    assert "memory plan skipped: device cpu and no gpu_mem_gb" in caplog.text
    planned = ServeSettings(model=str(tiny_model_dir), decode_ranks=2, gpu_mem_gb=1.0).check_memory(
        "cpu"
    )
    decode = planned.ranks[1]
    assert (decode.layout.num_ranks, decode.num_expert_slots) == (2, 4)
    assert planned.options.num_cache_tokens == 262144  # default: one max_model_len context
    assert planned.held.name == "float32" and planned.options.kv_format == "fp32"
