"""Decoding on a busy machine (issue 22 item 4): seed batch-1 decode tokens/s idle and with
--busy processes spinning on the same cores, for each OpenMP wait setting, side by side.

  python bench/bench_contention.py                      # palmcore's default and the alternatives
  python bench/bench_contention.py --busy 4 --settings default,passive

Each setting runs in its own process (libgomp reads its settings when it loads), the settings
alternating round by round; each round times the idle decode, starts the busy processes, times
the loaded decode and stops them. The table gives the median over rounds and loaded / idle.
Settings: "default" is what palmcore sets (palmcore/__init__.py), "libgomp" libgomp's own
(palmcore's default turned off), "passive" OMP_WAIT_POLICY=passive, "spin=N" GOMP_SPINCOUNT=N.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CHILD = r"""
import json, sys, time
import palmcore
model = palmcore.PaLM(palmcore.PaLMConfig.preset("seed"), seed=0)
prompt = [[1] + list(range(5, 36))]
def rate(new):
    g = model.generation(prompt, max_new_tokens=new, temperature=0.0, top_k=0, top_p=1.0, stop_tokens=())
    g.step()
    t = time.perf_counter()
    g.run()
    return (new - 1) / (time.perf_counter() - t)
rate(16)  # warm up
for line in sys.stdin:  # one request a line: the number of new tokens
    print(json.dumps(rate(int(line))), flush=True)
"""


def environment(setting: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    if setting == "libgomp":
        env["PALMCORE_OMP_DEFAULTS"] = "0"
    elif setting == "passive":
        env["OMP_WAIT_POLICY"] = "passive"
    elif setting.startswith("spin="):
        env["GOMP_SPINCOUNT"] = setting[5:]
    elif setting != "default":
        raise SystemExit(f"unknown setting {setting!r}")
    return env


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", default="default,libgomp,passive")
    ap.add_argument("--busy", type=int, default=4, help="spinning processes during the loaded runs")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new", type=int, default=200, help="tokens per timed decode")
    args = ap.parse_args()
    settings = args.settings.split(",")
    children = {s: subprocess.Popen([sys.executable, "-c", CHILD], env=environment(s), text=True,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE) for s in settings}

    def rate(s):
        children[s].stdin.write(f"{args.new}\n")
        children[s].stdin.flush()
        return json.loads(children[s].stdout.readline())

    idle = {s: [] for s in settings}
    loaded = {s: [] for s in settings}
    try:
        for _ in range(args.rounds):
            for s in settings:
                idle[s].append(rate(s))
                busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
                time.sleep(0.5)
                try:
                    loaded[s].append(rate(s))
                finally:
                    for p in busy:
                        p.kill()
                        p.wait()
    finally:
        for c in children.values():
            c.stdin.close()
            c.wait()
    print(f"seed, batch 1, {args.new} tokens, {len(os.sched_getaffinity(0))} cores, {args.busy} busy processes")
    print("\n| setting | idle tok/s | loaded tok/s | loaded / idle |\n|---|---|---|---|")
    for s in settings:
        i, b = statistics.median(idle[s]), statistics.median(loaded[s])
        print(f"| {s} | {i:,.0f} | {b:,.0f} | {b / i:.2f} |")


if __name__ == "__main__":
    main()
