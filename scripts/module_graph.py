#!/usr/bin/env python3
"""Prints the import graph between the top-level modules of a crate's `src/` and its cycles.

    python3 scripts/module_graph.py [SRC_DIR]      # default: src
    python3 scripts/module_graph.py --check        # exit 1 if any cycle

A module `a` depends on `b` when a file of `a` names `crate::b` (in a `use` or a path). The
crate root (lib.rs) re-exports everything and is left out. Cycles are the strongly connected
components with more than one module.
"""
import os
import re
import sys


def top_module(src, path):
    rel = os.path.relpath(path, src)
    first = rel.split(os.sep)[0]
    return first[:-3] if first.endswith(".rs") else first


def graph(src):
    modules = {
        top_module(src, os.path.join(src, e))
        for e in os.listdir(src)
        if e != "lib.rs" and not e.endswith("_tests.rs")  # test files included with #[path]
    }
    edges = {m: set() for m in modules}
    for root, _, files in os.walk(src):
        for name in files:
            if not name.endswith(".rs") or (root == src and name == "lib.rs"):
                continue
            path = os.path.join(root, name)
            source = open(path, encoding="utf-8").read()
            # Drop comments and unit tests: only what the module needs to compile counts.
            source = re.sub(r"//[^\n]*", "", source)
            # Doc attributes (`#[doc = "…"]`, feature-dependent link targets) are comments too.
            source = re.sub(r'\bdoc\s*=\s*"(?:[^"\\]|\\.)*"', "", source)
            source = source.split("#[cfg(test)]")[0]
            here = top_module(src, path)
            if here not in modules:
                continue
            names = set(re.findall(r"\bcrate::([a-z_][a-z0-9_]*)", source))
            # `use crate::{a::X, b}` groups
            for group in re.findall(r"\bcrate::\{([^;]*?)\};", source, re.S):
                names |= set(re.findall(r"(?:^|[,{\s])([a-z_][a-z0-9_]*)(?=::|\s*[,}]|\s*$)", group))
            for other in names & modules:
                if other != here:
                    edges[here].add(other)
    return edges


def cycles(edges):
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def main():
    args = [a for a in sys.argv[1:] if a != "--check"]
    src = args[0] if args else "src"
    edges = graph(src)
    for module in sorted(edges):
        print(f"{module:<16} -> {', '.join(sorted(edges[module])) or '-'}")
    found = cycles(edges)
    print(f"{sum(len(e) for e in edges.values())} edges, {len(edges)} modules, {len(found)} cycle(s)")
    for component in found:
        print(f"cycle of {len(component)}: {' '.join(component)}")
    if "--check" in sys.argv and found:
        sys.exit(1)


if __name__ == "__main__":
    main()
