"""The planner (python -m dancegrpo_fast.plan) and the dry run under it.

The published architectures (dancegrpo_fast/architectures) build on the meta device through the
policies' own loading code; the FLOP count of the tiny FLUX model matches an analytic count of its
layers; the training-step memory model matches a real CPU step measured by the profiler; every
preset plans at full size; a run that cannot fit says so and names what would make it fit; the
fused ops run on meta tensors at full video size.
"""
from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers.fixtures import _single_thread  # noqa: E402,F401  (fixtures)

from dancegrpo_fast import ops  # noqa: E402
from dancegrpo_fast.config import TrainConfig  # noqa: E402
from dancegrpo_fast.dry_run import DryRun, ModuleSize, prepare_trainable  # noqa: E402
from dancegrpo_fast.meta_measure import StepMeter, gpu_like_meta  # noqa: E402
from dancegrpo_fast.plan import GPUS, format_table, main, make_plan, parse_plan_args  # noqa: E402
from dancegrpo_fast.policies import ModelLoadError, build_policy  # noqa: E402
from dancegrpo_fast.rollout import autocast_context  # noqa: E402
from dancegrpo_fast.sde import dance_coefficients  # noqa: E402

META = torch.device("meta")
PACKAGE = Path(__file__).resolve().parents[1] / "dancegrpo_fast"


def plan_of(*argv, compare_checkpointing=False):
    config, gpus, gpu, mfu, _ = parse_plan_args(list(argv))
    return make_plan(config, gpus, gpu, mfu, compare_checkpointing=compare_checkpointing)


@pytest.fixture(scope="module")
def plans():
    """Each preset planned once at its real settings (lazily, shared by the tests below)."""
    made = {}

    def get(name):
        if name not in made:
            argv = {"flux": ["--preset", "flux", "--gpus", "8", "--parallel", "fsdp"],
                    "hunyuan_video_1gpu": ["--preset", "hunyuan_video", "--gpus", "1"],
                    "sd14": ["--preset", "sd14", "--gpus", "1"],
                    "wan": ["--preset", "wan", "--gpus", "8"],
                    "tiny": ["--preset", "tiny", "--gpus", "1"]}[name]
            made[name] = plan_of(*argv)
        return made[name]

    return get


# ----------------------------------------------------------------------------------------------
# The fused ops on meta tensors
# ----------------------------------------------------------------------------------------------


def test_meta_tensors_take_the_torch_backend():
    """Triton cannot run on meta tensors: 'auto' picks the PyTorch twins for them whatever the
    Triton mode (interpreted under TRITON_INTERPRET=1), and forcing Triton says why not."""
    assert ops.resolve_backend(META) == "torch"
    assert ops.resolve_backend(META, "auto") == "torch"
    assert ops.resolve_backend(META, "torch") == "torch"
    with pytest.raises(RuntimeError, match="meta tensors"):
        ops.resolve_backend(META, "triton")


def test_fused_ops_on_meta_tensors_at_full_size():
    """The step loss, its backward, the log-prob and the rollout step at HunyuanVideo 720x1280,
    129 frames (7.6 M latent elements per sample, bf16 model output), as the dry run calls them."""
    batch, shape = 2, (16, 33, 90, 160)
    v = torch.empty((batch,) + shape, dtype=torch.bfloat16, device=META, requires_grad=True)
    x = torch.empty((batch,) + shape, device=META)
    x_next = torch.empty_like(x)
    coeffs = dance_coefficients(0.8, 0.75, 0.25, batch).to(META)
    out = ops.fused_step_loss(v, x, x_next, coeffs, None, torch.empty(batch, device=META))
    out.loss.backward()
    assert v.grad.shape == v.shape and v.grad.dtype == torch.bfloat16 and out.log_prob.shape == (batch,)
    assert ops.step_log_prob(v.detach(), x, x_next, coeffs).shape == (batch,)
    step = ops.sde_step(v.detach(), x, coeffs, seeds=torch.arange(batch), step_index=3)
    assert step.prev_sample.shape == x.shape and step.log_prob.shape == (batch,)


def test_autocast_context_is_a_null_context_where_autocast_does_not_apply():
    """torch.autocast refuses the meta device even disabled; the rollout's and the update's
    autocast_context gives a null context there (and on the CPU), so the rollout's own loop
    (rollout.sampling_loop) runs in the dry run."""
    for device in (META, torch.device("cpu")):
        for mixed_precision in ("bf16", "no"):
            with autocast_context(device, mixed_precision):
                assert not torch.is_autocast_enabled("cuda") and not torch.is_autocast_enabled("cpu")


# ----------------------------------------------------------------------------------------------
# The architectures, built through the policies' loading code
# ----------------------------------------------------------------------------------------------


