"""The training batch: the one definition of the keys a collate produces and a method reads.

A batch is a plain ``dict`` (so it pins, moves to a device and pickles like any other), typed as
:class:`Batch` so that readers and type checkers see its keys in one place. Which keys a batch
carries depends on the collate that built it (:mod:`vfm.data.collate`):

==========================  ===================================================================
collate                     keys
==========================  ===================================================================
``MultiCropCollate``        ``crops``, ``label`` (+ ``masks`` with a masking function)
``SupervisedCollate``       ``crops`` (one, mixed), ``label``, ``target``
``ImageTextCollate``        ``crops``, ``text``, ``captions``, ``label``
``MultiBlockCollate``       ``crops`` (one), ``label``, ``context_ids``, ``target_ids`` (I-JEPA)
any of them, ``deferred()`` ``images``, ``seed``, ``label`` (+ ``mix_rng``, ``text``, ``captions``)
==========================  ===================================================================

A deferred batch (``trainer.augment_on_device=true``) is turned into the plain one on the
training device by ``collate.finish(batch)``, so a method's ``training_step`` only ever sees the
plain keys.
"""

from __future__ import annotations

from typing import TypedDict

from torch import Tensor

from vfm.rng import GlobalRngState

__all__ = ["Batch"]


class Batch(TypedDict, total=False):
    """One training batch. ``B`` is the per-process batch size.

    Keys of a finished batch (what ``Method.training_step`` receives):

    - ``crops``: ``list[Tensor]``, float32 normalised views ``[B, C, s, s]``; the global views
      first (size ``global_crop_size``), then the local ones (``local_crop_size``). One view for
      CLIP, MAE, BEiT, EVA and supervised training; ``n_global + n_local`` for DINO, iBOT, DINOv2.
    - ``label``: int64 ``[B]``, the class of each image; ``-1`` where unknown (unlabelled folders,
      captions without classes). Supervised training keeps the unmixed labels here.
    - ``masks``: ``list[Tensor]``, one bool ``[B, N]`` patch mask per global view, ``N`` the number
      of patches of a global crop (row-major); ``True`` = masked (hidden from the MAE encoder,
      replaced by the mask token in BEiT / iBOT / DINOv2 / EVA).
    - ``target``: float32 ``[B, K]``, soft targets over ``K`` classes after label smoothing and
      Mixup/CutMix (supervised training); each row sums to 1.
    - ``text``: the tokenized captions, token ids int64 ``[B, L]``, or a dict of such tensors
      (ids, attention mask) for tokenizers that return one (CLIP).
    - ``captions``: ``list[str]`` of length ``B``, the raw captions (logging, visualisation).
    - ``context_ids``, ``target_ids``: int64 ``[n_blocks, B, K]``, I-JEPA's context and target
      blocks as row-major patch indices (:mod:`vfm.data.multiblock`), ``K`` patches per block.

    Keys of a deferred batch (built by ``collate.deferred()`` in the loader workers, replaced by
    ``crops`` / ``masks`` / ``target`` in ``collate.finish``):

    - ``images``: uint8 ``[B, C, H, W]``, the decoded images, not yet cropped or normalised (for
      supervised training with RandAugment: the cropped, flipped, RandAugmented views).
    - ``seed``: ``int``, the batch seed from :class:`vfm.data.sampler.SeededBatchSampler`; the
      augmentation and masks are drawn from ``torch.Generator().manual_seed(seed)``.
    - ``sizes``: ``list[tuple[int, int]]``, each image's ``(h, w)`` when the images of the batch
      differ in size (whole image files); ``images`` is then a canvas holding each at its top left
      (:func:`vfm.data.collate.stack_images`). Absent when they all have one size.
    - ``mix_rng``: the Python and NumPy global generator states RandAugment left
      (:data:`vfm.rng.GlobalRngState`), which Mixup/CutMix continue from (supervised training
      with Mixup or CutMix only).
    """

    crops: list[Tensor]
    label: Tensor
    masks: list[Tensor]
    target: Tensor
    text: Tensor | dict[str, Tensor]
    captions: list[str]
    context_ids: Tensor
    target_ids: Tensor
    images: Tensor
    seed: int
    sizes: list[tuple[int, int]]
    mix_rng: GlobalRngState
