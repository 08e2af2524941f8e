"""``tidal plan``: parameter counts, bytes per rank (as the engine holds them), refusals, the
CLI, and the check ``tidal serve`` / ``build_app`` run on deploy settings."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.cli import main
from cluster.memory_plan import (
    Hardware,
    HeldWeights,
    ModelWeights,
    PlanError,
    PlanOptions,
    RoleLayout,
    kv_bytes_per_token_per_layer,
    load_config,
    plan_cluster,
)
from model.config import ModelConfig

# Kimi-K2-Instruct-0905's config.json (the numbers the plan reads).
K2_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "kimi_k2",
    "hidden_size": 7168,
    "num_hidden_layers": 61,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "num_attention_heads": 64,
    "num_key_value_heads": 64,
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "n_routed_experts": 384,
    "num_experts_per_tok": 8,
    "n_shared_experts": 1,
    "moe_intermediate_size": 2048,
    "intermediate_size": 18432,
    "vocab_size": 163840,
    "max_position_embeddings": 262144,
    "rope_theta": 50000.0,
    "rope_scaling": {
        "type": "yarn",
        "factor": 64.0,
        "original_max_position_embeddings": 4096,
        "beta_fast": 1.0,
        "beta_slow": 1.0,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
    "n_group": 1,
    "topk_group": 1,
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.827,
    "tie_word_embeddings": False,
    "num_nextn_predict_layers": 0,
    "torch_dtype": "bfloat16",
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    },
}
# DeepSeek-V3 differs only in numbers.
DSV3_CONFIG = {
    **K2_CONFIG,
    "model_type": "deepseek_v3",
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "n_routed_experts": 256,
    "first_k_dense_replace": 3,
    "n_group": 8,
    "topk_group": 4,
    "routed_scaling_factor": 2.5,
    "max_position_embeddings": 163840,
    "rope_scaling": {**K2_CONFIG["rope_scaling"], "factor": 40.0},
    "num_nextn_predict_layers": 1,  # the MTP layer: not loaded by tidal, not counted
}
K2_PARAMS = 1_026_408_232_448  # what the formula gives; Moonshot quotes "1T total"
DSV3_PARAMS = 671_521_871_360  # DeepSeek quotes 671B main model (+14B MTP, not loaded)
H200 = Hardware(gpu_mem_gb=141, ranks_per_node=8)
FP8_BF16 = HeldWeights("bfloat16", is_fp8=True)
K2_LAYOUT = [RoleLayout("prefill", 32), RoleLayout("decode", 96)]


@pytest.fixture
def k2_dir(tmp_path: Path) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(K2_CONFIG))
    return tmp_path


def _plan_cli(k2_dir: Path, *flags: str) -> int:
    return main(["plan", "--model", str(k2_dir), "--gpu-mem-gb", "141", *flags])


# ---- parameter counts --------------------------------------------------------------------------
def test_k2_parameter_count():
    weights = ModelWeights(ModelConfig.from_dict(K2_CONFIG))
    assert weights.num_params == K2_PARAMS
    assert weights.num_params == pytest.approx(1.03e12, rel=0.005)
    # 60 MoE layers x 384 experts x 3 x 2048 x 7168 routed, the rest replicated on every rank
    assert weights.num_moe_layers == 60 and weights.num_dense_layers == 1
    assert weights.num_expert_slot_params == 60 * 3 * 2048 * 7168
    assert weights.num_replicated_params == 11_722_208_768


def test_dsv3_parameter_count():
    weights = ModelWeights(ModelConfig.from_dict(DSV3_CONFIG))
    assert weights.num_params == DSV3_PARAMS
    assert weights.num_moe_layers == 58 and weights.num_dense_layers == 3


def _safetensors_tensors(model_dir: Path) -> dict[str, dict]:
    """Name -> {dtype, shape} from every safetensors header (plain Python, no torch)."""
    tensors: dict[str, dict] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with path.open("rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        header.pop("__metadata__", None)
        tensors.update(header)
    return tensors


_DTYPE_BYTES = {"BF16": 2, "F32": 4, "F8_E4M3": 1}


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "dsv3_tiny_model_dir"])
def test_parameter_count_matches_generated_checkpoint(fixture, request):
    model_dir = request.getfixturevalue(fixture)
    tensors = _safetensors_tensors(model_dir)
    weights = ModelWeights(load_config(model_dir))
    assert sum(_numel(t["shape"]) for t in tensors.values()) == weights.num_params
    stored = sum(_numel(t["shape"]) * _DTYPE_BYTES[t["dtype"]] for t in tensors.values())
    assert stored == weights.stored_bytes()


def test_fp8_bytes_match_generated_checkpoint(tiny_fp8_model_dir):
    tensors = _safetensors_tensors(tiny_fp8_model_dir)
    weights = ModelWeights(load_config(tiny_fp8_model_dir))
    stored = sum(_numel(t["shape"]) * _DTYPE_BYTES[t["dtype"]] for t in tensors.values())
    assert stored == weights.stored_bytes()
    index = json.loads((tiny_fp8_model_dir / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == stored
    values = sum(_numel(t["shape"]) for n, t in tensors.items() if not n.endswith("_scale_inv"))
    assert values == weights.num_params


def test_kv_bytes_match_the_cache():
    from model.kv_cache import bytes_per_token

    assert kv_bytes_per_token_per_layer("bf16", 512, 64) == 1152
    assert kv_bytes_per_token_per_layer("fp8", 512, 64) == 656
    for fmt in ("bf16", "fp8", "fp32"):
        for rank, rope in ((512, 64), (128, 16)):
            assert kv_bytes_per_token_per_layer(fmt, rank, rope) == bytes_per_token(fmt, rank, rope)


# ---- plans and refusals ------------------------------------------------------------------------
def test_k2_fp8_on_one_h200_is_refused():
    with pytest.raises(PlanError, match=r"1,030.0 GB of fp8\+bfloat16 weights.*at least 12 ranks"):
        plan_cluster(
            ModelConfig.from_dict(K2_CONFIG), [RoleLayout("decode", 1)], H200, PlanOptions()
        )


def test_k2_on_h200_prefill_4_nodes_decode_12_nodes_fits():
    options = PlanOptions(weight_format="fp8", kv_format="bf16", require_context_len=262144)
    plan = plan_cluster(ModelConfig.from_dict(K2_CONFIG), K2_LAYOUT, H200, options)
    prefill, decode = plan.ranks
    assert (prefill.num_nodes, prefill.num_expert_slots) == (4, 12)
    assert (decode.num_nodes, decode.num_expert_slots) == (12, 4)
    assert decode.kv_bytes_per_token == 70_272
    assert decode.num_kv_tokens >= 262144 and decode.max_context_len == 262144
    assert 24 * 10**9 < decode.weight_bytes < 26 * 10**9
    assert 45 * 10**9 < prefill.weight_bytes < 47 * 10**9
    assert "decode      1     96     12        4" in plan.table()


def test_redundant_experts_add_slots():
    cfg = ModelConfig.from_dict(K2_CONFIG)
    weights = ModelWeights(cfg)
    base, extra = (
        plan_cluster(cfg, [RoleLayout("decode", 96)], H200, PlanOptions(num_redundant_experts=n))
        for n in (0, 2)
    )
    assert extra.ranks[0].num_expert_slots == 6
    added = extra.ranks[0].weight_bytes - base.ranks[0].weight_bytes
    assert added == 2 * weights.expert_slot_bytes(FP8_BF16)


def test_required_context_that_does_not_fit_is_refused():
    cfg = ModelConfig.from_dict(K2_CONFIG)
    options = PlanOptions(require_context_len=262144)
    tight = Hardware(gpu_mem_gb=141, reserve_gb=110)  # ~16 GB of KV at 96 ranks
    with pytest.raises(PlanError, match=r"fewer than the required 262,144.*fp8 KV"):
        plan_cluster(cfg, [RoleLayout("decode", 96)], tight, options)
    with pytest.raises(PlanError, match="max_position_embeddings 262,144"):
        plan_cluster(cfg, K2_LAYOUT, H200, PlanOptions(require_context_len=300_000))


def test_fp8_weights_need_an_fp8_checkpoint():
    raw = {k: v for k, v in K2_CONFIG.items() if k != "quantization_config"}
    with pytest.raises(PlanError, match="block-FP8 checkpoint"):
        plan_cluster(ModelConfig.from_dict(raw), K2_LAYOUT, H200, PlanOptions("fp8"))


def test_dsv3_on_h200():
    cfg = ModelConfig.from_dict(DSV3_CONFIG)
    with pytest.raises(PlanError, match=r"256 routed experts .* 96 ranks.*64 or 128"):
        plan_cluster(cfg, K2_LAYOUT, H200, PlanOptions())
    options = PlanOptions(require_context_len=163840)
    layouts = [RoleLayout("prefill", 32), RoleLayout("decode", 64)]
    prefill, decode = plan_cluster(cfg, layouts, H200, options).ranks
    assert (prefill.num_expert_slots, decode.num_expert_slots) == (8, 4)
    assert decode.max_context_len == 163840


# ---- the CLI -----------------------------------------------------------------------------------
def test_cli_plan_prints_a_table(k2_dir, capsys):
    flags = ["--prefill-ranks", "32", "--decode-ranks", "96", "--require-context", "262144"]
    assert _plan_cli(k2_dir, *flags) == 0
    out = capsys.readouterr().out
    assert "1,026,408,232,448 params" in out
    assert "prefill" in out and "decode" in out and "262,144" in out


def test_cli_plan_refusals_exit_2(k2_dir, capsys):
    assert _plan_cli(k2_dir, "--decode-ranks", "1") == 2
    assert "at least 12 ranks per decode instance" in capsys.readouterr().err
    assert _plan_cli(k2_dir, "--decode-ranks", "100") == 2
    assert "e.g. 96 or 128" in capsys.readouterr().err
    flags = ["--weight-format", "dequantize", "--reserve-gb", "90", "--require-context", "262144"]
    assert _plan_cli(k2_dir, "--decode-ranks", "96", *flags) == 2
    assert "fewer than the required 262,144" in capsys.readouterr().err


def test_cli_plan_needs_a_layout(k2_dir, capsys):
    with pytest.raises(SystemExit) as e:
        _plan_cli(k2_dir)
    assert e.value.code == 2
    assert "--prefill-ranks" in capsys.readouterr().err


def test_cli_plan_runs_as_a_process_and_the_planner_needs_no_torch(k2_dir):
    cmd = [sys.executable, "-m", "cluster.cli", "plan", "--model", str(k2_dir / "config.json")]
    cmd += ["--gpu-mem-gb", "141", "--decode-ranks", "96", "--kv-format", "fp8"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "KV fp8 40,016 B/token" in done.stdout
    probe = "import sys, cluster.memory_plan; assert 'torch' not in sys.modules; print('ok')"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.stdout.strip() == "ok", done.stderr


def test_cli_plan_help_and_colocated(k2_dir, capsys):
    with pytest.raises(SystemExit) as e:
        main(["plan", "--help"])
    assert e.value.code == 0
    assert "default 10% of GPU" in capsys.readouterr().out
    assert _plan_cli(k2_dir, "--colocated-ranks", "48") == 0
    assert "mixed       1     48      6        8" in capsys.readouterr().out


# ---- what the engine holds -------------------------------------------------------------------
@pytest.mark.parametrize(
    "fp8, dtype, weight_format",
    [
        (True, "bfloat16", "auto"),  # FP8 linears; kv_b bf16; router fp32
        (True, "bfloat16", "dequantize"),
        (True, "float32", "auto"),
        (False, "bfloat16", "auto"),
        (False, "float32", "auto"),
    ],
)
def test_plan_weight_bytes_equal_the_engine(
    fp8, dtype, weight_format, tiny_model_dir, tiny_fp8_model_dir
):
    """The plan's bytes per rank are ``Engine.weight_bytes``: one rank with every expert, and
    one rank of two with half of them."""
    import torch

    from model import Engine

    model_dir = tiny_fp8_model_dir if fp8 else tiny_model_dir
    cfg = load_config(model_dir)
    options = PlanOptions(weight_format=weight_format, dtype=dtype)
    half = list(range(cfg.n_routed_experts // 2))
    for num_ranks, expert_ids in ((1, None), (2, half)):
        engine = Engine.load(
            model_dir,
            dtype=getattr(torch, dtype),
            max_num_tokens=64,
            weight_format=weight_format,
            expert_ids=expert_ids,
        )
        plan = plan_cluster(cfg, [RoleLayout("decode", num_ranks)], H200, options)
        assert plan.ranks[0].weight_bytes == engine.weight_bytes, (num_ranks, plan.held)


def test_k2_held_bytes_count_kv_b_in_the_dtype_and_the_router_in_fp32():
    cfg = ModelConfig.from_dict(K2_CONFIG)
    weights = ModelWeights(cfg)
    kv_b = 61 * 64 * (128 + 128) * 512  # values: dequantised once at load
    router = 60 * 384 * 7168
    stored = weights.stored_bytes()  # kv_b FP8 with scales, router bf16
    kv_b_stored = kv_b + 61 * (64 * 256 // 128) * (512 // 128) * 4
    assert weights.total_bytes(FP8_BF16) == stored - kv_b_stored + 2 * kv_b + 2 * router
    assert (
        weights.total_bytes(HeldWeights("bfloat16", is_fp8=False))
        == 2 * (weights.num_params + router) + 2 * 60 * 384
    )  # the fp32 bias


def test_plan_speaks_engine_load_weight_formats():
    cfg = ModelConfig.from_dict(K2_CONFIG)
    layout = [RoleLayout("decode", 96)]
    auto, fp8, dequantized = (
        plan_cluster(cfg, layout, H200, PlanOptions(weight_format=f))
        for f in ("auto", "fp8", "dequantize")
    )
    assert auto.held == fp8.held == FP8_BF16 and dequantized.held.name == "bfloat16"
    assert auto.ranks[0].weight_bytes == fp8.ranks[0].weight_bytes
    assert dequantized.ranks[0].weight_bytes > 1.7 * auto.ranks[0].weight_bytes
    with pytest.raises(PlanError, match="weight_format 'bf16'"):
        plan_cluster(cfg, layout, H200, PlanOptions(weight_format="bf16"))


# ---- deploy settings and the check before serving ----------------------------------------------
ROOT = Path(__file__).resolve().parents[2]
H200_DEPLOY_FILES = ("deploy/serve-h200.yaml", "deploy/kuberay/rayservice-h200.yaml")


def _deploy_args(path: str) -> dict:
    """The ``args:`` of the tidal application in a Serve config or a RayService."""
    import yaml

    docs = list(yaml.safe_load_all((ROOT / path).read_text()))
    for doc in docs:
        if "serveConfigV2" in doc.get("spec", {}):
            doc = yaml.safe_load(doc["spec"]["serveConfigV2"])
        if "applications" in doc:
            (app,) = doc["applications"]
            return app["args"]
    raise AssertionError(f"{path}: no Serve application")


def _k2_settings(k2_dir: Path, **kw):
    from cluster.settings import ServeSettings

    args = {"model": str(k2_dir), "dtype": "bfloat16", "device": "cuda", **kw}
    return ServeSettings(**args)


@pytest.mark.parametrize("path", H200_DEPLOY_FILES)
def test_shipped_h200_layouts_pass_the_plan_check(path, k2_dir, capsys):
    from cluster.settings import ServeSettings

    args = _deploy_args(path)
    assert (args["gpu_mem_gb"], args["ranks_per_node"], args["dtype"]) == (141, 8, "bfloat16")
    assert args["weight_format"] in ("auto", "fp8") and args["kv_format"] in ("bf16", "fp8")
    settings = ServeSettings(**{**args, "model": str(k2_dir)})
    plan = settings.check_memory("cuda")
    print(plan.table())
    assert plan.held == FP8_BF16
    roles = {r.layout.role: r for r in plan.ranks}
    assert sorted(roles) == ["decode", "prefill"]
    assert all(r.num_nodes > 1 for r in plan.ranks)  # multi-node expert-parallel instances
    assert roles["decode"].max_context_len == 262144  # a whole 256K context on one rank
    assert plan.options.num_cache_tokens >= 262144  # and the cache each rank allocates holds it
    config = settings.to_config()
    for role, rank in roles.items():
        pool = config.pool(role)
        assert (pool.num_ranks, pool.num_nodes) == (rank.layout.num_ranks, rank.num_nodes)
    assert config.engine.weight_format == args["weight_format"]


def test_kuberay_worker_groups_hold_the_instances():
    """Each worker group's replicas = instances x nodes per instance, ranks_per_node GPUs each,
    advertising the pool's custom resource for every rank."""
    import yaml

    from cluster.settings import ServeSettings

    path = "deploy/kuberay/rayservice-h200.yaml"
    settings = ServeSettings(**_deploy_args(path))
    (service, *_) = yaml.safe_load_all((ROOT / path).read_text())
    groups = {g["groupName"]: g for g in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    for role in ("prefill", "decode"):
        group = groups[f"{role}-h200"]
        num_ranks = getattr(settings, f"{role}_ranks")
        num_nodes = -(-num_ranks // settings.ranks_per_node)
        assert group["replicas"] == getattr(settings, role) * num_nodes, role
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], role
        assert group["minReplicas"] % num_nodes == 0 == group["maxReplicas"] % num_nodes, role
        (container,) = group["template"]["spec"]["containers"]
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == settings.ranks_per_node
        per_node = json.loads(json.loads(group["rayStartParams"]["resources"]))
        per_rank = getattr(settings, f"{role}_resources")
        assert per_node == {k: v * settings.ranks_per_node for k, v in per_rank.items()}, role


def test_settings_plan_follows_the_pools(k2_dir):
    settings = _k2_settings(
        k2_dir, prefill=2, prefill_ranks=32, decode=4, decode_ranks=96, gpu_mem_gb=141
    )
    prefill, decode = settings.check_memory("cuda").ranks
    assert (prefill.layout.num_instances, prefill.layout.num_ranks) == (2, 32)
    assert (decode.layout.num_instances, decode.layout.num_ranks) == (4, 96)
    mixed = _k2_settings(k2_dir, colocated=3, colocated_ranks=48, gpu_mem_gb=141)
    assert [(r.layout.role, r.layout.num_instances) for r in mixed.check_memory("cuda").ranks] == [
        ("mixed", 3)
    ]
    only_decode = _k2_settings(k2_dir, prefill=0, decode_ranks=96, gpu_mem_gb=141)
    assert [r.layout.role for r in only_decode.check_memory("cuda").ranks] == ["decode"]


def test_settings_plan_refusals_say_what_to_set(k2_dir, monkeypatch):
    from cluster import settings as settings_module

    one_rank = _k2_settings(k2_dir, gpu_mem_gb=141)  # today's 1-rank instances
    with pytest.raises(PlanError, match=r"prefill: .*1,030.0 GB .* at least 12 ranks"):
        one_rank.check_memory("cuda")
    with pytest.raises(PlanError, match=r"384 routed experts .* 100 ranks.*96 or 128"):
        _k2_settings(k2_dir, decode_ranks=100).check_memory("cpu")  # even when the plan skips
    monkeypatch.setattr(settings_module, "_local_gpu_mem_gb", lambda: None)
    fits = _k2_settings(k2_dir, prefill_ranks=32, decode_ranks=96)
    with pytest.raises(PlanError, match="set gpu_mem_gb"):
        fits.check_memory("cuda")
    monkeypatch.setattr(settings_module, "_local_gpu_mem_gb", lambda: 141.0)
    assert fits.check_memory("cuda").hardware.gpu_mem_gb == 141.0
    too_many_pages = _k2_settings(
        k2_dir, prefill_ranks=32, decode_ranks=96, num_pages=20_000, gpu_mem_gb=141
    )
    with pytest.raises(PlanError, match=r"prefill: the KV cache of 1,280,000 tokens.*num_pages"):
        too_many_pages.check_memory("cuda")


def test_serve_refuses_a_layout_that_cannot_fit_before_any_ray_call(k2_dir, monkeypatch, capsys):
    import ray

    from cluster import serve

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was called before the plan check refused the layout")

    monkeypatch.setattr(serve, "connect_ray", no_ray)
    monkeypatch.setattr(ray, "init", no_ray)
    settings = _k2_settings(k2_dir, prefill_ranks=32, decode_ranks=8, gpu_mem_gb=141)
    with pytest.raises(PlanError, match="decode: .* at least 12 ranks per decode instance"):
        serve.start(settings)
    argv = ["serve", "--model", str(k2_dir), "--prefill", "1", "--decode", "1", "--dtype"]
    argv += ["bfloat16", "--prefill-ranks", "32", "--decode-ranks", "8", "--gpu-mem-gb", "141"]
    assert main(argv) == 2
    assert "at least 12 ranks per decode instance" in capsys.readouterr().err
    assert main([*argv[:-6], "--decode-ranks", "7"]) == 2
    assert "do not split evenly over 7 ranks" in capsys.readouterr().err


def test_build_app_refuses_a_layout_that_cannot_fit(k2_dir, monkeypatch):
    from cluster import app

    def no_app(config):
        raise AssertionError("the application was built before the plan check refused it")

    monkeypatch.setattr(app, "build_app_from_config", no_app)
    args = {"model": str(k2_dir), "dtype": "bfloat16", "device": "cuda", "gpu_mem_gb": 48}
    with pytest.raises(PlanError, match="prefill: .*48 GB GPU"):
        app.build_app({**args, "prefill_ranks": 32, "decode_ranks": 96})
