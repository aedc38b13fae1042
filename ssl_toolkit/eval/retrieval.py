"""Image-text evaluation of CLIP-style models: retrieval recall@K and zero-shot classification.

Recall@K as in CLIP (Radford et al. 2021, https://arxiv.org/abs/2103.00020, Table 13) on Flickr/COCO:
text -> image counts a caption as found when its image is among the K most similar images; image ->
text counts an image as found when any of its captions is among the K most similar captions.
Zero-shot classification builds one classifier weight per class from prompts such as
"a photo of a {}." (averaged over the prompt templates, Sec. 3.1.4) and picks the most similar class.
"""

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ssl_toolkit.eval.features import encode_split, evaluating

DEFAULT_TEMPLATES = ("a photo of a {}.",)


def recall_at_k(image_emb: torch.Tensor, text_emb: torch.Tensor, text_image: torch.Tensor,
                ks: Sequence[int] = (1, 5, 10), chunk: int = 4096) -> dict[str, float]:
    """Retrieval recall (in %) in both directions.

    Args:
        image_emb: ``(N, D)`` image embeddings.
        text_emb: ``(M, D)`` caption embeddings.
        text_image: ``(M,)`` index of each caption's image in ``image_emb``.
        ks: The K values.
        chunk: Captions scored at once (bounds memory at ``chunk x N``).

    Returns:
        ``i2t_r{K}`` and ``t2i_r{K}`` for each K. Ties count in the query's favour.

    Example:
        >>> images = torch.eye(3)
        >>> texts = torch.tensor([[1.0, 0, 0], [0, 0, 1.0], [0, 0, 1.0], [0, 0.1, 0.9]])
        >>> r = recall_at_k(images, texts, torch.tensor([0, 1, 2, 2]), ks=(1, 2))
        >>> r["t2i_r1"], r["i2t_r1"]  # caption 1 points at image 2, not its image 1; caption 3 outranks it
        (75.0, 66.66666666666667)
    """
    img = F.normalize(image_emb.float(), dim=1)
    txt = F.normalize(text_emb.float(), dim=1)
    text_image = text_image.to(img.device)
    if len(txt) != len(text_image) or int(text_image.max()) >= len(img):
        raise ValueError(f"recall_at_k needs one image index in [0, {len(img)}) per caption; got {len(text_image)} "
                         f"indices for {len(txt)} captions.")
    chunks = [(start, txt[start:start + chunk]) for start in range(0, len(txt), chunk)]
    # Each caption's similarity to its own image, read from the same products as the ranking (no rounding ties).
    correct = torch.cat([(t @ img.T).gather(1, text_image[s:s + len(t), None])[:, 0] for s, t in chunks])  # (M,)
    best = torch.full((len(img),), float("-inf"), device=img.device).scatter_reduce(
        0, text_image, correct, "amax")  # (N,) each image's best caption
    t2i_rank = torch.empty(len(txt), dtype=torch.long, device=img.device)
    i2t_rank = torch.zeros(len(img), dtype=torch.long, device=img.device)
    for start, t in chunks:
        sim = t @ img.T  # (chunk, N)
        t2i_rank[start:start + len(t)] = (sim > correct[start:start + len(t), None]).sum(1)  # images above the right one
        i2t_rank += (sim > best[None, :]).sum(0)  # captions above each image's best own caption
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = 100.0 * int((i2t_rank < k).sum()) / len(img)
        out[f"t2i_r{k}"] = 100.0 * int((t2i_rank < k).sum()) / len(txt)
    return out


