#!/usr/bin/env python3
"""Checks that the project's folders include each other without cycles.

A folder is a top-level folder of the repository (tensor/, nn/, attention/, ...; a subfolder such
as nn/dist/ belongs to its top-level folder). Folder A depends on folder B when a file under A has
`#include "B/..."`. The folders must form a directed acyclic graph, so that each one can be read,
built and tested on top of the ones it includes. Exits 1 and prints every cycle (with one include
that makes each step) otherwise.

Usage: check_include_cycles.py [REPO_ROOT]   (default: the folder above this script)
"""
import os
import re
import sys

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
    root = os.path.abspath(args[0] if args else os.path.join(os.path.dirname(__file__), ".."))
    edges = folder_edges(root)
    nodes = {a for a, _ in edges} | {b for _, b in edges}
    ok = True
    for component in cycles(nodes, edges):
        ok = False
        print("include check: these folders include each other in a cycle: " + ", ".join(component))
        print_cycle(component, edges)
    if ok:
        print(f"include check: {len(nodes)} folders, {len(edges)} dependencies, no cycle")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
