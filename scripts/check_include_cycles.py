#!/usr/bin/env python3
"""Checks that the project's folders include each other without cycles.

A folder is a top-level folder of the repository (tensor/, nn/, attention/, ...; a subfolder such
as nn/dist/ belongs to its top-level folder). Folder A depends on folder B when a file under A has
`#include "B/..."`. With the few dependencies listed in LOWER_LAYER_CALLBACKS left out, the folders
must form a directed acyclic graph, so that each one can be read, built and tested on top of the
ones it includes. Exits 1 and prints every cycle (with one include that makes each step) otherwise.

Usage: check_include_cycles.py [--all] [REPO_ROOT]   (default: the folder above this script)
  --all  also lists the cycles that the declared lower-layer callbacks close (informational: exits 0
         unless an undeclared cycle is found).
"""
import os
import re
import sys

# Dependencies that go back down by design, each with its reason. A cycle through any other edge
# fails the check; so does an entry here that no longer exists (the list only shrinks).
LOWER_LAYER_CALLBACKS = {
    ("tensor", "autograd"): "tensor ops record their backward nodes on the tape, which is made of tensors",
    ("tensor", "cuda"): "tensor kernels dispatch to the CUDA backend, whose kernels take tensors",
    ("cuda", "attention"): "the fused CUDA attention kernels read the problem description of attention/fused",
}

SOURCE_SUFFIXES = (".h", ".hpp", ".cpp", ".cu", ".cuh", ".inc")
INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"')


def folder_edges(root):
    """{(from_folder, to_folder): "file:line"} over every quoted include that names a folder."""
    folders = {d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith(".")
               and not d.startswith("build")}
    edges = {}
    for top in sorted(folders):
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, top)):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if not name.endswith(SOURCE_SUFFIXES):
                    continue
                path = os.path.join(dirpath, name)
                with open(path, encoding="utf-8", errors="replace") as f:
                    for number, line in enumerate(f, 1):
                        m = INCLUDE.match(line)
                        if not m or "/" not in m.group(1):
                            continue
                        target = m.group(1).split("/", 1)[0]
                        if target in folders and target != top:
                            edges.setdefault((top, target), f"{os.path.relpath(path, root)}:{number}")
    return edges


def cycles(nodes, edges):
    """Every strongly connected component of more than one folder (Tarjan)."""
    graph = {n: sorted(b for (a, b) in edges if a == n) for n in nodes}
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for n in sorted(nodes):
        if n not in index:
            visit(n)
    return found


def print_cycle(component, edges):
    for (a, b), where in sorted(edges.items()):
        if a in component and b in component:
            print(f"  {a}/ -> {b}/  ({where})")


def main():
    args = sys.argv[1:]
    show_all = "--all" in args
    args = [a for a in args if a != "--all"]
    root = os.path.abspath(args[0] if args else os.path.join(os.path.dirname(__file__), ".."))
    edges = folder_edges(root)
    ok = True
    for edge, reason in LOWER_LAYER_CALLBACKS.items():
        if edge not in edges:
            print(f"include check: {edge[0]}/ no longer includes {edge[1]}/; remove that entry "
                  f"({reason}) from LOWER_LAYER_CALLBACKS")
            ok = False
    checked = {e: where for e, where in edges.items() if e not in LOWER_LAYER_CALLBACKS}
    nodes = {a for a, _ in edges} | {b for _, b in edges}
    for component in cycles(nodes, checked):
        ok = False
        print("include check: these folders include each other in a cycle: " + ", ".join(component))
        print_cycle(component, checked)
    if show_all:
        for component in cycles(nodes, edges):
            print("include check (--all, declared callbacks included): a cycle among " + ", ".join(component))
            print_cycle(component, edges)
    if ok:
        print(f"include check: {len(nodes)} folders, {len(checked)} dependencies, no cycle "
              f"(besides {len(LOWER_LAYER_CALLBACKS)} declared lower-layer callbacks)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
