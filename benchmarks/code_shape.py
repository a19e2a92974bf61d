"""The shape of src/harmodiff: functions over 50 lines, functions with 6+ parameters, the largest class.

`python benchmarks/code_shape.py [--root src/harmodiff]` prints a markdown table (issue 28 records it
before and after a clean-up; the duplicated-block count comes from the `duplicates` tool beside it).
"""

import argparse
import ast
from pathlib import Path


def shape(root: Path) -> dict:
    long_functions, many_parameters, classes = [], [], []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            name = f"{path.stem}.{getattr(node, 'name', '')}"
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                a = node.args
                n = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) + bool(a.vararg) + bool(a.kwarg)
                n -= bool(a.args and a.args[0].arg in ("self", "cls"))
                if lines > 50:
                    long_functions.append((lines, name))
                if n >= 6:
                    many_parameters.append((n, name))
            elif isinstance(node, ast.ClassDef):
                classes.append((node.end_lineno - node.lineno + 1, name))
    return {"long": sorted(long_functions, reverse=True), "params": sorted(many_parameters, reverse=True),
            "largest_class": max(classes) if classes else (0, "-")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1] / "src/harmodiff")
    a = p.parse_args(argv)
    s = shape(a.root)
    print("| measure | count | largest |")
    print("|---|---:|---|")
    print(f"| functions over 50 lines | {len(s['long'])} | "
          + ", ".join(f"`{n}` {k}" for k, n in s["long"][:5]) + " |")
    print(f"| functions with 6+ parameters | {len(s['params'])} | "
          + ", ".join(f"`{n}` {k}" for k, n in s["params"][:5]) + " |")
    lines, name = s["largest_class"]
    print(f"| largest class (lines) | {lines} | `{name}` |")


if __name__ == "__main__":
    main()
