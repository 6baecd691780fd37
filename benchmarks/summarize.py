"""Print a short table from a step_loss_<device>.json written by the benchmarks."""
import json
import sys


def main(path):
    data = json.load(open(path))
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


if __name__ == "__main__":
    main(sys.argv[1])