def zero_shot_weights(embed_texts: Callable[[torch.Tensor], torch.Tensor], tokenizer, classnames: Sequence[str],
                      templates: Sequence[str] = DEFAULT_TEMPLATES, context_length: int = 77,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """``(C, D)`` unit-norm class weights: the normalised mean embedding of each class's prompts."""
    if not classnames:
        raise ValueError("Zero-shot classification needs class names; the dataset has none.")
    if not templates or any("{}" not in t for t in templates):
        raise ValueError(f"Each zero-shot template needs a '{{}}' where the class name goes; got {list(templates)}.")
    weights = []
    for name in classnames:
        # replace, not format: "a {} photo of a {}" stopped with IndexError, other braces with KeyError
        tokens = tokenizer.encode([t.replace("{}", name) for t in templates], context_length).to(device)  # (T, L)
        weights.append(F.normalize(F.normalize(embed_texts(tokens).float(), dim=1).mean(0), dim=0))
    return torch.stack(weights)  # (C, D)


def zero_shot_accuracy(image_emb: torch.Tensor, labels: torch.Tensor, class_weights: torch.Tensor) -> dict[str, float]:
    """Accuracy (in %) of picking the class whose weight is most similar to each image.

    Returns ``top1``, ``top5`` and ``mean_per_class`` (top-1 averaged over the classes present, which
    is what to read on an unbalanced set; CLIP reports it for several datasets).

    Example:
        >>> w = torch.eye(2)
        >>> images = torch.tensor([[1.0, 0.1], [1.0, 0.0], [1.0, 0.2], [0.0, 1.0]])
        >>> zero_shot_accuracy(images, torch.tensor([0, 1, 1, 1]), w)  # class 0: 1/1, class 1: 1/3
        {'top1': 50.0, 'top5': 100.0, 'mean_per_class': 66.66666666666666}
    """
    logits = F.normalize(image_emb.float(), dim=1) @ class_weights.T  # (N, C)
    labels = labels.to(logits.device)
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (N, <=5)
    hit = top == labels[:, None]
    per_class = [int(hit[labels == c, 0].sum()) / int((labels == c).sum()) for c in labels.unique().tolist()]
    return {"top1": 100.0 * int(hit[:, 0].sum()) / len(labels), "top5": 100.0 * int(hit.any(1).sum()) / len(labels),
            "mean_per_class": 100.0 * sum(per_class) / len(per_class)}


@torch.no_grad()
def embed_split(model, datamodule, split: str = "test", device: torch.device | str = "cpu",
                batch_size: int = 512, max_batches: int | None = None,
                across_ranks: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Joint embeddings (float32) of a split's images (no augmentation) and their labels, in ``iter_split`` order
    (``max_batches`` and ``across_ranks``: as in :func:`~ssl_toolkit.eval.features.encode_split`)."""
    return encode_split(model.embed_images, model, datamodule, split, device, batch_size, max_batches, across_ranks)


@torch.no_grad()
def retrieval_recall(model, datamodule, split: str = "test", device: torch.device | str = "cpu",
                     ks: Sequence[int] = (1, 5, 10), batch_size: int = 512,
                     max_batches: int | None = None, across_ranks: bool = False) -> dict[str, float]:
    """Recall@K of a CLIP-style model (``embed_images`` / ``embed_texts``) on a caption data module's split
    (``max_batches``: on the images of its first this many batches and their captions only; ``across_ranks``:
    under DDP each rank embeds a share of the images, see :func:`~ssl_toolkit.eval.features.encode_split`, and
    all of the captions)."""
    image_emb, _ = embed_split(model, datamodule, split, device, batch_size, max_batches, across_ranks)
    texts, text_image = datamodule.captions(split)
    if max_batches is not None:
        keep = text_image < len(image_emb)
        texts, text_image = [t for t, k in zip(texts, keep.tolist()) if k], text_image[keep]
    tokens = model.tokenizer().encode(texts, model.text_config.context_length)  # (M, L), the model's own tokenizer
    with evaluating(model, device):
        text_emb = torch.cat([model.embed_texts(t.to(device)) for t in tokens.split(batch_size)])  # (M, E)
    return recall_at_k(image_emb, text_emb, text_image, ks)


@torch.no_grad()
def zero_shot(model, datamodule, templates: Sequence[str] = DEFAULT_TEMPLATES, split: str = "test",
              device: torch.device | str = "cpu", batch_size: int = 512) -> dict[str, float]:
    """Zero-shot top-1/top-5 of a CLIP-style model on a labelled data module, from its class names and prompts."""
    datamodule.setup()
    image_emb, labels = embed_split(model, datamodule, split, device, batch_size)
    with evaluating(model, device):
        weights = zero_shot_weights(model.embed_texts, model.tokenizer(), datamodule.splits.classes, templates,
                                    model.text_config.context_length, device)
    return zero_shot_accuracy(image_emb, labels, weights)
