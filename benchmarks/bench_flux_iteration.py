"""One training iteration of a full-size FLUX.1-dev transformer (11.9 B parameters, randomly
initialised, bf16) on a GPU: this trainer against the reference code's loop shape, same work.

No weights can be downloaded, so the transformer is built from FLUX.1-dev's published
hyperparameters with random weights, directly on the GPU. The rest of the pipeline goes through
the real loading code (`FluxPolicy` from a diffusers folder): a full-size FLUX VAE (random
weights, 720px decoding as in training), and small text encoders with FLUX's output widths (T5
4096, CLIP 768; prompts are encoded once and cached, so their size does not enter an iteration).
The transformer in the loaded policy is then replaced by the full-size one.

Settings are the FLUX preset's (720x720, 16 steps, eta 0.3, shift 3, timestep_fraction 0.6,
guidance 3.5, bf16 autocast, gradient checkpointing) at a reduced group (G=4, one prompt, one
optimizer step per iteration) to fit a short GPU lease. Full fine-tuning of 11.9 B parameters
with AdamW needs ~190 GB (float32 master weights, gradients, two moments): more than one GPU has,
so the model trains a LoRA adapter here (the trainer's `use_lora`), the same in every variant.

Variants, each its own model and trainer, interleaved iteration by iteration:
  trainer_preset   this trainer as the FLUX preset configures it (rollout batch 4, train batch 1)
  trainer_batched  this trainer with the group in one training micro-batch (train batch 4)
  reference_loop   the reference code's loop shape: batch 1 everywhere, unfused step and loss
                   (bench_train_iteration.reference_iteration)
  trainer_window   trainer_preset with MixGRPO's sliding SDE window: 4 SDE steps (all trained,
                   timestep_fraction 1.0) sliding over the 16, second-order ODE steps outside it
                   with 40% of them after the window (MixGRPO-Flash; docs/training.md)
  trainer_window_ode1  the same window with first-order ODE steps, every step taken

    python benchmarks/bench_flux_iteration.py [--group-size 4] [--repeats 2] [--output FILE]
    python benchmarks/bench_flux_iteration.py --check   # the same code at toy size, on the CPU

Writes benchmarks/results/flux_iteration_<device>.json (or --output).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train_iteration import brightness, reference_iteration, synchronize  # noqa: E402
from dancegrpo_fast.config import TrainConfig  # noqa: E402
from dancegrpo_fast.train import Trainer  # noqa: E402

# FLUX.1-dev transformer/config.json (the published values).
FLUX_DEV_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                            guidance_embeds=True, axes_dims_rope=(16, 56, 56))
# FLUX.1-dev vae/config.json.
FLUX_DEV_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                    layers_per_block=2, act_fn="silu", latent_channels=16, norm_num_groups=32, sample_size=1024,
                    scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
# --check: the same code path at toy size (CPU, seconds).
TOY_TRANSFORMER = dict(FLUX_DEV_TRANSFORMER, num_layers=1, num_single_layers=1, attention_head_dim=16,
                       num_attention_heads=2, axes_dims_rope=(4, 6, 6))
TOY_VAE = dict(FLUX_DEV_VAE, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4)
# MixGRPO's window on the preset's 16 steps (docs/training.md, "Sliding SDE window (MixGRPO)").
WINDOW = dict(sde_window_start=0, sde_window_size=4, sde_window_schedule="progressive", sde_window_stride=1,
              sde_window_every=25, timestep_fraction=1.0)
PROMPTS = ["a red fox in fresh snow, golden hour", "an astronaut riding a horse on the moon",
           "a bowl of ramen, studio photograph", "a lighthouse in a storm, oil painting"]


def write_pipeline_folder(folder: Path, vae_config: dict, text_width: int, pooled_width: int,
                          max_sequence_length: int) -> Path:
    """A FluxPipeline folder: the given VAE, text encoders whose outputs have FLUX's widths, and a
    one-block placeholder transformer with FLUX's input and conditioning widths."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from helpers.tiny_models import clip_text_model, clip_tokenizer, t5_model, t5_tokenizer

    torch.manual_seed(0)
    clip_tok = clip_tokenizer(folder / "_tok_clip", model_max_length=77)
    t5_tok, t5_vocab = t5_tokenizer(model_max_length=max_sequence_length)
    placeholder = FluxTransformer2DModel(**dict(TOY_TRANSFORMER, joint_attention_dim=text_width,
                                                pooled_projection_dim=pooled_width))
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=AutoencoderKL(**vae_config),
                        text_encoder=clip_text_model(len(clip_tok), hidden=pooled_width, projection=pooled_width,
                                                     max_positions=77),
                        tokenizer=clip_tok, text_encoder_2=t5_model(t5_vocab, d_model=text_width),
                        tokenizer_2=t5_tok, transformer=placeholder)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def full_transformer(config: dict, device: torch.device):
    """FluxTransformer2DModel with random weights, built in bf16 directly on the device."""
    from diffusers import FluxTransformer2DModel

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = FluxTransformer2DModel(**config)
    finally:
        torch.set_default_dtype(previous)
    return model.requires_grad_(False).eval()


