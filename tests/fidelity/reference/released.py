"""Helpers the golden-value scripts share to run the authors' released code outside the project:
stand-in modules for imports the compared parts never call, executing chosen definitions of a
released file, and the commit of a local mirror for provenance. Nothing of their code is stored."""

from __future__ import annotations

import ast
import subprocess
import types


class StandInModule(types.ModuleType):
    """A stand-in module: every public attribute is a placeholder class (dunder lookups, e.g.
    ``__file__`` by ``inspect``, fail as on a real module without them)."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {})


def execute_definitions(source: str, names: set[str], namespace: dict) -> dict:
    """Execute only the top-level function/class definitions ``names`` of ``source`` in
    ``namespace`` (the file's other top-level statements, e.g. its imports, are skipped)."""
    tree = ast.parse(source)
    body = [n for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef) and n.name in names]
    exec(compile(ast.Module(body=body, type_ignores=[]), "<released>", "exec"), namespace)  # noqa: S102
    return namespace


def mirror_commit(git_dir: str) -> str:
    """``HEAD`` of the bare mirror ``git_dir`` of the authors' repository, or "unknown"."""
    try:
        return subprocess.run(["git", "--git-dir", git_dir, "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):  # provenance only
        return "unknown"
