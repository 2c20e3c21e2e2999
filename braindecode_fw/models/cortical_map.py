"""fMRI responses as a 2-D cortical image per subject (NeuroPictor's input, docs/methods/neuropictor.md §1).

NeuroPictor feeds its ViT a ``(1, 256, 256)`` image of the visual cortex: fsLR flat maps (360-ROI
HCP-MMP surfaces), the visual-cortex bounding box resized to 256² and every pixel outside the
visual-cortex mask set to zero. How its surfaces were projected to the plane is **[unverified]**
(docs/methods/neuropictor.md §1), and prepared stores hold *volumetric* voxels (NSD's func1pt8mm betas, the synthetic
world), so this module offers:

- :func:`coordinates_from_geometry`: a documented **substitute** flattening of volumetric voxels
  ``(V, 3)`` (see :func:`flatten_volume`), or, for ``(V, 2)`` input, any flat-map coordinates the user
  has (e.g. each voxel's position on a pycortex / fsLR flatmap), normalised onto the map;
- :class:`CorticalProjection`: per-subject buffers mapping each voxel to one pixel; responses are
  scattered into the map (mean of the voxels landing on one pixel), pixels outside the subject's mask
  are zero, and the mask comes along.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from braindecode_fw.errors import ConfigError, UnknownNameError

# ---------------------------------------------------------------------------------------------
# Coordinates


def _ras_axes(voxel_ijk: np.ndarray, affine: np.ndarray | None) -> np.ndarray:
    """``(V, 3)`` voxel indices -> ``(V, 3)`` coordinates in voxel units along (right, anterior,
    superior). With an affine, each voxel axis is assigned to the world axis it mostly follows (with its
    sign); without one, the voxel axes are taken as (left-right, posterior-anterior,
    inferior-superior) as the synthetic world writes them."""
    ijk = np.asarray(voxel_ijk, dtype=np.float64)
    if affine is None:
        return ijk
    rot = np.asarray(affine, dtype=np.float64)[:3, :3]
    world_axis = np.abs(rot).argmax(0)  # world axis of each voxel axis
    if sorted(world_axis.tolist()) != [0, 1, 2]:
        raise ConfigError(f"affine: its voxel axes do not map to distinct world axes ({affine.tolist()})")
    out = np.empty_like(ijk)
    for axis in range(3):
        out[:, world_axis[axis]] = ijk[:, axis] * np.sign(rot[world_axis[axis], axis])
    return out


def flatten_volume(voxel_ijk: np.ndarray, affine: np.ndarray | None = None, midline: float | None = None,
                   gap: float = 0.02) -> np.ndarray:
    """A substitute flat map for volumetric voxels: ``(V, 3)`` indices -> ``(V, 2)`` ``(x, y)`` in
    ``[0, 1]²`` (x rightward, y upward; **not** NeuroPictor's fsLR flat map, docs/methods/neuropictor.md §1).

    The left-right axis is unrolled into two halves: voxels left of ``midline`` (in the RAS-oriented
    left-right voxel coordinate; default the middle of the voxels' left-right extent, i.e. the brain's
    midline for a bilateral mask) go to the left half ``x < 0.5``, the others to the right half
    ``x > 0.5``, ``gap`` apart. Each half is the projection of its hemisphere onto the
    (posterior-anterior, inferior-superior) plane, mirrored so that the occipital poles meet in the
    middle and anterior points outwards (as on flat maps, where early visual cortex sits by the
    midline): ``x = (0.5 - gap/2)·(1 - a)`` on the left, ``0.5 + gap/2 + (0.5 - gap/2)·a`` on the right,
    ``y = s``, with ``a``, ``s`` the posterior-anterior and inferior-superior positions min-max scaled
    over all voxels. The medial-lateral depth within a hemisphere is dropped: voxels sharing a
    (posterior-anterior, inferior-superior) position share a point.
    """
    ras = _ras_axes(voxel_ijk, affine)
    if ras.ndim != 2 or ras.shape[1] != 3 or len(ras) == 0:
        raise ConfigError(f"voxel_ijk: expected (V >= 1, 3) voxel indices, got shape {np.shape(voxel_ijk)}")
    lr, ap, si = ras.T
    if midline is None:
        midline = (lr.min() + lr.max()) / 2
    a = (ap - ap.min()) / max(np.ptp(ap), 1e-12)
    s = (si - si.min()) / max(np.ptp(si), 1e-12)
    half = 0.5 - gap / 2
    x = np.where(lr < midline, half * (1 - a), 1 - half + half * a)
    return np.stack([x, s], axis=1)


def normalise_flat_coordinates(coords: np.ndarray) -> np.ndarray:
    """``(V, 2)`` flat-map ``(x, y)`` coordinates (any units) -> ``[0, 1]²``, each axis min-max scaled
    independently (NeuroPictor resizes the visual-cortex bounding box to a square, docs/methods/neuropictor.md §1)."""
    c = np.asarray(coords, dtype=np.float64)
    lo, span = c.min(0), np.maximum(np.ptp(c, axis=0), 1e-12)
    return (c - lo) / span


def coordinates_from_geometry(coordinates: np.ndarray, size: int | tuple[int, int] = 256, *, margin: int | None = None,
                              affine: np.ndarray | None = None, midline: float | None = None) -> np.ndarray:
    """Each voxel's ``(row, col)`` pixel on an ``H×W`` map, ``(V, 3)`` or ``(V, 2)`` -> ``(V, 2)`` int64.

    ``(V, 3)``: volumetric voxel indices (a store's ``geometry.npz`` ``voxel_ijk``, with its
    ``affine``), flattened by :func:`flatten_volume` (left hemisphere on the left half, right on the
    right) -- a substitute for NeuroPictor's fsLR flat maps, whose projection is **[unverified]**
    (docs/methods/neuropictor.md §1). ``(V, 2)``: flat-map ``(x, y)`` coordinates (x rightward, y upward), e.g. each
    voxel's position on a surface flatmap, min-max scaled per axis (:func:`normalise_flat_coordinates`).
    Points land in the map inside a ``margin``-pixel border (default ``H // 32``: 8 px at 256²);
    upward ``y`` is the top of the image (row 0).
    """
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    c = np.asarray(coordinates)
    if c.ndim != 2 or c.shape[1] not in (2, 3) or len(c) == 0:
        raise ConfigError(f"coordinates: expected (V, 3) voxel indices or (V, 2) flat-map coordinates, got shape "
                         f"{c.shape}")
    margin = max(min(h, w) // 32, 0) if margin is None else int(margin)
    if 2 * margin >= min(h, w):
        raise ConfigError(f"margin: {margin} px leaves no room on a {h}×{w} map")
    xy = flatten_volume(c, affine, midline) if c.shape[1] == 3 else normalise_flat_coordinates(c)
    col = margin + xy[:, 0] * (w - 1 - 2 * margin)
    row = margin + (1 - xy[:, 1]) * (h - 1 - 2 * margin)
    return np.stack([np.rint(row), np.rint(col)], axis=1).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Projection


class CorticalProjection(nn.Module):
    """Responses -> per-subject cortical images, ``(B, F_max)`` -> ``(B, 1, H, W)``.

    Buffers (in the state dict, so a checkpoint carries each subject's layout), for ``S`` subjects:
    ``pixel_index`` ``(S, F_max)`` the flat pixel of each voxel (``-1``: padding, or not configured),
    ``inv_count`` ``(S, H·W)`` one over the number of voxels on each pixel (0 outside the mask),
    ``fill_from`` ``(S, H·W)`` the occupied pixel each pixel copies (itself when occupied; the nearest
    occupied pixel within ``fill_radius`` pixels otherwise, so a map larger than the voxel grid has no
    holes inside the cortex, like NeuroPictor's bilinear resize; 0 = none), ``mask`` ``(S, H, W)`` and
    ``configured`` ``(S,)``.

    Rows are routed by subject; a row's responses beyond its subject's voxel count are ignored (the
    datamodule zero-pads them). A pixel's value is the mean of the voxels on it; pixels outside the
    mask are exactly zero.
    """

    def __init__(self, n_features: Mapping[str, int], size: int | tuple[int, int] = 256, fill_radius: float = 0.0):
        super().__init__()
        if not n_features:
            raise ConfigError("CorticalProjection: no subjects (n_features is empty)")
        self.n_features = {str(s): int(n) for s, n in n_features.items()}
        self.subjects = list(self.n_features)
        self._index = {s: i for i, s in enumerate(self.subjects)}
        self.size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        self.fill_radius = float(fill_radius)
        n_s, f_max, n_pix = len(self.subjects), max(self.n_features.values()), self.size[0] * self.size[1]
        self.register_buffer("pixel_index", torch.full((n_s, f_max), -1, dtype=torch.long))
        self.register_buffer("inv_count", torch.zeros(n_s, n_pix))
        self.register_buffer("fill_from", torch.arange(n_pix).repeat(n_s, 1))
        self.register_buffer("mask", torch.zeros(n_s, *self.size, dtype=torch.bool))
        self.register_buffer("configured", torch.zeros(n_s, dtype=torch.bool))

    def subject_index(self, subjects: Sequence[str], device: torch.device | None = None) -> torch.Tensor:
        try:
            return torch.tensor([self._index[s] for s in subjects], device=device, dtype=torch.long)
        except KeyError as e:
            raise UnknownNameError(f"CorticalProjection: unknown subject {e.args[0]!r}; the model knows {self.subjects}") from None

    def is_configured(self, subject: str) -> bool:
        return bool(self.configured[self._index[subject]])

    def set_pixels(self, subject: str, pixels: np.ndarray | torch.Tensor) -> None:
        """One subject's ``(V, 2)`` integer ``(row, col)`` pixels (:func:`coordinates_from_geometry`)."""
        if subject not in self._index:
            raise UnknownNameError(f"CorticalProjection: unknown subject {subject!r}; the model knows {self.subjects}")
        px = torch.as_tensor(np.asarray(pixels), dtype=torch.long).cpu()
        h, w = self.size
        n = self.n_features[subject]
        if px.shape != (n, 2):
            raise ConfigError(f"{subject}: pixels must be ({n}, 2) (row, col), one per voxel; got {tuple(px.shape)}")
        if px.min() < 0 or (px[:, 0] >= h).any() or (px[:, 1] >= w).any():
            raise ConfigError(f"{subject}: pixels outside the {h}×{w} map")
        i = self._index[subject]
        flat = px[:, 0] * w + px[:, 1]
        count = torch.bincount(flat, minlength=h * w).float()
        occupied = count > 0
        fill = torch.arange(h * w)
        covered = occupied.clone()
        if self.fill_radius > 0:
            from scipy.ndimage import distance_transform_edt

            dist, (rr, cc) = distance_transform_edt(~occupied.view(h, w).numpy(), return_indices=True)
            near = torch.from_numpy(dist <= self.fill_radius).flatten()
            fill = torch.where(near, torch.from_numpy(rr * w + cc).flatten().long(), fill)
            covered = near
        self.pixel_index[i] = -1
        self.pixel_index[i, :n] = flat.to(self.pixel_index.device)
        self.inv_count[i] = torch.where(occupied, 1.0 / count.clamp(min=1), 0.0).to(self.inv_count)
        self.fill_from[i] = fill.to(self.fill_from.device)
        self.mask[i] = covered.view(h, w).to(self.mask.device)
        self.configured[i] = True

    def set_coordinates(self, subject: str, coordinates: np.ndarray, **kwargs) -> None:
        """:func:`coordinates_from_geometry` (``(V, 3)`` voxel indices or ``(V, 2)`` flat coordinates;
        ``kwargs``: ``margin``, ``affine``, ``midline``) then :meth:`set_pixels`."""
        self.set_pixels(subject, coordinates_from_geometry(coordinates, self.size, **kwargs))

    def forward(self, responses: torch.Tensor, subjects: Sequence[str]) -> torch.Tensor:
        """``(B, F)`` (``F`` ≤ ``F_max``) -> ``(B, 1, H, W)``."""
        if responses.ndim != 2:
            raise ConfigError(f"CorticalProjection: expected (B, voxels) responses, got {tuple(responses.shape)}")
        idx = self.subject_index(subjects, responses.device)
        if not bool(self.configured[idx].all()):
            missing = sorted({s for s in subjects if not self.is_configured(s)})
            raise RuntimeError(f"CorticalProjection: no voxel layout for {missing}; call configure_from_data (or "
                               f"set_coordinates) first")
        f = responses.shape[1]
        if f > self.pixel_index.shape[1]:
            raise ConfigError(f"CorticalProjection: {f} voxels per row, the largest subject has {self.pixel_index.shape[1]}")
        pix = self.pixel_index[idx, :f]
        valid = pix >= 0
        x = torch.where(valid, responses, torch.zeros((), dtype=responses.dtype, device=responses.device))
        h, w = self.size
        flat = responses.new_zeros(len(responses), h * w).scatter_add(1, pix.clamp(min=0), x)
        flat = flat * self.inv_count[idx].to(flat.dtype)
        flat = flat.gather(1, self.fill_from[idx]) * self.mask[idx].flatten(1).to(flat.dtype)
        return flat.view(len(responses), 1, h, w)

    def sample(self, maps: torch.Tensor, subjects: Sequence[str]) -> torch.Tensor:
        """The inverse read-out: each voxel's pixel of ``(B, 1, H, W)`` maps -> ``(B, F_max)`` (padding 0)."""
        idx = self.subject_index(subjects, maps.device)
        pix = self.pixel_index[idx]
        values = maps.flatten(1).gather(1, pix.clamp(min=0))
        return torch.where(pix >= 0, values, torch.zeros((), dtype=values.dtype, device=values.device))
