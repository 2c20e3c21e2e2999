"""Golden values for Brain-IT's voxel clustering (V2C, stage 0) and new-subject mapping, from the
authors' two released scripts run unmodified at a tiny scale.

Run OUTSIDE the project's environment (the scripts need only torch, numpy and scikit-learn, which
the venv inherits), with the authors' checkout extracted somewhere outside the project::

    python -m venv --system-site-packages /work/refenv-bitclust
    git --git-dir=<mirror>/WeizmannVision+brainit-fmri/repo archive HEAD data/scripts | tar -x -C /work/ref/brainit
    OMP_NUM_THREADS=1 PYTHONPATH=$PWD /work/refenv-bitclust/bin/python \
        tests/fidelity/reference/make_brainit_clusters.py /work/ref/brainit

The script reads ``data/scripts/get_clusters.py`` and ``data/scripts/transfer/map_clusters_transfer.py``
as text and executes them (none of their code is stored here) in a temporary working directory that
holds the files they read. Only their I/O and the two choices a tiny, reproducible run needs are
replaced:

- ``torch.hub.load`` (their DINOv2 download; its result is never used) returns a placeholder;
- ``torch.load`` of their encoder checkpoints returns a module whose ``voxel_embed`` is a fixed
  tiny embedding: the three reference subjects' voxels concatenated for ``encoder_ch128.pth`` (the
  clustering) and ``encoder_base.pth`` (the transfer's reference), the new subject's for
  ``encoder_transfer_sub.pth``. The transfer script runs twice: for a new subject drawn like the
  references, and for a "ties" subject whose voxels sit halfway between two reference voxels of
  different clusters (the nearest one is decided at ~1e-10, which their float64 search resolves
  and a float32 one does not: it moves 8 of the 24);
- ``sklearn.mixture.GaussianMixture`` is the real class with ``random_state=0`` added (the released
  call passes none, so every run of theirs clusters differently);
- the literal ``centers_num = 128`` (once in each script) is replaced by ``centers_num = K`` as the
  source text is executed: 128 mixture components need thousands of voxels to be well posed.

``data/nsd_data/num_voxels_all_subjects.npy`` (per-subject voxel counts, read by get_clusters.py
but unused for its outputs) is written into the working directory; the clustering file it saves,
``data/derived_data/gmm_centers_<K>.npz``, is copied to ``gmm_centers_128_v2.npz``, the name the
transfer script reads (the release saves one name and reads the other). The fixture keeps what
they save (labels, centers, the V2C mapping; per transferred subject its mapping and ``nn_vox``)
and, from their namespaces, the normalised embeddings and the transfer's inherited labels.

Re-running writes the same bytes. Under scikit-learn 1.7.0, the release's ``env.yml`` pin (a second
venv with ``pip install --no-deps scikit-learn==1.7.0``), ``inputs`` and ``expected`` come out
byte-identical to those under 1.9.1 (the provenance differs only in the version it records).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import sklearn
import sklearn.mixture
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers next to this script
from released import mirror_commit  # noqa: E402

MIRROR = "/work/.mirror/WeizmannVision+brainit-fmri/repo"
OUT = Path(__file__).resolve().parents[1] / "golden" / "brainit_clusters"
CLUSTER_SCRIPT = "data/scripts/get_clusters.py"
TRANSFER_SCRIPT = "data/scripts/transfer/map_clusters_transfer.py"
SUBJECTS = {"s1": 40, "s2": 50, "s3": 60}  # reference subjects (voxels each)
NEW_SUBJECT, NEW_VOXELS = "new", 30
TIE_SUBJECT, TIE_VOXELS = "ties", 24  # voxels halfway between two reference voxels of different clusters
EMBED_DIM, GROUPS, K = 8, 6, 6  # embedding width, true voxel groups, mixture components
NOISE, SEED, GMM_SEED = 0.25, 0, 0
HARD_CODED_K = "centers_num = 128"


def make_ties(reference: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``(TIE_VOXELS, EMBED_DIM)`` float32 voxels at the normalised midpoint of a reference voxel and
    its nearest reference voxel of another cluster, at random norms: both are (almost) equally
    near, and only the float32 rounding of these inputs decides which one is nearer, by a margin
    float64 resolves and float32 arithmetic does not."""
    rng = np.random.default_rng(SEED + 1)
    unit = reference / np.linalg.norm(reference.astype(np.float64), axis=1, keepdims=True)
    out = []
    for a in rng.choice(len(reference), TIE_VOXELS, replace=False):
        d = ((unit - unit[a]) ** 2).sum(1)
        d[labels == labels[a]] = np.inf
        mid = unit[a] + unit[int(d.argmin())]
        out.append(mid / np.linalg.norm(mid) * rng.uniform(0.5, 2.0))
    return np.stack(out).astype(np.float32)