def test_published_parameter_counts(plans):
    """FLUX.1-dev's transformer has 11.90 B parameters, SD 1.4's UNet 859.5 M."""
    flux = plans("flux").run.model.parameters
    assert round(flux / 1e9, 2) == 11.90
    sd14 = plans("sd14").run.model.parameters
    assert round(sd14 / 1e6, 1) == 859.5


def test_a_config_only_folder_cannot_be_loaded_for_training():
    config, *_ = parse_plan_args(["--preset", "flux"])
    with pytest.raises(ModelLoadError, match="configs but no weights.*meta device"):
        build_policy(config.model, config.sampler, "cpu")


def test_meta_tokenizer_gives_full_length_prompts(plans):
    """No vocabulary ships: prompts become max_length rows, the shapes a real prompt gives."""
    policy = plans("flux").dry.policy
    cond = policy.encode(["a red fox"])
    assert cond["prompt_embeds"].shape == (1, 512, 4096) and cond["prompt_embeds"].device == META
    assert cond["pooled_prompt_embeds"].shape == (1, 768)


# ----------------------------------------------------------------------------------------------
# FLOPs and bytes against independent counts
# ----------------------------------------------------------------------------------------------


def _flux_forward_flops(config, batch: int, image_tokens: int, text_tokens: int) -> int:
    """Matmul and attention FLOPs (2 per multiply-add) of a FluxTransformer2DModel forward, layer
    by layer from its config: embedders, double blocks (modulation, separate image and text
    projections and MLPs, joint attention), single blocks (joint QKV + MLP in, fused out), output."""
    d = config.num_attention_heads * config.attention_head_dim
    n = image_tokens + text_tokens
    linear = lambda tokens, fan_in, fan_out: 2 * batch * tokens * fan_in * fan_out  # noqa: E731
    attention = 4 * batch * n * n * d  # Q K^T and the weighted sum of V
    mlp = int(4 * d)
    total = linear(image_tokens, config.in_channels, d) + linear(text_tokens, config.joint_attention_dim, d)
    total += linear(1, 256, d) + linear(1, d, d) + linear(1, config.pooled_projection_dim, d) + linear(1, d, d)
    if config.guidance_embeds:
        total += linear(1, 256, d) + linear(1, d, d)
    for _ in range(config.num_layers):
        total += 2 * linear(1, d, 6 * d)
        for tokens in (image_tokens, text_tokens):
            total += 4 * linear(tokens, d, d) + linear(tokens, d, mlp) + linear(tokens, mlp, d)
        total += attention
    for _ in range(config.num_single_layers):
        total += linear(1, d, 3 * d) + 3 * linear(n, d, d) + linear(n, d, mlp) + linear(n, d + mlp, d) + attention
    out_channels = config.out_channels or config.in_channels
    total += linear(1, d, 2 * d) + linear(image_tokens, d, config.patch_size ** 2 * out_channels)
    return total


def test_tiny_flux_forward_flops_match_an_analytic_count():
    config, *_ = parse_plan_args(["--preset", "tiny"])
    policy = build_policy(config.model, config.sampler, META)
    batch = 8
    cond = {k: v.expand(batch, *v.shape[1:]) for k, v in policy.encode(["one red circle"]).items()}
    latents = torch.empty((batch,) + tuple(policy.latent_shape()), device=META)
    meter = StepMeter()
    with torch.no_grad(), meter, gpu_like_meta(None):
        policy.predict(latents, torch.zeros(batch, dtype=torch.int64), cond, policy.schedule())
    analytic = _flux_forward_flops(policy.model.config, batch, policy.latent_shape()[0],
                                   cond["prompt_embeds"].shape[1])
    assert abs(meter.flops - analytic) / analytic < 0.05, (meter.flops, analytic)


def test_step_meter_counts_what_flop_counter_mode_counts():
    """StepMeter uses FlopCounterMode's formulas without its module hooks: the same total on a
    real forward + backward of the tiny model."""
    from torch.utils.flop_counter import FlopCounterMode

    config, *_ = parse_plan_args(["--preset", "tiny"])
    policy = build_policy(config.model, config.sampler, "cpu")
    prepare_trainable(policy, config)
    cond = {k: v.expand(4, *v.shape[1:]) for k, v in policy.encode(["two blue squares"]).items()}
    latents = torch.randn((4,) + tuple(policy.latent_shape()))
    step = torch.zeros(4, dtype=torch.int64)
    counts = []
    for mode in (FlopCounterMode(display=False), StepMeter()):
        with mode:
            policy.predict(latents, step, cond, policy.schedule()).square().mean().backward()
        counts.append(mode.get_total_flops() if isinstance(mode, FlopCounterMode) else mode.flops)
    assert counts[0] == counts[1] > 0


