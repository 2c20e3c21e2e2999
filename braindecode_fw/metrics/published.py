"""Published NSD reconstruction numbers (docs/evaluation.md) for side-by-side comparison tables.

Values are means over subjects 1, 2, 5, 7 as reported (fractions, not percentages); ``None`` where
a paper gives no number. ``test_set`` names the test convention (docs/evaluation.md): numbers from
different test sets are not strictly comparable, so a comparison is only printed against rows whose
test set matches the evaluated one. ``source`` carries the provenance caveats (docs/evaluation.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from braindecode_fw.errors import ConfigError

TEST_SETS = {
    "nsd_new_1000": "NSD shared1000, all 40 sessions (1,000 images × 3 repetitions)",
    "nsd_old_982": "NSD MindEye1/Brain-Diffuser split (982 images for subj01)",
    "nsd_shared_1257": "NeuroPictor's sub1257 shared list (count unverified)",
}


def check_test_set(name: str | None, key: str = "test_set") -> None:
    """A test set named in the config must be one of :data:`TEST_SETS`: a misspelt name would
    silently drop the published comparison rows. ``None`` (use the store's ``provenance.test_set``)
    is always fine."""
    if name is not None and name not in TEST_SETS:
        raise ConfigError(f"{key}: {name!r} is not a test set with published results (known: "
                          f"{', '.join(TEST_SETS)}); leave it null to use the store's own provenance.test_set")


@dataclass(frozen=True)
class PublishedRow:
    method: str
    test_set: str
    values: dict[str, float | None]
    source: str


def _row(method: str, test_set: str, source: str, *vals: float | None) -> PublishedRow:
    keys = ("pixcorr", "ssim", "alexnet2", "alexnet5", "inception", "clip", "effnet", "swav",
            "image_retrieval", "brain_retrieval")
    return PublishedRow(method, test_set, dict(zip(keys, vals, strict=True)), source)


PUBLISHED: tuple[PublishedRow, ...] = (
    _row("MindEye2, 40 sessions", "nsd_new_1000", "ME2 Table 1 via secondary notes",
         0.322, 0.431, 0.961, 0.986, 0.954, 0.930, 0.619, 0.344, 0.988, 0.983),
    _row("MindEye2, 1 hour", "nsd_new_1000", "secondary notes; EffNet/SwAV unverified",
         0.195, 0.419, 0.842, 0.906, 0.812, 0.792, 0.810, 0.468, 0.790, 0.574),
    _row("Brain-IT, 40 h", "nsd_new_1000", "Brain-IT Table 1 via a paper note",
         0.386, 0.486, 0.984, 0.995, 0.973, 0.964, 0.564, 0.320, None, None),
    _row("Brain-IT, 1 h (transfer)", "nsd_new_1000", "paper note; 3 metrics only",
         0.331, 0.473, 0.971, None, None, None, None, None, None, None),
    _row("MindTuner, 40 h", "nsd_new_1000", "secondary", 0.322, 0.421, 0.958, 0.988, 0.956, 0.938, 0.612, 0.340,
         None, None),
    _row("MindTuner, 1 h", "nsd_new_1000", "secondary", 0.224, 0.420, 0.878, None, None, None, None, None, None, None),
    _row("MindBridge (one model, 4 subjects)", "nsd_old_982",
         "two paper notes; Alex(2) unverified; best-of-8 selected by GT similarity",
         0.151, 0.263, 0.877, 0.955, 0.924, 0.947, 0.712, 0.418, None, None),
    _row("NeuroPictor", "nsd_shared_1257", "unverified (recalled)", 0.229, 0.375, 0.965, 0.984, 0.945, 0.933,
         0.639, 0.350, None, None),
)


def published_rows(test_set: str | None) -> list[PublishedRow]:
    """Rows reported on ``test_set`` (none for an unknown or synthetic test set)."""
    return [r for r in PUBLISHED if test_set is not None and r.test_set == test_set]
