"""Translate the originals' own YAML files into our flags, per script.

Recognised (by their shape, see `detect_original`):
  rae-stage1       RAE `configs/stage1/{training,pretrained}/*.yaml`     -> train_stage1.py (--tokenizer rae)
  rae-stage2       RAE `configs/stage2/{training,sampling}/**/*.yaml`    -> train_ldm_only.py, generate.py
  lightningdit     LightningDiT `configs/*.yaml`                         -> train_ldm_only.py, generate.py
  ldm-autoencoder  VA-VAE `vavae/configs/*.yaml` (LDM style)             -> train_stage1.py (vavae; kl without use_vf)
  taming-vqgan     taming-transformers `configs/*_vqgan.yaml`            -> train_stage1.py (--tokenizer vqgan)

Every leaf key of the file is accounted for, or the file is refused with the keys named:
  * mapped onto a flag of the script (`flag`): its value becomes that flag's default;
  * fixed (`fixed`): a setting of which we implement exactly one value (e.g. `prediction:
    velocity`); that value is accepted, any other is refused with the reason;
  * no effect on THIS script (`unused`): e.g. the training section of a config given to
    generate.py, or Lightning's checkpoint `monitor`; listed in one notice.
Values the original counts in epochs (RAE's checkpoint interval and LR schedule) are kept in
epochs (`ConfigTranslation.epochs`) and turned into steps by the trainer once it knows the
epoch length (`utils.apply_config_epochs`). Relative paths are resolved against the working
directory, else against the folders above the YAML file (the original repository's root), as the
original scripts would find them when run from that root. Explicit flags always win: a value the
file gives is only a default, and `yields` drops a derived default (e.g. the file's model config)
when the user names the model explicitly.

This module detects the original and dispatches; the reader and the shared pieces are in
`common.py`, the translators in `rae.py`, `lightningdit.py` (with VA-VAE's autoencoder) and
`taming.py`.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

from configs_compat.common import ConfigTranslation, OriginalConfigError, _Reader
from configs_compat.lightningdit import _ldm_autoencoder, _lightningdit_sample, _lightningdit_train
from configs_compat.rae import _rae_stage1, _rae_stage2_sample, _rae_stage2_train
from configs_compat.taming import _taming_vqgan

__all__ = ["ConfigTranslation", "OriginalConfigError", "detect_original", "translate_original"]


# ------------------------------------------------------------------------------------------------
# Detection
# ------------------------------------------------------------------------------------------------
def detect_original(cfg: dict) -> Optional[str]:
    """Which original wrote `cfg` (see the module docstring), or None for our own flag files."""
    if not isinstance(cfg, dict):
        return None
    if isinstance(cfg.get("stage_1"), dict):
        return "rae-stage2" if "stage_2" in cfg else "rae-stage1"
    model = cfg.get("model")
    if isinstance(model, dict):
        if "model_type" in model and isinstance(cfg.get("transport", cfg.get("sample")), dict):
            return "lightningdit"
        target = str(model.get("target", ""))
        if target.startswith("ldm.models.autoencoder"):
            return "ldm-autoencoder"
        if target.startswith("taming.models.vqgan"):
            return "taming-vqgan"
    return None


def translate_original(cfg: dict, path, prog: str) -> Optional[ConfigTranslation]:
    """The translation of an original's config for `prog` (e.g. "train_stage1.py"), None when
    `cfg` is not an original's (it is then read as our own {flag: value} file)."""
    kind = detect_original(cfg)
    if kind is None:
        return None
    readers = _TRANSLATORS[kind]
    if prog not in readers:
        raise OriginalConfigError(f"{path} is a {kind} config (the original's); {prog} does not read it: use it with "
                                  f"{' / '.join(sorted(readers))}")
    r = _Reader(cfg, path, prog, kind)
    readers[prog](r)
    return r.finish()


_TRANSLATORS: Dict[str, Dict[str, Callable[[_Reader], None]]] = {
    "rae-stage1": {"train_stage1.py": _rae_stage1},
    "rae-stage2": {"train_ldm_only.py": _rae_stage2_train, "generate.py": _rae_stage2_sample},
    "lightningdit": {"train_ldm_only.py": _lightningdit_train, "generate.py": _lightningdit_sample},
    "ldm-autoencoder": {"train_stage1.py": _ldm_autoencoder},
    "taming-vqgan": {"train_stage1.py": _taming_vqgan},
}
