"""Where a process's host time went, from py-spy's collapsed stacks (`py-spy record --format raw`).

    python -m bench.stacks FILE [--within NAME] [--top N]

Prints the functions with the most samples in their own code (the leaf of a stack) and with the most
samples anywhere below them (each function counted once a stack), and the packages the leaves belong to.
`--within NAME` keeps only the stacks that pass through a function whose name contains NAME; `--without
TEXT` leaves out those with a frame containing TEXT (say, `triton/compiler`: kernels being compiled).
"""
from __future__ import annotations

import argparse
import re
from collections import Counter

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]*)(?::(?P<line>\d+))?\)$")


def parse(path: str) -> list[tuple[list[str], int]]:
    stacks = []
    with open(path) as fh:
        for raw in fh:
            raw = raw.rstrip("\n")
            if not raw:
                continue
            frames, _, count = raw.rpartition(" ")
            try:
                n = int(count)
            except ValueError:
                continue
            stacks.append((frames.split(";"), n))
    return stacks


def name(frame: str) -> str:
    """`function (file)` without the line number, with the file shortened to what follows site-packages."""
    m = FRAME.match(frame)
    if not m:
        return frame
    file = m["file"]
    for marker in ("site-packages/", "dist-packages/", "/site/", "lib/python3"):
        if marker in file:
            file = file.split(marker, 1)[1]
            break
    return f"{m['func']} ({file})"


def package(frame: str) -> str:
    m = FRAME.match(frame)
    file = m["file"] if m else frame
    for marker in ("site-packages/", "dist-packages/", "/site/"):
        if marker in file:
            return file.split(marker, 1)[1].split("/", 1)[0]
    return file.rsplit("/", 2)[-2] if "/" in file else file


def report(stacks: list[tuple[list[str], int]], top: int) -> str:
    total = sum(n for _, n in stacks)
    own: Counter[str] = Counter()
    below: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    for frames, n in stacks:
        own[name(frames[-1])] += n
        packages[package(frames[-1])] += n
        for f in {name(f) for f in frames}:
            below[f] += n
    lines = [f"{total} samples"]
    for title, counts in (("own time (the leaf of the stack)", own), ("total time (anywhere in the stack)", below),
                          ("own time by package", packages)):
        lines.append(f"\n-- {title}")
        for key, n in counts.most_common(top):
            lines.append(f"{100 * n / max(total, 1):6.1f}%  {n:7d}  {key}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.stacks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file")
    p.add_argument("--within", help="keep only stacks through a function whose name contains this")
    p.add_argument("--without", help="leave out the stacks through a function or file whose text contains this")
    p.add_argument("--top", type=int, default=40)
    args = p.parse_args(argv)
    stacks = parse(args.file)
    if args.within:
        stacks = [(f, n) for f, n in stacks if any(args.within in name(x).split(" (")[0] for x in f)]
    if args.without:
        stacks = [(f, n) for f, n in stacks if not any(args.without in x for x in f)]
    print(report(stacks, args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
