#!/usr/bin/env python3
"""Profile from bench/profile/wallclock_sampler.cpp's samples.

    symbolize.py SAMPLES [DIR ...]

DIRs hold unstripped copies of the sampled binaries and libraries under their own names (the device
runs stripped ones); the system's library folder is searched after them. Prints the share of samples
per function where the sampled address was, and per (module, first vf function on the stack): the
second attributes time in JIT code (oneDNN's kernels, unmapped by the time the samples are written,
shown as "jit") and in libgomp (a thread waiting at a barrier) to the op that called it.
"""
import bisect
import collections
import os
import re
import subprocess
import sys


def load(path):
    maps, samples = [], []
    for line in open(path):
        if line.startswith("M "):
            f = line[2:].split()
            begin, end = (int(x, 16) for x in f[0].split("-"))
            maps.append((begin, end, int(f[2], 16), f[5] if len(f) > 5 else ""))
        elif line.startswith("S "):
            samples.append([int(x, 16) for x in line[2:].split()])
    maps.sort()
    return maps, samples


class Symbols:
    """Function names of one ELF file: its LOAD segments (file offset -> address) and symbol table."""

    def __init__(self, path):
        self.loads, table = [], {}
        for line in subprocess.run(["readelf", "-lW", path], capture_output=True, text=True).stdout.splitlines():
            f = line.split()
            if f and f[0] == "LOAD":
                self.loads.append((int(f[1], 16), int(f[2], 16), int(f[4], 16)))
        for flags in (["-C"], ["-C", "-D"]):
            out = subprocess.run(["nm", "--defined-only", *flags, path], capture_output=True, text=True).stdout
            for line in out.splitlines():
                f = line.split(" ", 2)
                if len(f) == 3 and f[1] in "tTwWiI":
                    table[int(f[0], 16)] = f[2]
        self.addresses = sorted(table)
        self.names = [table[a] for a in self.addresses]

    def name(self, file_offset):
        for offset, vaddr, size in self.loads:
            if offset <= file_offset < offset + size:
                j = bisect.bisect_right(self.addresses, file_offset - offset + vaddr) - 1
                return self.names[j] if j >= 0 else "?"
        return "?"


def short(name):
    name = name.replace("(anonymous namespace)", "anon").replace("._omp_fn", "_omp_fn")
    return re.sub(r"\(.*", "", name)[:100]


def main():
    maps, samples = load(sys.argv[1])
    dirs = sys.argv[2:] + ["/usr/lib/x86_64-linux-gnu"]
    starts = [m[0] for m in maps]
    symbols, names = {}, {}

    def symbols_of(path):
        if path not in symbols:
            base = os.path.basename(path)
            local = next((os.path.join(d, base) for d in dirs if os.path.exists(os.path.join(d, base))), None)
            symbols[path] = Symbols(local) if local else None
        return symbols[path]

    def name(address):
        if address not in names:
            i = bisect.bisect_right(starts, address) - 1
            result = "jit"
            if i >= 0 and maps[i][0] <= address < maps[i][1] and maps[i][3].startswith("/"):
                begin, _, offset, path = maps[i]
                module = re.sub(r"\.so[.0-9]*$", "", os.path.basename(path))
                s = symbols_of(path)
                result = module + ":" + short(s.name(address - begin + offset) if s else "?")
            names[address] = result
        return names[address]

    exe = os.path.basename(next((m[3] for m in maps if m[3].startswith("/")), ""))
    flat, by_caller = collections.Counter(), collections.Counter()
    for s in samples:
        where = name(s[0])
        flat[where] += 1
        caller = next((name(a) for a in s[1:] if a), "?")
        by_caller[(where.split(":")[0], caller if caller.startswith(exe) else "?")] += 1
    n = max(len(samples), 1)
    print(f"{len(samples)} samples")
    print("== where the sample was")
    for k, c in flat.most_common(30):
        print(f"{100 * c / n:6.2f}%  {k}")
    print("== module, first function of the executable on the stack")
    for (module, caller), c in by_caller.most_common(40):
        print(f"{100 * c / n:6.2f}%  {module:12s} {caller}")


if __name__ == "__main__":
    main()
