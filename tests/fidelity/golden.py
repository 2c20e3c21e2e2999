"""Golden values: figures obtained by running the authors' released code (outside this project) at
a tiny configuration with fixed weights, stored as safetensors beside a provenance record.

Layout, one folder per method under ``tests/fidelity/golden/<method>/``:

- ``weights.safetensors``: the fixed weights, in *this project's* parameter names (what
  ``load_state_dict`` of our module takes);
- ``inputs.safetensors``: the inputs both implementations were given;
- ``expected.safetensors``: the authors' outputs, losses and post-optimiser-step values, keyed
  ``<part>`` or ``<part>/<detail>`` (e.g. ``backbone``, ``loss/total``, ``step1/ridge.weight``);
- ``provenance.json``: repository, commit, package versions and the command that produced them
  (``tests/fidelity/reference/`` holds those scripts; they import the authors' checkout, they
  contain none of its code).

:func:`assert_golden` compares a dict of our values with the expected ones and names every part
that moved, with its maximum absolute difference.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

GOLDEN = Path(__file__).resolve().parent / "golden"
#: absolute for parts up to 1 in magnitude, relative above (``assert_golden(relative=True)``): the golden
#: values come from one CPU, and float32 results of other CPUs' BLAS kernels differ in the last bits
TOLERANCE = 1e-5


def golden_dir(method: str) -> Path:
    return GOLDEN / method


def load_golden(method: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """``(weights, inputs, expected, provenance)`` of ``method``'s golden fixture."""
    from safetensors.torch import load_file

    folder = golden_dir(method)
    return (load_file(folder / "weights.safetensors"), load_file(folder / "inputs.safetensors"),
            load_file(folder / "expected.safetensors"),
            json.loads((folder / "provenance.json").read_text()))


def assert_golden(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], method: str,
                  atol: float = TOLERANCE, keys: list[str] | None = None, relative: bool = True) -> None:
    """Every key of ``expected`` (or of ``keys``) equals ``actual`` to ``atol`` (absolute, after
    casting both to float64; ``relative``: ``atol`` times the part's largest magnitude when that
    exceeds 1, for float32 scalars such as a loss of 68 whose last bit alone is 8e-6, so that BLAS
    kernels of other CPUs do not count as a change); the failure message lists each part that moved."""
    keys = list(expected) if keys is None else keys
    problems = []
    for key in keys:
        if key not in actual:
            problems.append(f"{key}: not computed")
            continue
        a, e = actual[key].detach().double().cpu(), expected[key].double()
        if a.shape != e.shape:
            problems.append(f"{key}: shape {tuple(a.shape)}, the authors' code gives {tuple(e.shape)}")
            continue
        diff = float((a - e).abs().max()) if a.numel() else 0.0
        tol = atol * max(1.0, float(e.abs().max())) if relative and e.numel() else atol
        if not diff <= tol:
            problems.append(f"{key}: max |ours - theirs| = {diff:.3g} > {tol:g}")
    if problems:
        raise AssertionError(f"{method} moved away from the authors' released code in "
                             f"{len(problems)} part(s):\n  " + "\n  ".join(problems))
