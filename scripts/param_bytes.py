"""Parameter bytes per device for a layout, split into the layer stack and the io slot.

    python scripts/param_bytes.py --pp 4 --pp_split 1,3,3,1 --tie_embeddings false

Takes the same flags as train.py; builds the stage-stacked parameters on simulated CPU
devices and prints, per (stage, ep rank), the bytes of layers and of the io table (embedding
on stage 0, head on the last stage, an unused zero slot on middle stages).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jmamba.cli import parse_config, simulate_cpu_devices  # noqa: E402


def main():
    cfg = parse_config(sys.argv[1:])
    simulate_cpu_devices(cfg.parallel.pp * cfg.parallel.ep)
    import numpy as np
    from jmamba.parallel.setup import build, io_slot_use, param_bytes_per_device
    run = build(cfg)
    if run.mesh is None:
        sys.exit("one device: nothing to split; pass --pp, --ep or --microbatches")
    per_device = param_bytes_per_device(run.state.params)
    use = io_slot_use(run.layout)
    print("| stage | ep rank | layers held | layer MB | io MB | io slot holds |")
    print("|---|---|---|---|---|---|")
    for (s, e), dev in np.ndenumerate(run.mesh.devices):
        held = [f"{a}-{b - 1}" for k, (a, b) in enumerate(run.layout.splits)
                if k % run.layout.pp == s]
        b = per_device[dev.id]
        print(f"| {s} | {e} | {', '.join(held)} | {b['layers'] / 1e6:.2f} | "
              f"{b['io'] / 1e6:.2f} | {use[s] if run.layout.pp > 1 else ' + '.join(use)} |")


if __name__ == "__main__":
    main()