def make_trainer(name: str, settings: dict, transformer_config: dict, device: torch.device, tmp: Path) -> Trainer:
    from dancegrpo_fast.policies.flux import FluxPolicy

    config = TrainConfig.from_dict({**settings, "output_dir": str(tmp / name)})
    policy = FluxPolicy(config.model, config.sampler, device)
    # The real loading code built the pipeline; swap in the full-size transformer.
    model = full_transformer(transformer_config, device)
    policy.pipe.transformer = policy.model = policy.forward_model = model
    torch.manual_seed(0)
    return Trainer(config, rewards={"brightness": (brightness, 1.0)}, policy=policy)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="toy sizes on the CPU: exercises the script, times nothing real")
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2, help="timed iterations per variant (after one warm-up)")
    parser.add_argument("--lora-rank", type=int, default=64)
    parser.add_argument("--variants", default="trainer_preset,trainer_batched,reference_loop")
    parser.add_argument("--output", default="")
    args = parser.parse_args()
    device = torch.device("cpu" if args.check else "cuda")
    size = 64 if args.check else 720
    max_len = 16 if args.check else 512
    transformer_config = TOY_TRANSFORMER if args.check else FLUX_DEV_TRANSFORMER
    variants = args.variants.split(",")
    g = args.group_size
    start_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prompt_file = tmp / "prompts.txt"
        prompt_file.write_text("\n".join(PROMPTS) + "\n")
        folder = write_pipeline_folder(tmp / "flux", TOY_VAE if args.check else FLUX_DEV_VAE, 4096, 768, max_len)
        base = dict(model_family="flux", model_path=str(folder), prompt_file=str(prompt_file), height=size,
                    width=size, num_steps=16, eta=0.3, shift=3.0, guidance_scale=3.5, group_size=g,
                    prompts_per_rank=1, rollout_batch_size=min(4, g), train_batch_size=1,
                    gradient_accumulation_steps=g, timestep_fraction=0.6, max_sequence_length=max_len,
                    model_dtype="bfloat16", mixed_precision="bf16", gradient_checkpointing=True, use_lora=True,
                    lora_rank=args.lora_rank, lora_alpha=float(args.lora_rank), num_iterations=1000,
                    progress_bar=False, tensorboard=False, checkpoint_every=10 ** 6)
        settings = {
            "trainer_preset": base,
            "trainer_batched": dict(base, train_batch_size=g, gradient_accumulation_steps=1),
            "reference_loop": base,
            "trainer_window": dict(base, **WINDOW, ode_order=2, ode_steps_fraction=0.4),
            "trainer_window_ode1": dict(base, **WINDOW),
        }
        trainers = {}
        for name in variants:
            t0 = time.perf_counter()
            trainers[name] = make_trainer(name, settings[name], transformer_config, device, tmp)
            synchronize(device)
            print(f"[flux] built {name} in {time.perf_counter() - t0:.1f} s", flush=True)
        model = trainers[variants[0]].policy.model
        params = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        runs = {name: [] for name in variants}
        peaks = {}
        for repeat in range(args.repeats + 1):  # the first round warms up (kernel selection, caches)
            for name in variants:
                trainer = trainers[name]
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                synchronize(device)
                t0 = time.perf_counter()
                if name == "reference_loop":
                    row = reference_iteration(trainer)
                else:
                    out = trainer.train_iteration()
                    row = {k: out[k] for k in ("seconds_rollout", "seconds_reward", "seconds_update")}
                    row["first_step_ratio_max_dev"] = out["first_step_ratio_max_dev"]
                    row["nfe_rollout"], row["nfe_train"] = out["nfe_rollout"], out["nfe_train_forward"] + out["nfe_train_backward"]
                    row["loss"] = out["loss"]
                synchronize(device)
                row["seconds_wall"] = time.perf_counter() - t0
                if device.type == "cuda":
                    peaks[name] = max(peaks.get(name, 0), torch.cuda.max_memory_allocated())
                print(f"[flux] round {repeat} {name}: " + ", ".join(f"{k} {v:.3g}" for k, v in row.items()), flush=True)
                if repeat > 0:
                    runs[name].append(row)
            if repeat > 0:
                report(args, device, base, settings, variants, params, trainable, runs, peaks, start_all, final=False)
        del trainers, model
        gc.collect()
    report(args, device, base, settings, variants, params, trainable, runs, peaks, start_all, final=True)


