"""A real full disk and a real read-only disk under train.py's checkpoints (issue 18).

Needs root (it mounts a small tmpfs and a read-only bind mount); the GPU machines give it.
Each case runs `python train.py --config cpu_demo` on the CPU with --ckpt_dir on that
mount, under a time limit, and reports the exit code, how many lines stderr had, its last
line, and what is on disk afterwards:
  full      a tmpfs with room for one checkpoint (3.6 MiB each) and --keep 3: a later save
            hits ENOSPC mid-run -> expect exit 1 naming the last complete checkpoint
  full, resumed   the same command again after freeing space: resumes from that step
  ro start  --ckpt_dir on a read-only mount -> expect exit 2 before the model is built
  ro midrun the mount turns read-only after the first checkpoint -> expect exit 1, no hang

    python3 scripts/disk_faults.py --out $OUT/disk
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = [sys.executable, os.path.join(ROOT, "train.py"), "--config", "cpu_demo",
         "--progress", "lines", "--log_every", "1", "--eval_every", "0"]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def sh(*cmd):
    return subprocess.run(cmd, capture_output=True, text=True)


OUT = "."


def outcome(name, proc_or_none, stderr, rc, seconds, ckpt_dir):
    lines = [l for l in stderr.splitlines() if l.strip()]
    stem = "".join(c if c.isalnum() else "_" for c in name)
    with open(os.path.join(OUT, f"{stem}.stderr.txt"), "w") as f:
        f.write(stderr)
    steps = sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit()) if os.path.isdir(
        ckpt_dir) else []
    row = {"case": name, "rc": rc, "seconds": round(seconds, 1), "stderr_lines": len(lines),
           "last_line": lines[-1][:300] if lines else "", "checkpoints_on_disk": steps}
    print(json.dumps(row), flush=True)
    return row


def run(name, flags, ckpt_dir, limit=240):
    t = time.time()
    try:
        p = subprocess.run(TRAIN + flags, capture_output=True, text=True, env=ENV,
                           timeout=limit, cwd=ROOT)
        return outcome(name, p, p.stderr, p.returncode, time.time() - t, ckpt_dir)
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        return outcome(name, None, err + "\nHUNG: killed at the time limit", "hung",
                       time.time() - t, ckpt_dir)


def full_disk(base: str, rows: list) -> None:
    full = os.path.join(base, "full")
    os.makedirs(full)
    m = sh("mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", full)
    if m.returncode:
        print(json.dumps({"case": "setup", "error": f"mount: {m.stderr.strip()}"}))
        return
    try:
        ckpt = os.path.join(full, "ckpt")
        # The filler leaves room for preflight's one checkpoint (and a little more), not
        # for a second; without it the 16 MiB hold --keep 3 and one in flight.
        with open(os.path.join(full, "filler"), "wb") as f:
            f.write(b"\0" * (16 * 2**20 - 6 * 2**20))
        flags = ["--steps", "12", "--ckpt_dir", ckpt, "--ckpt_every", "2", "--keep", "3",
                 "--log_dir", os.path.join(base, "log_full")]
        rows.append(run("full disk", flags, ckpt))
        os.remove(os.path.join(full, "filler"))
        rows.append(run("full disk, resumed after freeing space", flags, ckpt))
    finally:
        sh("umount", full)


def read_only(base: str, rows: list) -> None:
    src, ro = os.path.join(base, "src"), os.path.join(base, "ro")
    os.makedirs(src)
    os.makedirs(ro)
    m = sh("mount", "--bind", src, ro)
    r = sh("mount", "-o", "remount,bind,ro", ro)
    if m.returncode or r.returncode:
        print(json.dumps({"case": "setup", "error": f"bind mount: {m.stderr}{r.stderr}"}))
        return
    try:
        rows.append(run("read-only at start", ["--steps", "4", "--ckpt_dir",
                                               os.path.join(ro, "ckpt"), "--log_dir",
                                               os.path.join(base, "log_ro")],
                        os.path.join(ro, "ckpt")))
        sh("mount", "-o", "remount,bind,rw", ro)
        ckpt = os.path.join(ro, "ckpt2")
        p = subprocess.Popen(TRAIN + ["--steps", "400", "--ckpt_dir", ckpt, "--ckpt_every",
                                      "2", "--log_dir", os.path.join(base, "log_ro2")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env=ENV, cwd=ROOT)
        t = time.time()
        while not os.path.isdir(os.path.join(ckpt, "2")) and time.time() - t < 180:
            time.sleep(0.2)
        flip = sh("mount", "-o", "remount,bind,ro", ro)
        try:
            _, err = p.communicate(timeout=240)
            rc = p.returncode
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
            rc, err = "hung", err + "\nHUNG: killed at the time limit"
        rows.append(outcome("read-only mid-run" + (f" (remount failed: {flip.stderr})"
                                                   if flip.returncode else ""),
                            None, err, rc, time.time() - t, ckpt))
    finally:
        sh("umount", ro)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--cases", default="full,ro", help="full (the two full-disk cases), "
                    "ro (the two read-only cases)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    global OUT
    OUT = args.out
    rows = []
    base = tempfile.mkdtemp(prefix="jmamba_disk_")
    if "full" in args.cases.split(","):
        full_disk(base, rows)
    if "ro" in args.cases.split(","):
        read_only(base, rows)
    with open(os.path.join(args.out, "disk_faults.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
