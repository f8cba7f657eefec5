"""Names the data layer accepts, written once. No imports: ``config`` and the CLI read them without
loading numpy (``cdmix --help`` stays fast)."""

# Image files read from a folder, a CSV and by ``cdmix predict`` (lower-case suffixes).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")

# ``--data-placement``: where the training images live (see ``cdmix.data.host_images``).
DATA_PLACEMENTS = ("auto", "device", "host", "disk")

# ``--labels`` name -> key in the CIFAR-N label file; the first entry of each is the default.
CIFARN_LABEL_SETS = {
    "cifar10n": {
        "worst": "worse_label",
        "aggre": "aggre_label",
        "random1": "random_label1",
        "random2": "random_label2",
        "random3": "random_label3",
    },
    "cifar100n": {"noisy": "noisy_label"},
}