def report(args, device, base, settings, variants, params, trainable, runs, peaks, start_all, final) -> None:
    """Write the JSON (after every round, so a run cut short still leaves its numbers) and, at the
    end, print the table."""
    from dancegrpo_fast.info import backend_info

    def median(rows, key):
        return statistics.median(r[key] for r in rows)

    results = {}
    for name, rows in runs.items():
        if not rows:
            continue
        results[name] = {key: median(rows, key) for key in ("seconds_rollout", "seconds_reward", "seconds_update",
                                                              "seconds_wall")}
        results[name]["seconds_total"] = sum(results[name][k] for k in ("seconds_rollout", "seconds_reward",
                                                                        "seconds_update"))
        if name in peaks:
            results[name]["peak_memory_GiB"] = peaks[name] / 2 ** 30
    speedups = {}
    if "reference_loop" in results:
        ref = results["reference_loop"]
        for name in results:
            if name != "reference_loop":
                speedups[name] = {phase: ref[f"seconds_{phase}"] / results[name][f"seconds_{phase}"]
                                  for phase in ("rollout", "update", "total")}
    out = {
        "benchmark": "flux_iteration",
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU {platform.machine()} (--check: toy sizes)",
        "driver": _driver_version(),
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "triton": _version("triton"), "diffusers": _version("diffusers"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "backends": backend_info(),
        "model": {"transformer": "FLUX.1-dev config, random weights" if not args.check else "toy",
                  "parameters": params, "trainable_parameters_lora": trainable, "lora_rank": args.lora_rank},
        "settings": {k: base[k] for k in ("height", "width", "num_steps", "eta", "shift", "group_size",
                                           "timestep_fraction", "gradient_checkpointing", "max_sequence_length",
                                           "model_dtype", "mixed_precision", "use_lora", "lora_rank")},
        "variant_settings": {name: {k: settings[name].get(k) for k in (
            "rollout_batch_size", "train_batch_size", "gradient_accumulation_steps", "timestep_fraction",
            "sde_window_size", "sde_window_schedule", "ode_order", "ode_steps_fraction")}
                             for name in variants if name != "reference_loop"},
        "trained_steps_per_sample": {name: TrainConfig.from_dict(settings[name]).trained_timesteps() for name in variants},
        "repeats": args.repeats, "statistic": "median over timed iterations (one warm-up round first)",
        "runs": runs, "results": results, "speedup_vs_reference_loop": speedups,
        "seconds_benchmark": time.perf_counter() - start_all, "complete": final,
    }
    path = Path(args.output or REPO / "benchmarks" / "results" / f"flux_iteration_{device.type}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    if not final:
        return
    print(f"[flux] wrote {path}")
    print(f"{'variant':16s} {'rollout s':>10s} {'reward s':>9s} {'update s':>9s} {'total s':>8s} {'peak GiB':>9s} {'x ref':>6s}")
    for name, r in results.items():
        x = speedups.get(name, {}).get("total", 1.0)
        print(f"{name:16s} {r['seconds_rollout']:10.2f} {r['seconds_reward']:9.2f} {r['seconds_update']:9.2f} "
              f"{r['seconds_total']:8.2f} {r.get('peak_memory_GiB', float('nan')):9.1f} {x:6.2f}")


def _version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return "not installed"


def _driver_version() -> str:
    import subprocess

    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.strip() or "unknown"
    except Exception:
        return "no nvidia-smi"


if __name__ == "__main__":
    main()
