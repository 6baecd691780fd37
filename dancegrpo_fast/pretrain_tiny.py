"""Pretrain the built-in tiny text-to-image flow (dancegrpo_fast.tiny) on procedurally rendered
train-split scenes, on the CPU in minutes, in two stages like a latent diffusion model:

    python -m dancegrpo_fast.pretrain_tiny --stage vae --out dancegrpo_fast/tiny/weights --seed 0 --steps 1500
    python -m dancegrpo_fast.pretrain_tiny --out dancegrpo_fast/tiny/weights --seed 0 --steps 1500

Stage "vae": a small AutoencoderKL (32x32x3 -> 8x8x4) trained on rendered scenes (L1 + L2
reconstruction and a small KL term), then its scaling and shift factors set from the latent
statistics (as FLUX's VAE config carries them); written to OUT/vae with vae_record.json.
Stage "flow" (the default): the transformer and text encoder on the VAE's latents (OUT/vae, or
--vae FOLDER); --pixel_space trains the older pixel-space model instead (no VAE).

Data: an endless stream of random train-split scenes (dancegrpo_fast.tiny.task.random_scene,
30% one-group, 70% two-group prompts; the held-out color-shape pairs never occur), rendered at
32x32 with random placement, seeded by --seed. Objective: rectified flow, x_t = (1 - t) x0 + t
noise, target v = noise - x0, t ~ sigmoid(N(0, 1)) (80%) or U(0, 1) (20%); text dropped (empty
prompt) with probability --text_dropout so classifier-free guidance is possible; --caption_noise
makes captions wrong at random (counts, colors, relation), like web captions. AdamW, linear
warm-up then a constant learning rate (so a run of N steps equals the first N steps of a longer
run), EMA of the weights, which are what is saved. Writes the weights folder and
pretrain_record.json (command, seed, data, steps, time, final loss, loss curve) next to them.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import random
import shlex
import sys
import time
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch

from .tiny import task
from .tiny.model import DEFAULT_VAE, TinyFlowPipeline


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dancegrpo_fast.pretrain_tiny", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--stage", default="flow", choices=("vae", "flow"),
                        help="vae: train the autoencoder into OUT/vae; flow: train the transformer on its latents")
    parser.add_argument("--out", default="outputs/tiny_pretrain", help="weights folder to write")
    parser.add_argument("--vae", default=None, help="flow stage: the trained VAE folder (default OUT/vae)")
    parser.add_argument("--pixel_space", action="store_true", help="flow stage: no VAE, the flow works on pixels")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initialisation, data stream and noise")
    parser.add_argument("--steps", type=int, default=1500, help="optimizer steps")
    parser.add_argument("--batch_size", type=int, default=64, help="images per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (after warm-up)")
    parser.add_argument("--kl_weight", type=float, default=1e-4, help="vae stage: weight of the KL term (per pixel value)")
    parser.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    parser.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay")
    parser.add_argument("--ema", type=float, default=0.995, help="EMA decay of the saved weights (0 = no EMA)")
    parser.add_argument("--text_dropout", type=float, default=0.1, help="probability of training on the empty prompt")
    parser.add_argument("--single_fraction", type=float, default=0.3, help="fraction of one-group prompts")
    parser.add_argument("--caption_noise", type=float, default=0.0,
                        help="flow stage: probability that a caption's count, color or relation (each on its own) "
                             "is redrawn at random, like web captions (tiny.task.noisy_caption)")
    parser.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient-norm clip (0 = off)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1 is fastest for this model on a shared 2-core CPU)")
    parser.add_argument("--snapshot_every", type=int, default=0,
                        help="also save the EMA weights every K steps under OUT/snapshots/step_K (0 = never)")
    parser.add_argument("--log_every", type=int, default=50, help="print and record the loss every K steps")
    parser.add_argument("--storage_dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                        help="dtype of the saved safetensors")
    return parser


def sample_times(batch: int, generator: torch.Generator) -> torch.Tensor:
    logit_normal = torch.sigmoid(torch.randn(batch, generator=generator))
    uniform = torch.rand(batch, generator=generator)
    use_uniform = torch.rand(batch, generator=generator) < 0.2
    return torch.where(use_uniform, uniform, logit_normal).clamp(1e-4, 1.0)


def save(pipe, ema: Optional[Dict[str, torch.Tensor]], folder: Path, record: Dict, storage_dtype: str) -> None:
    """Write the (EMA) weights and the record into `folder`."""
    to_save = pipe
    if ema is not None:
        to_save = TinyFlowPipeline(copy.deepcopy(pipe.transformer), copy.deepcopy(pipe.text_encoder), pipe.image_size,
                                   pipe.vae)
        params = dict(_named_parameters(to_save))
        with torch.no_grad():
            for name, value in ema.items():
                params[name].copy_(value)
    dtype = {"float32": None, "float16": torch.float16, "bfloat16": torch.bfloat16}[storage_dtype]
    to_save.save_pretrained(folder, dtype=dtype)
    (folder / "pretrain_record.json").write_text(json.dumps(record, indent=2) + "\n")


def _named_parameters(pipe):
    for component, module in pipe.components.items():
        if component == "vae":
            continue  # frozen in the flow stage
        for name, param in module.named_parameters():
            yield f"{component}.{name}", param


def _command(argv: Sequence[str]) -> str:
    return "python -m dancegrpo_fast.pretrain_tiny " + " ".join(shlex.quote(a) for a in argv)


def _track_loss(loss, running, step: int, args, record: Dict, start: float, label: str) -> float:
    """Smoothed loss (EMA 0.98), an error on a non-finite loss, and the record's loss curve and a
    printed line every --log_every steps. Returns the new smoothed loss."""
    value = float(loss.detach())
    if not math.isfinite(value):
        raise RuntimeError(f"the {label}loss became {value} at step {step}; lower --lr")
    running = value if running is None else 0.98 * running + 0.02 * value
    if step % args.log_every == 0 or step == args.steps:
        elapsed = time.perf_counter() - start
        record["loss_curve"].append({"step": step, "loss": round(running, 5), "seconds": round(elapsed, 1)})
        print(f"{label}step {step}/{args.steps} loss {running:.4f} ({elapsed:.0f} s)", flush=True)
    return running


def pretrain_vae(args: argparse.Namespace, argv: Sequence[str]) -> Dict:
    """Train the tiny AutoencoderKL; set scaling_factor = 1 / std and shift_factor = mean of the
    latents of 1024 fresh scenes (so the flow sees unit-scale latents); write OUT/vae."""
    from diffusers import AutoencoderKL

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    vae = AutoencoderKL(**DEFAULT_VAE)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    rng = random.Random(args.seed)
    record = {"command": _command(argv), "stage": "vae", "seed": args.seed, "steps": args.steps,
              "batch_size": args.batch_size, "lr": args.lr, "kl_weight": args.kl_weight,
              "data": "random train-split scenes (random_scene(rng, 'train', single_fraction)), rendered at 32x32",
              "objective": "L1 + L2 reconstruction of 2 * image - 1 from a posterior sample, + kl_weight * KL / pixel values",
              "parameters": sum(p.numel() for p in vae.parameters()), "threads": args.threads,
              "torch": torch.__version__, "loss_curve": []}
    start, running = time.perf_counter(), None
    for step in range(1, args.steps + 1):
        scenes = [task.random_scene(rng, "train", args.single_fraction) for _ in range(args.batch_size)]
        x = task.render_batch(scenes, rng=rng) * 2 - 1
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        kl = posterior.kl().mean() / x[0].numel()
        loss = (reconstruction - x).abs().mean() + (reconstruction - x).square().mean() + args.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        running = _track_loss(loss, running, step, args, record, start, "VAE ")
    vae.eval()
    with torch.no_grad():
        scenes = [task.random_scene(rng, "train", args.single_fraction) for _ in range(1024)]
        latents = vae.encode(task.render_batch(scenes, rng=rng) * 2 - 1).latent_dist.mode()
    shift, scale = float(latents.mean()), float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scale, shift_factor=shift)
    record.update(seconds=round(time.perf_counter() - start, 1), final_loss=round(running, 5),
                  scaling_factor=scale, shift_factor=shift)
    folder = Path(args.out) / "vae"
    vae.save_pretrained(str(folder))
    (Path(args.out) / "vae_record.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def pretrain(args: argparse.Namespace, argv: Sequence[str]) -> Dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    if args.pixel_space:
        pipe = TinyFlowPipeline.from_config(pixel_space=True)
    else:
        from diffusers import AutoencoderKL

        vae_folder = Path(args.vae) if args.vae else out / "vae"
        if not (vae_folder / "config.json").is_file():
            raise FileNotFoundError(f"no trained VAE in {str(vae_folder)!r}: run --stage vae first or pass --vae FOLDER")
        vae = AutoencoderKL.from_pretrained(str(vae_folder)).eval().requires_grad_(False)
        pipe = TinyFlowPipeline.from_config()
        pipe = TinyFlowPipeline(pipe.transformer, pipe.text_encoder, pipe.image_size, vae)
    params = dict(_named_parameters(pipe))
    pipe.transformer.train()
    pipe.text_encoder.train()
    optimizer = torch.optim.AdamW(list(params.values()), lr=args.lr, betas=(0.9, 0.99), weight_decay=args.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(args.warmup, 1)))
    ema = {name: p.detach().clone() for name, p in params.items()} if args.ema > 0 else None
    rng = random.Random(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    record = {
        "command": _command(argv), "stage": "flow",
        "vae": None if args.pixel_space else "vae/ (see vae_record.json)",
        "seed": args.seed, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "warmup": args.warmup,
        "weight_decay": args.weight_decay, "ema": args.ema, "text_dropout": args.text_dropout,
        "data": {"description": "random train-split scenes of dancegrpo_fast.tiny.task (random_scene(rng, 'train', "
                                f"single_fraction={args.single_fraction}) with rng = random.Random(seed)), rendered "
                                "at 32x32 on the fly, one fresh image per sample",
                 "caption_noise": args.caption_noise,
                 "heldout_pairs_never_seen": sorted(list(p) for p in task.HELDOUT_PAIRS),
                 "train_compositions": len(task.split_scenes("train")),
                 "heldout_compositions": len(task.split_scenes("heldout"))},
        "objective": "rectified flow: x_t = (1-t) x0 + t noise, target noise - x0, t ~ 0.8 sigmoid(N(0,1)) + 0.2 U(0,1)",
        "parameters": {c: sum(p.numel() for p in m.parameters()) for c, m in pipe.components.items()},
        "threads": args.threads, "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "storage_dtype": args.storage_dtype, "loss_curve": [],
    }
    start = time.perf_counter()
    running = None
    for step in range(1, args.steps + 1):
        scenes = [task.random_scene(rng, "train", args.single_fraction) for _ in range(args.batch_size)]
        captions = [task.noisy_caption(s, rng, args.caption_noise) for s in scenes]
        prompts = [c.prompt() if rng.random() >= args.text_dropout else "" for c in captions]
        images = task.render_batch(scenes, rng=rng)
        with torch.no_grad():
            x0 = pipe.images_to_latents(images)
        noise = torch.randn(x0.shape, generator=generator)
        t = sample_times(args.batch_size, generator)
        x_t = (1 - t.view(-1, 1, 1)) * x0 + t.view(-1, 1, 1) * noise
        cond = pipe.encode_prompt(prompts)
        v = pipe.velocity(pipe.transformer, x_t, t, cond)
        loss = (v.float() - (noise - x0)).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(list(params.values()), args.max_grad_norm)
        optimizer.step()
        schedule.step()
        if ema is not None:
            decay = min(args.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                for name, p in params.items():
                    ema[name].lerp_(p.detach(), 1 - decay)
        running = _track_loss(loss, running, step, args, record, start, "")
        if args.snapshot_every and step % args.snapshot_every == 0 and step != args.steps:
            snapshot = dict(record, steps=step, seconds=round(time.perf_counter() - start, 1), final_loss=round(running, 5),
                            note=f"snapshot at step {step} of a {args.steps}-step run; equals a run with --steps {step}")
            save(pipe, ema, out / "snapshots" / f"step_{step:06d}", snapshot, args.storage_dtype)
    record["seconds"] = round(time.perf_counter() - start, 1)
    record["final_loss"] = round(running, 5)
    save(pipe, ema, out, record, args.storage_dtype)
    return record


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.steps < 1 or args.batch_size < 1:
        print("error: --steps and --batch_size must be >= 1", file=sys.stderr)
        return 2
    if not 0.0 <= args.caption_noise <= 1.0:
        print(f"error: --caption_noise is a probability in [0, 1], got {args.caption_noise}", file=sys.stderr)
        return 2
    if args.stage == "vae":
        record = pretrain_vae(args, argv)
        print(f"wrote {args.out}/vae: {record['steps']} steps in {record['seconds']:.0f} s, final loss "
              f"{record['final_loss']:.4f}")
        return 0
    try:
        record = pretrain(args, argv)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {record['steps']} steps in {record['seconds']:.0f} s, final loss {record['final_loss']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
