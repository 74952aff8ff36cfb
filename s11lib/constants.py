"""CIFAR-10 facts, written once. Everything else imports them from here."""

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
NUM_CLASSES = len(CLASSES)
IMAGE_SHAPE = (3, 32, 32)

# Per-channel mean and std of the 50,000 training images, pixel values in [0, 1]. The std is the
# true one (several course repositories retype 0.2023, 0.1994, 0.2010, which is something else);
# tests/test_loaders.py recomputes both from the real data.
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