def make_embeddings() -> dict[str, np.ndarray]:
    """Voxels around ``GROUPS`` shared directions with noise and random norms (so only the direction
    identifies the group, and the normalisation matters): subject -> ``(V_s, EMBED_DIM)`` float32."""
    rng = np.random.default_rng(SEED)
    dirs = rng.standard_normal((GROUPS, EMBED_DIM))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    out = {}
    for s, n in {**SUBJECTS, NEW_SUBJECT: NEW_VOXELS}.items():
        group = rng.integers(0, GROUPS, n)
        x = (dirs[group] + NOISE * rng.standard_normal((n, EMBED_DIM))) * rng.uniform(0.3, 3.0, (n, 1))
        out[s] = x.astype(np.float32)
    return out


class _Encoder(torch.nn.Module):
    """What their scripts use of a saved encoder: ``.eval()`` and ``.voxel_embed`` ``(V, e)``."""

    def __init__(self, voxel_embed: np.ndarray) -> None:
        super().__init__()
        self.voxel_embed = torch.nn.Parameter(torch.from_numpy(voxel_embed.copy()))


def _seeded_gmm(real):
    def gaussian_mixture(*args, **kwargs):
        if "random_state" in kwargs:
            raise RuntimeError("the released script now sets random_state; drop the override")
        return real(*args, random_state=GMM_SEED, **kwargs)
    return gaussian_mixture


def run_released(repo: Path, script: str, encoders: dict[str, np.ndarray]) -> dict:
    """Execute the released ``script`` (source text, ``centers_num`` set to ``K``) in the current
    working directory with ``torch.load``/``torch.hub.load`` and the mixture's seed stubbed;
    returns the namespace it leaves."""
    source = (repo / script).read_text()
    if source.count(HARD_CODED_K) != 1:
        raise RuntimeError(f"{script}: expected the literal {HARD_CODED_K!r} exactly once")
    source = source.replace(HARD_CODED_K, f"centers_num = {K}")

    def load(path, *args, **kwargs):
        if path not in encoders:
            raise FileNotFoundError(f"{script} loads {path!r}; the stub serves {sorted(encoders)}")
        return _Encoder(encoders[path])

    namespace = {"__name__": "__main__", "__file__": str(repo / script)}
    with contextlib.ExitStack() as stack:
        stack.enter_context(_patch(torch, "load", load))
        stack.enter_context(_patch(torch.hub, "load", lambda *a, **k: object()))
        stack.enter_context(_patch(sklearn.mixture, "GaussianMixture", _seeded_gmm(sklearn.mixture.GaussianMixture)))
        exec(compile(source, str(repo / script), "exec"), namespace)  # noqa: S102
    return namespace