def test_gpu_like_meta_casts_as_cuda_autocast():
    """CUDA autocast's documented lists: a linear layer computes in bf16, layer norm and softmax
    in float32; a weight used twice inside one autocast region is cast once (autocast's cache),
    and again in the next region."""
    linear = torch.nn.Linear(64, 64, device=META)
    norm = torch.nn.LayerNorm(64, device=META)
    x = torch.empty(4, 64, device=META)
    with gpu_like_meta(torch.bfloat16) as mode, mode.forward_region():
        hidden = linear(x)
        normed = norm(hidden)
        assert (hidden.dtype, normed.dtype, linear(normed).dtype) == (torch.bfloat16, torch.float32, torch.bfloat16)
        assert torch.softmax(hidden, -1).dtype == torch.float32
    meter = StepMeter()
    with meter, gpu_like_meta(torch.bfloat16) as mode:
        for region in range(2):
            with mode.forward_region():
                first, second = linear(x), linear(x)
                casts = meter.live - first.nbytes - second.nbytes
            # the weight and bias cast once per region, the input once per call
            assert casts == (64 * 64 + 64) * 2 + 2 * x.numel() * 2
            del first, second
    with gpu_like_meta(None):
        assert linear(x).dtype == torch.float32  # mixed_precision "no": no casts


