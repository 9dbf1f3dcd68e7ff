#!/usr/bin/env python3
"""Layers point one way (README: "What each folder may touch"): every translation unit of the
build, with every header it pulls in (transitively, from the compiler's own dependency files),
may reach only the folders its own folder may. Usage: check_layers.py SOURCE_DIR BUILD_DIR"""
import json
import os
import shlex
import subprocess
import sys

# What each folder's files may include from the project, besides their own folder.
LOWER = {
    "config": set(),
    "transport": {"config", "cuda"},
    "cuda": {"config"},
    "actors": {"config", "transport", "cuda"},
    "runtime": {"config", "transport", "cuda", "actors", "include"},
    # The command is a client of the library: the public API and the headers meant for
    # kvflow's own engines, nothing from actors/ and no other part of runtime/.
    "command": {"config", "transport", "cuda", "include", "runtime/engine_host.hpp", "runtime/node.hpp",
                "runtime/link_guard.hpp",
                "bench/bench.hpp"},
    "bench": {"config", "transport", "cuda", "actors", "runtime", "command", "include"},
}


def deps_of(entry, src):
    """The project files one translation unit reads: its depfile, or the compiler's answer."""
    args = shlex.split(entry["command"])
    out = args[args.index("-o") + 1] if "-o" in args else None
    depfile = os.path.join(entry["directory"], out + ".d") if out else None
    if depfile and os.path.exists(depfile):
        text = open(depfile).read()
    else:
        if out:
            i = args.index("-o")
            del args[i:i + 2]
        args = [a for a in args if a not in ("-c", "-MD", "-MMD")]
        text = subprocess.run(args + ["-MM"], cwd=entry["directory"], check=True, capture_output=True,
                              text=True).stdout
    words = text.replace("\\\n", " ").split()
    files = set()
    for w in words:
        if w.endswith(":") or w.endswith(".o"):  # the rule's target (nvcc writes "x.o :")
            continue
        p = os.path.realpath(os.path.join(entry["directory"], w))
        if p.startswith(src + os.sep):
            rel = os.path.relpath(p, src)
            if not rel.startswith(".deps" + os.sep):  # dependencies unpacked into the checkout
                files.add(rel)
    return files


def allowed(folder, dep):
    if dep.startswith(folder + "/"):
        return True
    top = dep.split("/", 1)[0]
    return top in LOWER[folder] or dep in LOWER[folder]


def main():
    src, build = os.path.realpath(sys.argv[1]), sys.argv[2]
    entries = json.load(open(os.path.join(build, "compile_commands.json")))
    checked, bad = 0, []
    for e in entries:
        f = os.path.relpath(os.path.realpath(os.path.join(e["directory"], e["file"])), src)
        folder = f.split("/", 1)[0]
        if folder not in LOWER:
            continue  # tests and examples may reach anything they test
        checked += 1
        for d in sorted(deps_of(e, src)):
            if d != f and not allowed(folder, d):
                bad.append(f"{f} includes {d}, which {folder}/ may not touch")
    for b in bad:
        print(b)
    print(f"{checked} translation units checked, {len(bad)} crossings")
    if checked == 0:
        print("no translation unit of the library's folders was found in compile_commands.json")
        return 1
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