@contextlib.contextmanager
def _patch(obj, name: str, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def main(their_repo: str) -> None:
    repo = Path(their_repo).resolve()
    emb = make_embeddings()
    reference = np.concatenate([emb[s] for s in SUBJECTS])
    cwd, env_before = os.getcwd(), dict(os.environ)
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        try:
            os.makedirs("data/nsd_data")
            counts = np.array(list(SUBJECTS.values()))
            np.save("data/nsd_data/num_voxels_all_subjects.npy", np.stack([counts // 2, counts - counts // 2], 1))
            ns_c = run_released(repo, CLUSTER_SCRIPT, {"results/saved_models/encoder_ch128.pth": reference})
            saved = np.load(f"data/derived_data/gmm_centers_{K}.npz")
            labels, centers = saved["labels"], saved["centers"]
            mapping = np.load(f"data/derived_data/v2c_{K}_mapping_gmm.npy")
            shutil.copy(f"data/derived_data/gmm_centers_{K}.npz", "data/derived_data/gmm_centers_128_v2.npz")
            emb[TIE_SUBJECT] = make_ties(reference, labels)
            transfers = {}
            for s in (NEW_SUBJECT, TIE_SUBJECT):
                ns_t = run_released(repo, TRANSFER_SCRIPT, {
                    "results/saved_models/encoder_transfer_sub.pth": emb[s],
                    "results/saved_models/encoder_base.pth": reference})
                transfers[s] = (ns_t, np.load("data/transfer/v2c_128_mapping_gmm_transfer_sub.npy"),
                                np.load("data/transfer/v2c_transfer_sub_nnvox.npy"))
        finally:
            os.chdir(cwd)
            os.environ.clear()  # their scripts set CUDA_VISIBLE_DEVICES
            os.environ.update(env_before)

    print(f"clusters: sizes {np.bincount(labels, minlength=K).tolist()}, GMM converged "
          f"{ns_c['gmm'].converged_} in {ns_c['gmm'].n_iter_} iterations; means dtype {centers.dtype}")
    for s, (ns_t, _, nn_vox) in transfers.items():
        assert np.array_equal(ns_t["label_vox"], labels[nn_vox])
        dist = ns_t["dis_l2"].numpy()  # (reference, new) distances of the transfer
        two = np.sort(dist, axis=0)[:2]
        # the same search in float32 (for the record: how many voxels float32 arithmetic moves)
        d32 = torch.cdist(torch.from_numpy(ns_t["vox_embed_ref_normalized"].astype(np.float32)),
                          torch.from_numpy(ns_t["vox_embed_normalized"].astype(np.float32)))
        moved = int((d32.argmin(0).numpy() != nn_vox).sum())
        print(f"transfer {s}: normalised dtype {ns_t['vox_embed_normalized'].dtype}, distances {dist.dtype}; "
              f"gap nearest vs second nearest min {float((two[1] - two[0]).min()):.3g}; "
              f"a float32 search moves {moved}/{len(nn_vox)} voxels")
        assert (two[1] - two[0]).min() > 1e-12  # far above float64 rounding: any float64 search agrees

    def t(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x))

    inputs = {f"embeddings/{s}": t(emb[s]) for s in emb}
    expected = {
        "clusters/normalized": t(ns_c["vox_embed_normalized"]),  # float32 (sklearn normalize of float32)
        "clusters/labels": t(labels.astype(np.int64)),
        "clusters/centers": t(centers),
        "clusters/mapping": t(mapping.astype(np.int64)),
    }
    for s, part in ((NEW_SUBJECT, "transfer"), (TIE_SUBJECT, "ties")):
        ns_t, t_mapping, nn_vox = transfers[s]
        expected.update({
            f"{part}/normalized": t(ns_t["vox_embed_normalized"]),  # float64 (sklearn normalize of a torch tensor)
            f"{part}/labels": t(ns_t["label_vox"].astype(np.int64)),
            f"{part}/mapping": t(t_mapping.astype(np.int64)),
            f"{part}/nn_vox": t(nn_vox.astype(np.int64)),
        })
    OUT.mkdir(parents=True, exist_ok=True)
    save_file({}, str(OUT / "weights.safetensors"))  # the clustering has no weights
    save_file(inputs, str(OUT / "inputs.safetensors"))
    save_file(expected, str(OUT / "expected.safetensors"))
    prov = {
        "repository": "https://github.com/WeizmannVision/brainit-fmri",
        "commit": mirror_commit(MIRROR),
        "files": [CLUSTER_SCRIPT, TRANSFER_SCRIPT],
        "executed_as": "source text, unmodified except 'centers_num = 128' -> 'centers_num = K' (both scripts)",
        "stubs": {
            "torch.hub.load": "placeholder (DINOv2 download, unused)",
            "torch.load": "module with voxel_embed: encoder_ch128.pth and encoder_base.pth = reference subjects "
                          "concatenated (s1, s2, s3), encoder_transfer_sub.pth = the new subject (first run) or "
                          "the near-tie subject (second run)",
            "sklearn.mixture.GaussianMixture": f"real class, random_state={GMM_SEED} added (released: none)",
            "files": "data/nsd_data/num_voxels_all_subjects.npy written; gmm_centers_<K>.npz copied to "
                     "gmm_centers_128_v2.npz (the name the transfer script reads)",
        },
        "packages": {"scikit-learn": sklearn.__version__, "torch": torch.__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
        "threads": {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "torch": torch.get_num_threads()},
        "dtype": "embeddings float32; clustering float32 (means_ as sklearn returns them); transfer float64",
        "command": "OMP_NUM_THREADS=1 PYTHONPATH=$PWD /work/refenv-bitclust/bin/python "
                   "tests/fidelity/reference/make_brainit_clusters.py /work/ref/brainit",
        "config": {"subjects": SUBJECTS, "new_subject": {NEW_SUBJECT: NEW_VOXELS},
                   "tie_subject": {TIE_SUBJECT: TIE_VOXELS}, "embed_dim": EMBED_DIM,
                   "groups": GROUPS, "noise": NOISE, "data_seed": SEED, "clusters": K, "gmm_seed": GMM_SEED},
    }
    (OUT / "provenance.json").write_text(json.dumps(prov, indent=2) + "\n")
    print("wrote", OUT)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/work/ref/brainit")
