"""Image–text datasets: captioned images for contrastive (CLIP-style) pretraining.

Every dataset here yields ``(image, caption, label)``: ``image`` a ``uint8`` tensor ``[C, H, W]``,
``caption`` a ``str`` and ``label`` an ``int`` (``-1`` when unknown). The file-based ones are
:class:`vfm.data.datasets.LazyImageDataset` s, decoded exactly as the image folders
(:func:`vfm.data.datasets.load_image`: PIL, converted to ``in_chans``, shorter side resized to
``img_size``, centre crop), and, like them, read whole for training (``dataset.whole_images``:
the random resized crops come from all of each image, as open_clip's ``RandomResizedCrop`` on the
decoded file); the batched augmentation of :mod:`vfm.data.transforms` applies unchanged.

* :class:`ImageTextCSV` (:mod:`~vfm.data.image_text.csv`) reads a CSV/TSV of image paths and
  captions (open_clip's format).
* :class:`WebDatasetShards` (:mod:`~vfm.data.image_text.shards`) reads webdataset ``.tar`` shards
  *map-style*: the members' byte offsets are indexed once, and samples are read by seeking, so the
  shards go through the seeded, resumable sampler like every other dataset.
* :class:`CaptionedDataset` (:mod:`~vfm.data.image_text.captioned`) turns a labelled dataset into
  image–text pairs with caption templates ("a photo of a {}."), optionally holding out classes for
  zero-shot experiments.

Bad data is skipped rather than fatal, but counted and logged (logger ``vfm.data``), and a data set
that is mostly bad fails at construction: rows/samples that are visibly broken (missing file,
missing or empty caption) are found when the dataset is built, and more than ``max_bad_fraction``
of them raises. Images that fail to *decode* are only found when read: they follow the one bad-file
policy of every lazily decoded dataset (:mod:`vfm.data.datasets.bad_files`; by default the item is
replaced by the next good one, deterministically, and counted across DataLoader workers).

The builders (:func:`image_text_csv`, :func:`webdataset`, :func:`captioned`,
:func:`synthetic_captions`) return a :class:`vfm.data.datasets.DataSplits` and are the
``_target_`` of ``conf/dataset/*.yaml``.
"""

from vfm.data.image_text.captioned import CaptionedDataset, captioned, synthetic_captions
from vfm.data.image_text.csv import ImageTextCSV, image_text_csv
from vfm.data.image_text.shards import IMAGE_EXTS, WebDatasetShards, expand_urls, webdataset

__all__ = [
    "IMAGE_EXTS",
    "CaptionedDataset",
    "ImageTextCSV",
    "WebDatasetShards",
    "captioned",
    "expand_urls",
    "image_text_csv",
    "synthetic_captions",
    "webdataset",
]
