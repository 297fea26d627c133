"""taming-transformers' VQGAN configs (`configs/*_vqgan.yaml` -> train_stage1.py --tokenizer
vqgan). The reader and the shared pieces are in `common.py`.
"""
from __future__ import annotations

from configs_compat.common import _MISSING, _disc_in_channels, _init_from, _lightning_data, _model_params, _Reader

def _taming_vqgan(r: _Reader):
    r.fixed("model.target", ("taming.models.vqgan.VQModel",), "the VQGAN with taming's VectorQuantizer2")
    r.set("tokenizer", "vqgan")
    model = _model_params(r, ("embed_dim", "n_embed", "ddconfig", "remap", "sane_index_shape"))
    r.set("model_config", model, yields=("model",))
    r.unused("model.params.monitor", "Lightning's best-checkpoint metric; every checkpoint is kept")
    _init_from(r, "model.params.ckpt_path")
    # taming's main.py: lr = accumulate_grad_batches * n_gpus * batch_size * base_learning_rate
    if r.flag("model.base_learning_rate", "learning_rate", float) is not _MISSING:
        r.set("scale_lr", True)
    lc = "model.params.lossconfig"
    r.fixed(f"{lc}.target", ("taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",),
            "LPIPS + PatchGAN + codebook loss")
    p = f"{lc}.params"
    for key, dest, conv in (("disc_start", "disc_start", int), ("disc_weight", "disc_weight", float),
                            ("codebook_weight", "codebook_weight", float), ("disc_factor", "disc_factor", float),
                            ("disc_num_layers", "disc_num_layers", int), ("disc_ndf", "disc_ndf", int),
                            ("perceptual_weight", "perceptual_weight", float), ("use_actnorm", "use_actnorm", bool),
                            ("disc_loss", "disc_loss", str)):
        r.flag(f"{p}.{key}", dest, conv)
    r.fixed(f"{p}.pixelloss_weight", (1.0,), "L1 weight 1")
    r.fixed(f"{p}.disc_conditional", (False,), "an unconditional PatchGAN")
    _disc_in_channels(r, p, model)
    _lightning_data(r)
    for split in ("train", "validation"):
        s = f"data.params.{split}"
        target = str(r.get(f"{s}.target", ""))
        for size_key in (f"{s}.params.size", f"{s}.params.config.size", f"{s}.params.crop_size"):
            if split == "train":
                r.flag(size_key, "resolution", int)
            else:
                r.unused(size_key, "evaluation at --resolution")
        if split == "train" and target not in ("taming.data.custom.CustomTrain", "taming.data.imagenet.ImageNetTrain",
                                               "taming.data.faceshq.FacesHQTrain"):
            r.error(f"{s}.target", f"= {target!r}: known CustomTrain, ImageNetTrain, FacesHQTrain")
        if split == "train" and target != "taming.data.faceshq.FacesHQTrain":
            # ImagePaths: albumentations SmallestMaxSize (OpenCV bilinear, --short-side-resize's default
            # for vqgan), then RandomCrop (ImageNetTrain: random_crop=True) or CenterCrop (CustomTrain:
            # random_crop=False)
            r.set("load_mode", "short-side")
            r.set("crop", "center" if target == "taming.data.custom.CustomTrain" else "random")
        lst = r.get(f"{s}.params.{'training' if split == 'train' else 'test'}_images_list_file", None)
        if lst is not None and split == "train":
            r.out.needs_explicit["data_dir"] = (
                f"{r.path}: data.params.train.params.training_images_list_file ({lst}) lists taming's training "
                f"images; we read image folders and archives: pass --data-dir FOLDER (those images)")
        elif lst is not None:
            r.out.unused.append(f"{s}.params.test_images_list_file (give --eval-data-dir FOLDER; default: a "
                                f"held-out slice of --data-dir)")
