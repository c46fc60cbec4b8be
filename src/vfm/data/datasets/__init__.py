"""Datasets: one builder per dataset, each returning a :class:`DataSplits`.

Every builder is keyword-only and also takes the dataset's *metadata* (``img_size``, ``in_chans``,
``mean``, ``std``, ``num_classes``) so that a Hydra node such as ``conf/dataset/fashion_mnist.yaml``
(``_target_: vfm.data.datasets.benchmark`` + keys) instantiates it directly, while the rest of
the config can interpolate ``${dataset.img_size}`` etc. without loading any data. The builders
check that the declared metadata matches the data they load, so a wrong override fails loudly
instead of silently training on mis-shaped inputs.

Every dataset yields ``(image, label)`` with ``image`` a ``uint8`` tensor ``[C, H, W]`` and
``label`` an ``int`` (``-1`` when unlabelled). Augmentation, float conversion and normalisation
happen later, batched, in :mod:`vfm.data.transforms` (see :mod:`vfm.data.collate`).

One module per kind:

* :mod:`~vfm.data.datasets.core`: :class:`DataSplits`, :class:`TensorImageDataset` (in memory,
  the fast path: indexing is a tensor slice, there is no decoding), seeded train/val splits;
* :mod:`~vfm.data.datasets.benchmarks`: Fashion-MNIST, MNIST (idx files, :mod:`~vfm.data.datasets.idx`),
  CIFAR-10/100 and STL-10, in memory;
* :mod:`~vfm.data.datasets.folders`: image folders decoded lazily with PIL (:func:`imagefolder`,
  :func:`unlabeled_folder`), under the bad-file policy of :mod:`~vfm.data.datasets.bad_files`
  (``bad_files="skip"``: an undecodable file is replaced by the next item, logged and counted;
  ``"fail"``: :class:`ImageDecodeError` naming the file);
* :mod:`~vfm.data.datasets.synthetic`: generated gratings for tests and smoke runs.
"""

from vfm.data.datasets.bad_files import (
    BAD_FILE_POLICIES,
    DECODE_ERRORS,
    MAX_CONSECUTIVE_BAD,
    BadFileDataset,
    ImageDecodeError,
    check_bad_files,
)
from vfm.data.datasets.benchmarks import FASHION_MNIST_CLASSES, MNIST_CLASSES, benchmark, fashion_mnist, mnist, stl10
from vfm.data.datasets.core import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DatasetNotFoundError,
    DataSplits,
    TensorImageDataset,
    labelled_subset,
    norm_stats,
    split_indices,
    split_train_val,
)
from vfm.data.datasets.folders import (
    IMG_EXTENSIONS,
    ImageFileDataset,
    LazyImageDataset,
    imagefolder,
    load_image,
    unlabeled_folder,
)
from vfm.data.datasets.idx import read_idx
from vfm.data.datasets.synthetic import synthetic

__all__ = [
    "BAD_FILE_POLICIES",
    "DECODE_ERRORS",
    "FASHION_MNIST_CLASSES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMG_EXTENSIONS",
    "MAX_CONSECUTIVE_BAD",
    "MNIST_CLASSES",
    "BadFileDataset",
    "DataSplits",
    "DatasetNotFoundError",
    "ImageDecodeError",
    "ImageFileDataset",
    "LazyImageDataset",
    "TensorImageDataset",
    "benchmark",
    "check_bad_files",
    "fashion_mnist",
    "imagefolder",
    "labelled_subset",
    "load_image",
    "mnist",
    "norm_stats",
    "read_idx",
    "split_indices",
    "split_train_val",
    "stl10",
    "synthetic",
    "unlabeled_folder",
]
