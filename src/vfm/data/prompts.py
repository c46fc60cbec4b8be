"""Caption templates and readable class names for turning labelled datasets into image–text data.

The templates follow the prompt-ensembling style of CLIP (Radford et al. 2021, "Learning
Transferable Visual Models From Natural Language Supervision", Sec. 3.1.4 and the ImageNet prompt
list of openai/CLIP ``notebooks/Prompt_Engineering_for_ImageNet.ipynb``): a short sentence with one
``{}`` slot for the class name. Training captions are drawn from :data:`CAPTION_TEMPLATES`
(:class:`vfm.data.image_text.CaptionedDataset`); a zero-shot classifier averages the text embeddings
of :data:`ZERO_SHOT_TEMPLATES` per class.
"""

from __future__ import annotations

__all__ = ["CAPTION_TEMPLATES", "FASHION_MNIST_CLASS_NAMES_NATURAL", "ZERO_SHOT_TEMPLATES"]

CAPTION_TEMPLATES: list[str] = [
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a black and white photo of a {}.",
    "a low contrast photo of a {}.",
    "a photo of the {}.",
    "a good photo of a {}.",
    "a photo of a small {}.",
    "a photo of a large {}.",
    "itap of a {}.",
    "a bad photo of the {}.",
]

# The same sentences: on a dataset whose captions come from these templates, zero-shot prompts in
# the training distribution measure what the image tower learnt, not how well the text tower
# generalises to unseen phrasings. A copy, so editing one list never changes the other.
ZERO_SHOT_TEMPLATES: list[str] = list(CAPTION_TEMPLATES)

# Fashion-MNIST's official names ("T-shirt/top", "Ankle boot") read badly inside a sentence; these
# are the lower-case words a caption would use, in label order 0..9.
FASHION_MNIST_CLASS_NAMES_NATURAL: list[str] = [
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
]
