"""The originals' own YAML configs (RAE, LightningDiT / VA-VAE, taming-transformers) read by
`--config`: `translate_original` recognises which original a file comes from and maps every key
it understands onto the flags of the script that reads it (see `originals.py`)."""
from configs_compat.originals import ConfigTranslation, OriginalConfigError, detect_original, translate_original

__all__ = ["ConfigTranslation", "OriginalConfigError", "detect_original", "translate_original"]
