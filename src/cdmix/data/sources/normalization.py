"""Published per-channel normalisation statistics (x in [0, 1]), in one place.

Sources without published statistics (digits, folder, csv, npz, stores, WebVision, Food-101N,
ANIMAL-10N) normalise with the statistics of their own training images instead.
"""

# The values DivideMix's CIFAR dataloaders use.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
CIFAR100_MEAN = (0.507, 0.487, 0.441)
CIFAR100_STD = (0.267, 0.256, 0.276)
# torchvision's ImageNet statistics (``--normalization imagenet``, for ImageNet-pretrained nets).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# DivideMix's dataloader_clothing1M.py normalises with these Clothing1M statistics.
CLOTHING1M_MEAN = (0.6959, 0.6537, 0.6371)
CLOTHING1M_STD = (0.3113, 0.3192, 0.3214)
