"""The settings of SimCLR pretraining (``cdmix pretrain``), import-free so the CLI's parser can show
them without importing torch."""

# SupContrast's SimCLR run as C2D used it (main_supcon.py --method SimCLR; REFERENCE §7): the settings
# a `cdmix pretrain` preset gives, not defaults for classification runs. Its cosine schedule ends at
# lr x 0.1^3, and batches above 256 warm the lr up from 0.01 over the first 10 epochs (util.py).
SUPCONTRAST_SIMCLR = {
    "batch_size": 1024,
    "lr": 0.5,
    "simclr_temperature": 0.5,
    "schedule": "cosine",
    "optimizer": "sgd",
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "epochs": 1000,
}
# `cdmix pretrain`'s defaults (under any preset and flag): SupContrast's values with its schedule, every
# training image (no validation part), and an epoch count a CPU user can wait for. SupContrast (and C2D)
# ran 1000 epochs; the simclr-cifar10 / simclr-cifar100 presets do. On digits (1,347 training images) 100
# epochs took 50 s of one CPU core and ended at a kNN accuracy of 75% against the demo's 40%-noisy labels.
PRETRAIN_EPOCHS = 100
PRETRAIN_DEFAULTS = {**SUPCONTRAST_SIMCLR, "schedule": "supcon", "epochs": PRETRAIN_EPOCHS, "val_fraction": 0.0,
                     "method": "simclr"}
