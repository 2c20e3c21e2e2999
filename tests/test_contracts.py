"""The contract module (braindecode_fw/contracts.py): one definition per convention, old names kept,
and the layering it exists for (targets/ never imports data/; the contracts import nothing heavy)."""

import ast
import subprocess
import sys
from pathlib import Path

import braindecode_fw
from braindecode_fw import contracts

PACKAGE = Path(braindecode_fw.__file__).parent


def test_old_names_are_the_contract_constants():
    from braindecode_fw import losses, objectives
    from braindecode_fw.data import datamodule
    from braindecode_fw.models import meg, neuropictor

    assert datamodule.Batch is contracts.Batch
    assert objectives.AUX_PREFIX == contracts.AUX_LOSS_PREFIX == "loss/"
    assert meg.REGRESSION_PREFIX == contracts.REGRESSION_PREFIX == "regression/"
    assert neuropictor.CONTROL_OUTPUT == contracts.CONTROL_MAP and neuropictor.MAIN_SUFFIX == contracts.MAIN_SUFFIX
    assert meg.ClipMSELoss is losses.ClipMSELoss


def test_key_helpers():
    assert contracts.aux_loss_key("prior") == "loss/prior" and contracts.is_aux_loss("loss/prior")
    assert not contracts.is_aux_loss("clip_image") and contracts.regression_key("clip") == "regression/clip"
    assert contracts.backbone_key("clip_image_tokens") == "clip_image_tokens/backbone"


def test_contracts_import_neither_torch_nor_the_package():
    code = "import sys, braindecode_fw.contracts; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'lightning', 'numpy') or m.startswith('braindecode_fw.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "['braindecode_fw.contracts', 'braindecode_fw.errors']"  # errors.py is plain Python too


def _imports(path: Path) -> set[str]:
    """Every ``braindecode_fw`` module ``path`` imports, at module or function level."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m.startswith("braindecode_fw")}


def test_targets_do_not_import_data():
    """data/datamodule.py imports targets/; the other direction goes through contracts.StimulusStore."""
    offenders = {str(p.relative_to(PACKAGE)): sorted(m for m in _imports(p) if m.startswith("braindecode_fw.data"))
                 for p in (PACKAGE / "targets").rglob("*.py")}
    assert not {p: m for p, m in offenders.items() if m}
