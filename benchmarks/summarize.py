"""Print a short table from a step_loss_<device>.json or flux_iteration_<device>.json written by the
benchmarks."""
import json
import sys


def main(path):
    data = json.load(open(path))
    if data.get("benchmark") == "flux_iteration":
        return flux_iteration(data)
    print(f"device: {data['device']}   date: {data['date']}")
    if "copy_bandwidth_GBps" in data["results"]:
        print(f"measured copy bandwidth: {data['results']['copy_bandwidth_GBps']:.0f} GB/s")
    print(f"{'size':16s} {'fused ms':>9s} {'eager ms':>9s} {'compile ms':>10s} {'x eager':>8s} {'x compile':>9s} "
          f"{'peak MB f/e/c':>18s} {'f32 bufs f/e/c':>16s} {'%copy bw':>8s}")
    for size, entry in data["results"].items():
        if not isinstance(entry, dict) or "fused" not in entry:
            continue
        f, e, c = entry["fused"], entry.get("eager", {}), entry.get("compiled", {})
        mb = lambda s: f"{s.get('peak_bytes', float('nan')) / 2**20:.0f}"  # noqa: E731
        ms = lambda s: f"{s.get('median_s', float('nan')) * 1e3:.3f}"  # noqa: E731
        frac = f.get("fraction_of_copy_bandwidth")
        bufs = "/".join(f"{s.get('extra_f32_buffers', float('nan')):.2f}" for s in (f, e, c))
        print(f"{size:16s} {ms(f):>9s} {ms(e):>9s} {ms(c):>10s} {e.get('speedup_of_fused', float('nan')):8.2f} "
              f"{c.get('speedup_of_fused', float('nan')):9.2f} {mb(f) + '/' + mb(e) + '/' + mb(c):>18s} {bufs:>16s} "
              f"{'' if frac is None else f'{100 * frac:.0f}%':>8s}")
        if f.get("kernel_fraction_of_copy_bandwidth") is not None:
            print(f"{'':16s} fused kernels alone: {f['kernel_s'] * 1e6:.1f} us, "
                  f"{100 * f['kernel_fraction_of_copy_bandwidth']:.0f}% of copy bandwidth")


def flux_iteration(data):
    model = data["model"]
    print(f"device: {data['device']}   date: {data['date']}   transformer: {model['transformer']}, "
          f"{model['parameters'] / 1e9:.2f} B parameters, LoRA rank {model['lora_rank']} "
          f"({model['trainable_parameters_lora'] / 1e6:.1f} M trainable)")
    s = data["settings"]
    print(f"settings: {s['height']}x{s['width']}, {s['num_steps']} steps, G={s['group_size']}, "
          f"{data['trained_steps_per_sample']} trained steps per sample")
    print(f"{'variant':16s} {'rollout s':>10s} {'update s':>9s} {'total s':>8s} {'peak GiB':>9s} {'x reference':>11s}")
    for name, r in data["results"].items():
        x = data["speedup_vs_reference_loop"].get(name, {}).get("total", 1.0)
        print(f"{name:16s} {r['seconds_rollout']:10.2f} {r['seconds_update']:9.2f} {r['seconds_total']:8.2f} "
              f"{r.get('peak_memory_GiB', float('nan')):9.1f} {x:11.2f}")


if __name__ == "__main__":
    main(sys.argv[1])

