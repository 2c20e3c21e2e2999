"""Golden values for the image-metric suite, from MindEye2's released ``src/final_evaluations.ipynb``.

Run outside the project's test suite, with the released notebook on disk::

    python tests/fidelity/reference/make_metrics.py /path/to/MindEyeV2/src/final_evaluations.ipynb

The notebook's own cells are executed at run time (nothing of them is stored here) on tiny inputs:
6 ground truths and 6 reconstructions (32×32, fixed seed). Covered, per column:

- PixCorr and SSIM: the notebook's cells as released (resize 425 bilinear; rgb2gray + skimage SSIM).
- AlexNet(2)/(5), InceptionV3, EfficientNet-B1, SwAV: the notebook's cells (preprocessing, feature
  node, ``two_way_identification`` / correlation distance), with the real torchvision architectures
  at random weights drawn under ``torch.manual_seed(SEEDS[column])`` instead of the downloads
  (textual substitution of the weights argument / the hub call, listed in ``SUBSTITUTIONS``). The
  test rebuilds our extractors with ``weights: random:<seed>``, which draws the same weights.
- CLIP: the notebook's preprocessing and scoring with the identity as the network (ViT-L/14 is not
  built); the network itself is not covered.
- Retrieval: the notebook's retrieval cell with precomputed embeddings (``clip_img_embedder`` is the
  identity on stored image embeddings), 3 subsets of 8 out of 20 items from ``np.random.seed(42)``.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import torch

OUT = Path(__file__).resolve().parents[1] / "golden" / "metrics"
N, SIZE, SEED = 6, 32, 0
SEEDS = {"alexnet": 11, "inception": 12, "effnet": 13, "swav": 14}
N_RET, SUBSET, N_SUBSETS, RET_SEED, RET_DIM = 20, 8, 3, 42, 16
# (cell marker, old, new): how the download-dependent lines are replaced at run time
SUBSTITUTIONS = [
    ("alexnet(weights=alex_weights)", "alexnet(weights=alex_weights)", "alexnet(weights=None)"),
    ("inception_v3(weights=weights)", "inception_v3(weights=weights)",
     "inception_v3(weights=None, transform_input=True, aux_logits=True, init_weights=True)"),
    ("efficientnet_b1(weights=weights)", "efficientnet_b1(weights=weights)", "efficientnet_b1(weights=None)"),
    ("facebookresearch/swav", "torch.hub.load('facebookresearch/swav:main', 'resnet50')",
     "__import__('torchvision').models.resnet50()"),
    ("percent_correct_fwds, percent_correct_bwds = [], []", "range(30)", f"range({N_SUBSETS})"),
    ("percent_correct_fwds, percent_correct_bwds = [], []", "size=300", f"size={SUBSET}"),
    ("percent_correct_fwds, percent_correct_bwds = [], []", "== 300", f"== {SUBSET}"),
    ("percent_correct_fwds, percent_correct_bwds = [], []", "torch.cuda.amp.autocast(dtype=torch.float16)",
     "torch.autocast('cpu', enabled=False)"),
]


def cells(path: Path) -> list[str]:
    nb = json.loads(path.read_text())
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


def cell_with(sources: list[str], marker: str) -> str:
    found = [s for s in sources if marker in s]
    if len(found) != 1:
        raise SystemExit(f"expected one notebook cell containing {marker!r}, found {len(found)}")
    src = found[0]
    for m, old, new in SUBSTITUTIONS:
        if m == marker or m in src:
            if old not in src:
                raise SystemExit(f"substitution {old!r} not found in the cell with {m!r}")
            src = src.replace(old, new)
    return src


def main(nb_path: str) -> None:
    import scipy
    import skimage
    import torchvision
    from torchvision import transforms

    sources = cells(Path(nb_path))
    utils_src = Path(nb_path).with_name("utils.py")
    g = torch.Generator().manual_seed(SEED)
    gts = torch.rand(N, 3, SIZE, SIZE, generator=g)
    recons = (0.15 * gts + 0.85 * torch.rand(N, 3, SIZE, SIZE, generator=g)).clamp(0, 1)
    ret_image = torch.randn(N_RET, 2, RET_DIM // 2, generator=g)
    ret_brain = ret_image + 4.0 * torch.randn(N_RET, 2, RET_DIM // 2, generator=g)

    ns = {"np": np, "torch": torch, "transforms": transforms, "device": "cpu", "nn": torch.nn,
          "tqdm": lambda x, **_: x, "all_images": gts.clone(), "all_recons": recons.clone()}
    exec(cell_with(sources, "def two_way_identification"), ns)
    expected: dict[str, torch.Tensor] = {}
    exec(cell_with(sources, "pixcorr = corrmean"), ns)
    expected["pixcorr"] = torch.tensor(float(ns["pixcorr"]), dtype=torch.float64)
    exec(cell_with(sources, "structural_similarity"), ns)
    expected["ssim"] = torch.tensor(float(ns["ssim"]), dtype=torch.float64)
    for _key, marker, seed in (("alexnet", "alexnet(weights=alex_weights)", SEEDS["alexnet"]),
                              ("inception", "inception_v3(weights=weights)", SEEDS["inception"]),
                              ("effnet", "efficientnet_b1(weights=weights)", SEEDS["effnet"]),
                              ("swav", "facebookresearch/swav", SEEDS["swav"])):
        torch.manual_seed(seed)
        with torch.no_grad():
            exec(cell_with(sources, marker), ns)
    for key in ("alexnet2", "alexnet5", "inception", "effnet", "swav"):
        expected[key] = torch.tensor(float(ns[key]), dtype=torch.float64)
    # CLIP: the cell's preprocessing and scoring, the network replaced by the identity
    clip_src = cell_with(sources, 'clip.load("ViT-L/14"')
    clip_src = clip_src.replace("import clip\n", "").replace(
        'clip_model, preprocess = clip.load("ViT-L/14", device=device)',
        "clip_model = types.SimpleNamespace(encode_image=lambda x: x)")
    ns2 = {**ns, "types": types}
    exec(clip_src, ns2)
    expected["clip_preprocess_identity"] = torch.tensor(float(ns2["clip_"]), dtype=torch.float64)

    # retrieval: utils.py's batchwise_cosine_similarity and topk, executed from the released file
    utils_ns: dict = {"torch": torch, "np": np, "nn": torch.nn}
    import ast
    tree = ast.parse(utils_src.read_text())
    wanted = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in ("batchwise_cosine_similarity", "topk")]
    exec(compile(ast.Module(body=wanted, type_ignores=[]), str(utils_src), "exec"), utils_ns)
    rns = {**ns, "utils": types.SimpleNamespace(**{k: utils_ns[k] for k in ("batchwise_cosine_similarity", "topk")}),
           "all_images": ret_image.clone(), "all_clipvoxels": ret_brain.clone(),
           "clip_img_embedder": lambda x: x}
    np.random.seed(RET_SEED)
    exec(cell_with(sources, "percent_correct_fwds, percent_correct_bwds = [], []"), rns)
    expected["retrieval/fwd_subsets"] = torch.tensor(np.asarray(rns["percent_correct_fwds"]), dtype=torch.float64)
    expected["retrieval/bwd_subsets"] = torch.tensor(np.asarray(rns["percent_correct_bwds"]), dtype=torch.float64)
    expected["retrieval/fwd_mean"] = torch.tensor(float(rns["percent_correct_fwd"]), dtype=torch.float64)
    expected["retrieval/bwd_mean"] = torch.tensor(float(rns["percent_correct_bwd"]), dtype=torch.float64)
    expected["retrieval/fwd_ci"] = torch.tensor(rns["fwd_ci"], dtype=torch.float64)
    expected["retrieval/bwd_ci"] = torch.tensor(rns["bwd_ci"], dtype=torch.float64)

    from safetensors.torch import save_file

    OUT.mkdir(parents=True, exist_ok=True)
    inputs = {"gts": gts, "recons": recons, "retrieval/image": ret_image, "retrieval/brain": ret_brain}
    save_file(inputs, OUT / "inputs.safetensors")
    save_file(expected, OUT / "expected.safetensors")
    save_file({"none": torch.zeros(1)}, OUT / "weights.safetensors")
    commit = "unknown"
    (OUT / "provenance.json").write_text(json.dumps({
        "repo": "https://github.com/MedARC-AI/MindEyeV2", "file": "src/final_evaluations.ipynb (+ src/utils.py)",
        "commit": sys.argv[2] if len(sys.argv) > 2 else commit,
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__,
                     "scikit-image": skimage.__version__, "numpy": np.__version__, "scipy": scipy.__version__},
        "seeds": {"images": SEED, "retrieval_subsets": RET_SEED, **SEEDS},
        "substitutions": SUBSTITUTIONS,
        "weights": "none stored: network columns draw random weights under torch.manual_seed(seeds[column])",
        "command": "python tests/fidelity/reference/make_metrics.py <MindEyeV2>/src/final_evaluations.ipynb <commit>",
    }, indent=1) + "\n")
    for k, v in expected.items():
        print(k, v.tolist())


if __name__ == "__main__":
    main(sys.argv[1])