def _profiled_peak_bytes(run) -> int:
    """Peak of the CPU allocator's allocated bytes while `run()` runs, from the profiler's memory
    events (an allocator-side measurement, independent of StepMeter's tensor tracking)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    handle, path = tempfile.mkstemp(suffix=".json")
    os.close(handle)
    try:
        prof.export_chrome_trace(path)
        events = json.loads(Path(path).read_text())["traceEvents"]
    finally:
        os.remove(path)
    return max(e["args"]["Total Allocated"] for e in events
               if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no_checkpointing", "checkpointing"])
def test_training_step_memory_model_matches_a_real_cpu_step(checkpointing):
    """The planner's training-step memory (measured on meta: peak of the step's tensors with the
    gradients dropped as they come, plus float32 gradients of the trainable parameters) against the
    allocator's peak during a real CPU training step of the tiny model (same batch of 32, same
    fused loss, torch backend), within 25%."""
    config, *_ = parse_plan_args(["--preset", "tiny", "--gradient_checkpointing", str(checkpointing).lower()])
    run = DryRun(config).trainable(config, None, checkpointing=(checkpointing,))
    predicted = run.train_steps[checkpointing].peak_bytes + run.model.trainable * 4

    policy = build_policy(config.model, config.sampler, "cpu")
    prepare_trainable(policy, config)
    if checkpointing:
        policy.model.enable_gradient_checkpointing()
    schedule, batch = policy.schedule(), config.optim.batch_size
    cond = {k: v.expand(batch, *v.shape[1:]) for k, v in policy.encode(["one red circle"]).items()}
    step = torch.full((batch,), config.sampler.trainable_steps()[0], dtype=torch.int64)
    latents = torch.randn((batch,) + tuple(policy.latent_shape()))
    next_latents, advantages = torch.randn_like(latents), torch.randn(batch)
    coeffs = schedule.coefficients(step, "cpu")

    def train_step():
        out = ops.fused_step_loss(policy.predict(latents, step, cond, schedule), latents, next_latents, coeffs,
                                  None, advantages, backend="torch")
        out.loss.backward()

    measured = _profiled_peak_bytes(train_step)
    assert abs(predicted - measured) / measured < 0.25, (predicted, measured)


# ----------------------------------------------------------------------------------------------
# Plans
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["flux", "hunyuan_video_1gpu", "sd14", "wan", "tiny"])
def test_every_preset_plans_at_full_size(plans, name):
    plan = plans(name)
    report = plan.to_dict()
    json.dumps(report)  # tools read it
    flops = report["flops_per_iteration"]
    assert flops["rollout"] > 0 and flops["update"] > flops["rollout"] / 10
    c = plan.config
    # The update: trained samples (all, or bestofn of each group) x trained timesteps x one
    # measured training step (forward + backward), and the old log-prob forwards of the batches
    # of every optimizer step after the first.
    train = plan.run.train_steps[c.model.gradient_checkpointing]
    later_steps = c.optimizer_steps_per_iteration - 1
    assert flops["update"] == (c.trained_samples_per_rank // c.optim.batch_size * c.trained_timesteps() * train.flops
                               + later_steps * c.optim.gradient_accumulation_steps * c.trained_timesteps()
                               * train.flops_forward)
    assert train.flops_backward > train.flops_forward  # backward ~2x, more with recomputation
    memory = report["memory_bytes"]
    assert memory["peak"] == max(memory["phases"].values()) > 0
    table = format_table(plan)
    assert table.startswith("PROJECTION") and "verdict: " + plan.verdict() in table
    assert plan.verdict().startswith("fits on" if memory["fits"] else "does not fit on")


def test_fsdp_divides_the_weights_and_optimizer_by_the_gpus(plans):
    plan = plans("flux")
    model = plan.run.model
    assert plan.memory.held["weights"] == -(-(model.bytes - model.buffer_bytes) // 8) + model.buffer_bytes
    assert plan.memory.held["optimizer"] == -(-2 * 4 * plan.run.model.trainable // 8)
    assert plan.memory.gradients == -(-4 * plan.run.model.trainable // 8)
    train = plan.run.train_steps[True]
    assert plan.memory.phases["update"] == (sum(plan.memory.held.values()) + plan.memory.gradients
                                            + train.peak_bytes + plan.memory.fsdp_working_set)
    assert plan.memory.fits and "FSDP2" in plan.verdict()


def test_a_run_that_cannot_fit_says_so_and_names_the_fix(plans):
    """Full fine-tuning of HunyuanVideo (12.8 B parameters: weights, gradients and AdamW moments
    alone are 16 bytes each) on one 80 GB card does not fit; LoRA does."""
    plan = plans("hunyuan_video_1gpu")
    assert not plan.memory.fits and plan.memory.peak > 16 * plan.run.model.trainable * 0.99
    verdict = plan.verdict()
    assert verdict.startswith("does not fit on 1 x H800") and "fits with --lora" in verdict, verdict
    assert plan.fixes and all(fix["peak_bytes"] <= GPUS["h800"].memory_bytes for fix in plan.fixes)


def test_one_dry_run_measures_full_and_lora_settings_in_any_order():
    """The fix search measures several settings on one meta model: LoRA of two ranks and the full
    fine-tune, in any order, each with its own trainable parameters."""
    config, *_ = parse_plan_args(["--preset", "tiny"])
    dry = DryRun(config)
    sizes = {}
    for use_lora, rank in ((True, 4), (False, 4), (True, 8)):
        variant = TrainConfig.from_dict({"optim": {"use_lora": use_lora, "lora_rank": rank}}, config)
        sizes[use_lora, rank] = dry.trainable(variant, None, checkpointing=()).model
    base = sizes[False, 4].parameters
    assert sizes[False, 4].trainable == base
    lora4, lora8 = sizes[True, 4].trainable, sizes[True, 8].trainable
    assert 0 < lora4 and lora8 == 2 * lora4 and sizes[True, 8].parameters == base + lora8


def test_cli_prints_json_for_tools(capsys):
    assert main(["--preset", "tiny", "--gpus", "1", "--gpu", "a100", "--mfu", "0.5", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["gpu"]["bf16_flops"] == 312e12 and report["mfu"] == 0.5
    assert report["memory_bytes"]["activations_no_checkpointing"] > report["memory_bytes"]["activations_checkpointing"]
    seconds = report["seconds_per_iteration"]
    assert seconds["total"] == pytest.approx(sum(report["flops_per_iteration"].values()) / (312e12 * 0.5))
    assert report["verdict"].startswith("fits on 1 x A100")


@pytest.mark.parametrize("argv, word", [
    (["--gpus", "0"], "--gpus"), (["--gpus", "two"], "--gpus"), (["--gpu", "v100"], "--gpu"),
    (["--mfu", "1.5"], "--mfu"), (["--parallel", "zero3"], "--parallel"),
    (["--architecture", "flux2"], "--architecture"), (["--group_size", "1"], "group_size"),
    (["--gpus_per_node", "8"], "--gpus_per_node"),
])
def test_cli_errors_are_one_line_naming_the_argument(capsys, argv, word):
    assert main(["--preset", "flux"] + argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and word in err, err


def test_nothing_imports_the_planner():
    pattern = re.compile(r"^\s*(from\s+(\.+|dancegrpo_fast\.?)\s*plan\b|from\s+\.+\s+import\s+plan\b|"
                         r"import\s+dancegrpo_fast\.plan\b)", re.M)
    importers = [str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")
                 if path.name != "plan.py" and pattern.search(path.read_text())]
    assert not importers


def test_module_size_counts_parameters_and_buffers():
    module = torch.nn.Linear(3, 2, device=META)
    module.register_buffer("table", torch.empty(5, dtype=torch.bfloat16, device=META))
    assert ModuleSize.of(module) == ModuleSize(parameters=8, trainable=8, bytes=8 * 4 + 5 * 2, buffer_bytes=5 * 2)
