#!/usr/bin/env python3
"""Fails if files of one crate import each other in a circle.

For every crate under src/ and crates/*/src (library and binaries), each .rs file is a
module; an edge A -> B means file A names something of module B through `use` or a path
(`crate::…`, `super::…`, `self::…`). Declaring a child module (`mod b;`) is not an import.
A strongly connected component of more than one file is a cycle and is reported; so is a
cycle between top-level modules (files grouped by their first module path segment).
"""
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def crates():
    """(crate root file, source dir) for every lib and bin crate."""
    for src in [ROOT / "src", *sorted((ROOT / "crates").glob("*/src")), ROOT / "loadtest" / "src"]:
        if (src / "lib.rs").exists():
            yield src / "lib.rs", src
        if (src / "main.rs").exists():
            yield src / "main.rs", src
        for main in sorted((src / "bin").glob("*/main.rs")) if (src / "bin").exists() else []:
            yield main, main.parent


def module_files(root_file, src_dir):
    """Maps module path (tuple) -> file, following `mod x;` declarations from the root."""
    out = {}

    def walk(path, file):
        out[path] = file
        text = strip_comments(file.read_text())
        base = file.parent if file.name in ("mod.rs", "lib.rs", "main.rs") else file.with_suffix("")
        for m in re.finditer(r'(?:#\[path\s*=\s*"([^"]+)"\]\s*)?(?:pub(?:\([^)]*\))?\s+)?mod\s+(\w+)\s*;', text):
            explicit, name = m.group(1), m.group(2)
            if explicit:
                child = (file.parent / explicit).resolve()
                if ROOT not in child.parents or not child.exists():
                    continue
            else:
                child = base / f"{name}.rs"
                if not child.exists():
                    child = base / name / "mod.rs"
                if not child.exists():
                    continue
            walk(path + (name,), child)

    walk((), root_file)
    return out


def strip_comments(text):
    # Unit tests at the end of a file (`#[cfg(test)] mod tests { use super::*; … }`) name their
    # own file's module through `super`: not an import of the parent.
    text = re.split(r"#\[cfg\(test\)\]\s*mod\s+\w+\s*\{", text)[0]
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', text)
    return re.sub(r"//[^\n]*", "", text)


def expand(tree):
    """Expands `a::{b, c::{d, e}}` into paths."""
    tree = tree.strip()
    i = tree.find("{")
    if i < 0:
        return [tree]
    prefix, body = tree[:i], tree[i + 1 : tree.rfind("}")]
    parts, depth, cur = [], 0, ""
    for ch in body:
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        depth += ch == "{"
        depth -= ch == "}"
        cur += ch
    parts.append(cur)
    return [p for part in parts if part.strip() for p in expand(prefix + part.strip())]


def resolve(path, here, modules):
    segs = [s for s in re.split(r"::", path.split(" as ")[0].strip()) if s]
    if not segs:
        return None
    if segs[0] == "crate":
        base, rest = (), segs[1:]
    elif segs[0] in ("super", "self"):
        base = here
        while segs and segs[0] in ("super", "self"):
            if segs[0] == "super":
                base = base[:-1]
            segs = segs[1:]
        rest = segs
    else:
        return None
    best = None
    for n in range(len(rest), -1, -1):
        cand = base + tuple(rest[:n])
        if cand in modules:
            best = cand
            break
    return best


def main():
    failed = False
    for root_file, src_dir in crates():
        modules = module_files(root_file, src_dir)
        file_mod = {f: m for m, f in modules.items()}
        edges = {f: set() for f in file_mod}
        for f, here in file_mod.items():
            text = strip_comments(f.read_text())
            paths = []
            for m in re.finditer(r"\buse\s+([^;]+);", text):
                paths += expand(m.group(1))
            paths += re.findall(r"\b(?:crate|super|self)(?:::\w+)+", text)
            for p in paths:
                target = resolve(p, here, modules)
                if target is None:
                    continue
                tf = modules[target]
                # A child module is reached through its parent's file: naming `super::x` from
                # a sibling is an edge to x, not to the parent.
                if tf != f and not (here[: len(target)] == target and len(target) < len(here)
                                    and p.split("::")[0] == "super" and target != here[:-1]):
                    edges[f].add(tf)
        # The same at the level of top-level modules (router, cluster, net…): a module may use
        # another only if that one never uses it back.
        top = {f: (m[:1] or ("(root)",)) for f, m in file_mod.items()}
        tops = {t: set() for t in top.values()}
        for a, bs in edges.items():
            for b in bs:
                if top[a] != top[b] and top[a] != ("(root)",) and top[b] != ("(root)",):
                    tops[top[a]].add(top[b])
        for scc in sccs(tops):
            if len(scc) > 1:
                failed = True
                names = sorted("::".join(m) for m in scc)
                print(f"module cycle in {root_file.relative_to(ROOT)}: {' <-> '.join(names)}")
        for scc in sccs(edges):
            if len(scc) > 1:
                failed = True
                names = sorted(str(s.relative_to(ROOT)) for s in scc)
                print(f"import cycle in {root_file.relative_to(ROOT)}: {' <-> '.join(names)}")
                for a in scc:
                    for b in edges[a] & set(scc):
                        print(f"  {a.relative_to(ROOT)} -> {b.relative_to(ROOT)}")
    if failed:
        sys.exit(1)
    print("no circular imports between files")


def sccs(graph):
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(comp)

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            strong(v)
    return out


if __name__ == "__main__":
    main()
