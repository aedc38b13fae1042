"""Embedding search on a folder of images: embed, index (FAISS flat or IVF), search, gallery, retrieval metrics.

An embeddings folder holds ``embeddings.npy`` (L2-normalised rows, float16 or float32), ``paths.txt`` (one image
per row, in the same order) and ``meta.json`` (checkpoint, its backbone fingerprint, method, backbone, dim,
preprocessing, the space: the encoder's features or a CLIP checkpoint's image-text space, and the class of each
image when the folder had class subfolders). An index is a FAISS
inner-product index (cosine on the normalised rows) with ``<index>.json`` beside it.
"""

import functools
import hashlib
import html
import json
import os
import urllib.parse

import numpy as np
import torch

from ssl_toolkit.data.images import (IMAGE_EXTENSIONS, SPLIT_FOLDERS, decode_files, decode_images, image_files,
                                     report_unreadable)
from ssl_toolkit.eval.features import evaluating
from ssl_toolkit.eval.knn import faiss, make_index, neighbour_recall
from ssl_toolkit.progress import Progress


def list_images(folder: str) -> list[str]:
    """Every image under ``folder`` (recursive, sorted), or an error that says what was looked for."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--images {folder!r} is not a folder. Pass a folder of images (subfolders are "
                                "searched; a subfolder per class adds labels).")
    paths = image_files(folder)
    if not paths:
        raise ValueError(f"No images in {folder} or its subfolders (looked for {', '.join(IMAGE_EXTENSIONS)}).")
    return paths


def _clip_model(ckpt: dict, why: str):
    """The CLIP module of a CLIP checkpoint (Lightning and Kornia load here); another method's gets ``why``."""
    from ssl_toolkit.checkpoint import import_class, method_from_checkpoint
    from ssl_toolkit.errors import CheckpointError
    from ssl_toolkit.methods import CLIP

    cls = import_class(ckpt["ssl_toolkit"]["method"])
    if not issubclass(cls, CLIP):  # method_from_checkpoint's own check, with what this command was asked to do
        raise CheckpointError(f"{why}; this is a {cls.__name__} checkpoint.")
    return method_from_checkpoint(ckpt)


def image_embedder(ckpt: dict, space: str = "backbone") -> torch.nn.Module:
    """uint8 images to features: the checkpoint's encoder (backbone with its input normalisation), or in the
    ``joint`` space a CLIP checkpoint's encoder and image projection, where its captions are embedded too."""
    from ssl_toolkit.checkpoint import encoder_from_checkpoint

    if space == "backbone":
        return encoder_from_checkpoint(ckpt)
    model = _clip_model(ckpt, "--space joint embeds images in a CLIP checkpoint's image-text space, for search "
                              "--text; leave --space out for the encoder's features, or pass a CLIP checkpoint")
    return torch.nn.Sequential(model.encoder(), model.image_proj)  # as CLIP.embed_images, before normalising


def embed_texts(ckpt: dict, texts: list[str], device: torch.device | str = "cpu") -> torch.Tensor:
    """L2-normalised ``(M, E)`` float32 embeddings of ``texts`` by a CLIP checkpoint's text tower, with the
    tokenizer it was trained with."""
    model = _clip_model(ckpt, "Text queries need a CLIP checkpoint").to(device)
    tokens = model.tokenizer().encode(texts, model.text_config.context_length).to(device)  # (M, L)
    with evaluating(model, device):
        return model.embed_texts(tokens).float().cpu()


@torch.no_grad()
def embed_paths(encoder: torch.nn.Module, paths: list[str], size: int, device: torch.device | str = "cpu",
                batch_size: int = 256, workers: int | None = None, on_corrupt: str = "fail",
                chunk: int = 4096, where: str = "the images") -> tuple[torch.Tensor, list[str]]:
    """L2-normalised ``(N, D)`` float32 embeddings of the images at ``paths`` and the paths kept.

    Images are decoded ``chunk`` at a time (memory stays bounded), shorter side resized to ``size`` and
    centre-cropped, as ImageFolderDataModule does. Unreadable files stop it with the list of all of them, every
    chunk's (``on_corrupt='fail'``: once one is found the rest is only decoded, not embedded), or are left out and
    logged (``'skip'``). Under :func:`~ssl_toolkit.progress.reporting_progress`, a line on stderr after each
    chunk says how far it is, when there are several.
    """
    encoder = encoder.to(device)
    feats, kept, bad = [], [], []
    report = Progress(len(paths), "images read", every=0)
    with evaluating(encoder, device):
        for start in range(0, len(paths), chunk):
            part = paths[start:start + chunk]
            images, keep, unreadable = decode_files(part, size, workers)
            bad += unreadable
            if not (bad and on_corrupt == "fail"):  # else it stops below; the remaining chunks are decoded only,
                kept += [part[i] for i in keep.tolist()]  # to list every unreadable file at once
                for x in images.split(batch_size):
                    feats.append(torch.nn.functional.normalize(encoder(x.to(device)).float(), dim=1).cpu())
            if len(paths) > chunk:
                report(start + len(part), f" ({len(bad):,} unreadable)" if bad else "")
    report_unreadable(bad, len(paths), where, on_corrupt, "--on-corrupt skip")
    if not kept:  # not `feats`: an empty chunk splits into one empty batch, and it had written empty embeddings
        raise ValueError(f"None of the {len(paths)} images in {where} could be read.")
    return torch.cat(feats), kept


def folder_labels(folder: str, paths: list[str]) -> tuple[list[str], list[int]] | None:
    """Classes and labels when every image sits in a first-level subfolder of ``folder`` and there are two or more;
    in a labelled dataset's layout (``train/<class>/``, ``val/<class>/``, ``test/<class>/``) the second level."""
    parts = [os.path.relpath(p, folder).split(os.sep) for p in paths]
    level = 1 if {q[0] for q in parts} <= set(SPLIT_FOLDERS) else 0  # split folders are not classes
    if any(len(q) < level + 2 for q in parts):
        return None
    classes = sorted({q[level] for q in parts})
    if len(classes) < 2:
        return None
    index = {c: i for i, c in enumerate(classes)}
    return classes, [index[q[level]] for q in parts]


def embeddings_digest(embeddings: np.ndarray, paths: list[str]) -> str:
    """SHA-256 of an embeddings folder's rows (as stored) and paths: an index records which embeddings it holds, so
    a search on an index whose folder was embedded again refuses, where it had paired the old rows with the new
    paths."""
    h = hashlib.sha256(np.ascontiguousarray(embeddings).view(np.uint8).tobytes())
    h.update("\n".join(paths).encode())
    return h.hexdigest()[:16]


def save_embeddings(folder: str, embeddings: torch.Tensor, paths: list[str], meta: dict, dtype: str = "float32",
                    labels: list[int] | None = None) -> str:
    """Write an embeddings folder (see the module docstring); ``labels`` go to ``labels.npy``. Returns the
    :func:`embeddings_digest` that ``meta.json`` records."""
    os.makedirs(folder, exist_ok=True)
    stored = embeddings.numpy().astype(dtype)
    digest = embeddings_digest(stored, paths)
    np.save(os.path.join(folder, "embeddings.npy"), stored)
    if labels is not None:
        np.save(os.path.join(folder, "labels.npy"), np.asarray(labels, dtype=np.int64))
    with open(os.path.join(folder, "paths.txt"), "w") as f:
        f.write("\n".join(paths) + "\n")
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump({**meta, "count": len(paths), "dim": int(embeddings.shape[1]), "dtype": dtype,
                   "l2_normalized": True, "digest": digest}, f, indent=2)
    return digest


def load_paths(folder: str) -> list[str]:
    """The image paths of an embeddings folder, in the order of its rows."""
    with open(os.path.join(folder, "paths.txt")) as f:
        return f.read().splitlines()


def index_paths(index: str, info: dict, rows: int) -> list[str]:
    """The image paths of an index's ``rows``, from the embeddings folder ``info`` (the index's ``.json``) names or,
    when that folder has moved (to another disk or machine) or was embedded again, from the index's own folder
    (its copy). An index whose rows are not the embeddings of either folder's paths is refused."""
    named, beside = info["embeddings"], os.path.dirname(os.path.abspath(index))
    found = [f for f in dict.fromkeys((named, beside)) if os.path.isfile(os.path.join(f, "meta.json"))]
    if not found:  # was "[Errno 2] No such file or directory: '.../paths.txt'"
        raise FileNotFoundError(f"{index} was built from the embeddings in {named}, which are not there any more, nor "
                                "beside the index. Keep the index in its embeddings folder when moving it, or build "
                                "it again: ssl-toolkit index --embeddings FOLDER")
    held = []
    for folder in found:
        with open(os.path.join(folder, "meta.json")) as f:
            meta = json.load(f)
        paths = load_paths(folder)  # an index from before digests were recorded is matched by its row count
        if len(paths) == rows and info.get("embeddings_digest", meta.get("digest")) == meta.get("digest"):
            return paths
        held.append((folder, meta, len(paths)))
    folder, meta, count = held[0]
    raise ValueError(f"{index} was built from other embeddings than {folder} holds now ({count:,} images of "
                     f"{meta.get('images', 'a folder')}: embedded again since, or changed by hand). Build the index "
                     f"again: ssl-toolkit index --embeddings {folder}")


def stale_indexes(folder: str, digest: str) -> list[str]:
    """The indexes in an embeddings folder that were built from its embeddings before they were replaced by the
    ``digest`` ones."""
    stale = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".faiss.json"):
            with open(os.path.join(folder, name)) as f:
                info = json.load(f)
            if info.get("embeddings") == os.path.abspath(folder) and info.get("embeddings_digest") != digest:
                stale.append(name.removesuffix(".json"))
    return stale


def load_embeddings(folder: str) -> tuple[np.ndarray, list[str], dict]:
    """``(N, D)`` float32 embeddings, their paths and the metadata of an ``ssl-toolkit embed`` folder."""
    files = [os.path.join(folder, n) for n in ("embeddings.npy", "paths.txt", "meta.json")]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(f"{folder} is not an embeddings folder (missing {', '.join(map(os.path.basename, missing))}"
                                "). Make one with: ssl-toolkit embed --ckpt RUN.ckpt --images DIR --out FOLDER")
    emb = np.load(files[0]).astype(np.float32)
    paths = load_paths(folder)
    with open(files[2]) as f:
        meta = json.load(f)
    labels_path = os.path.join(folder, "labels.npy")
    meta["labels"] = np.load(labels_path) if os.path.isfile(labels_path) else None
    if len(paths) != len(emb) or emb.ndim != 2 or emb.shape[1] != meta["dim"]:
        raise ValueError(f"{folder}: {len(emb)} embeddings of dim {emb.shape[1:]} but {len(paths)} paths and dim "
                         f"{meta['dim']} in meta.json; the folder was changed by hand. Run ssl-toolkit embed again.")
    return emb, paths, meta


def build_index(embeddings: np.ndarray, kind: str = "flat", nlist: int | None = None, nprobe: int = 8):
    """A FAISS inner-product index of the embeddings, on the CPU so it can be saved: ``flat`` (exact) or ``ivf``
    (see :func:`~ssl_toolkit.eval.knn.make_index`)."""
    return make_index(np.ascontiguousarray(embeddings), kind, nlist=nlist, nprobe=nprobe, gpu=False)


def recall_against_exact(index, embeddings: np.ndarray, k: int = 10, queries: int = 1000, seed: int = 0) -> float:
    """Fraction of the exact top-``k`` neighbours an approximate index returns, on sampled indexed rows."""
    rng = np.random.default_rng(seed)
    q = embeddings[rng.choice(len(embeddings), min(queries, len(embeddings)), replace=False)]
    k = min(k, len(embeddings))
    exact = faiss.IndexFlatIP(embeddings.shape[1])
    exact.add(np.ascontiguousarray(embeddings))
    _, truth = exact.search(np.ascontiguousarray(q), k)
    _, got = index.search(np.ascontiguousarray(q), k)
    return neighbour_recall(got, truth)


def retrieval_metrics(embeddings: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10),
                      max_queries: int = 2000, seed: int = 0) -> dict:
    """Leave-one-out retrieval on a labelled set: recall@k (a same-class item in the top k) and mAP, per class too.

    Each query (all rows, or ``max_queries`` sampled ones) ranks every other row by cosine similarity; average
    precision is over all rows of its class. Exact, in chunks of queries sized so that a chunk's similarity
    matrix stays near 32M entries whatever the set size.

    Example:
        >>> e = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
        >>> retrieval_metrics(e, torch.tensor([0, 0, 1, 1]), ks=(1,))["recall@1"]
        100.0
    """
    e = torch.nn.functional.normalize(embeddings.float(), dim=1)
    n = len(e)
    g = torch.Generator().manual_seed(seed)
    queries = torch.randperm(n, generator=g)[:max_queries].sort().values if n > max_queries else torch.arange(n)
    hits = {k: [] for k in ks}
    aps = []
    for q in queries.split(max(1, min(512, 2**25 // n))):
        sims = e[q] @ e.T  # (c, N)
        sims[torch.arange(len(q)), q] = -float("inf")  # leave the query out
        order = sims.argsort(dim=1, descending=True)[:, :-1]  # (c, N - 1) the query itself is last
        rel = (labels[order] == labels[q][:, None]).float()  # (c, N - 1)
        for k in ks:
            hits[k].append(rel[:, :k].amax(1))
        ranks = torch.arange(1, rel.shape[1] + 1)
        precision = rel.cumsum(1) / ranks
        aps.append((precision * rel).sum(1) / rel.sum(1).clamp_min(1))
    ap = torch.cat(aps)
    per_class = {int(c): 100.0 * ap[labels[queries] == c].mean().item() for c in labels[queries].unique()}
    return {**{f"recall@{k}": 100.0 * torch.cat(hits[k]).mean().item() for k in ks}, "mAP": 100.0 * ap.mean().item(),
            "mAP_per_class": per_class, "queries": len(queries)}


def neighbour_lists(queries: list[str], scores: np.ndarray, ids: np.ndarray, paths: list[str], k: int,
                    leave_out_query: bool = True) -> tuple[list[list[tuple[str, float]]], int]:
    """Each query's neighbours as ``(path, score)``, best first, at most ``k`` of them, from an index search's
    ``(Q, K)`` scores and row ids (ids of -1, which an IVF index gives when its searched cells hold too few vectors,
    are dropped). With ``leave_out_query``, a query that is one of the indexed files is not listed among its own
    neighbours (search ``k + 1`` for ``k`` others); also returns how many queries were left out of their own.

    Example:
        >>> neighbour_lists(["/a.png"], np.array([[1.0, 0.9]]), np.array([[0, 1]]), ["/a.png", "/b.png"], k=1)
        ([[('/b.png', 0.9)]], 1)
    """
    real = functools.lru_cache(maxsize=None)(os.path.realpath)  # the same file by any path (links, "..")
    found, own = [], 0
    for query, row_s, row_i in zip(queries, scores, ids):
        row = [(paths[j], float(s)) for s, j in zip(row_s, row_i) if j >= 0]
        if leave_out_query:
            others = [(p, s) for p, s in row if real(p) != real(query)]
            own += len(others) < len(row)
            row = others
        found.append(row[:k])
    return found, own


def write_gallery(out: str, queries: list[str], neighbours: list[list[tuple[str, float]]], size: int = 96,
                  texts: bool = False) -> str:
    """An HTML page (``.html``) or one PNG grid (``.png``): each query followed by its neighbours and scores.
    ``texts``: the queries are captions, not image paths (the PNG grid leaves their cell black)."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if out.endswith(".png"):
        from torchvision.utils import save_image

        rows = [[None if texts else q] + [p for p, _ in found] for q, found in zip(queries, neighbours)]
        width = max(len(r) for r in rows)
        flat = [p for r in rows for p in r + [None] * (width - len(r))]
        images, keep, _ = decode_images([p for p in flat if p], size, 0, "skip", "the gallery")
        grid = torch.zeros(len(flat), 3, size, size, dtype=torch.uint8)
        real = [i for i, p in enumerate(flat) if p]
        grid[[real[i] for i in keep.tolist()]] = images
        save_image(grid.float() / 255, out, nrow=width, padding=2)
        return out
    base = os.path.dirname(os.path.abspath(out))

    def cell(path: str, caption: str) -> str:
        # a URL, not a file name: '#', '?' and '%' in a name would otherwise cut or garble the link
        src = html.escape(urllib.parse.quote(os.path.relpath(os.path.abspath(path), base).replace(os.sep, "/")))
        return (f'<figure><img src="{src}" width="{size}" height="{size}" style="object-fit:cover">'
                f"<figcaption>{html.escape(caption)}</figcaption></figure>")

    def text_cell(text: str) -> str:
        return (f'<figure><div style="width:{size}px;height:{size}px;display:flex;align-items:center;'
                f'justify-content:center;text-align:center;background:#eee;font:13px sans-serif">{html.escape(text)}'
                "</div><figcaption>text query</figcaption></figure>")

    body = "".join(
        '<div style="display:flex;gap:8px;align-items:flex-start;margin-bottom:12px">'
        + (text_cell(q) if texts else cell(q, "query: " + os.path.basename(q)))
        + "".join(cell(p, f"{s:.3f} {os.path.basename(p)}") for p, s in found) + "</div>"
        for q, found in zip(queries, neighbours))
    with open(out, "w") as f:
        f.write(f"<!doctype html><meta charset=utf-8><title>ssl-toolkit search</title>"
                f"<style>figure{{margin:0;font:11px sans-serif;width:{size}px;word-break:break-all}}</style>{body}")
    return out


MAP_POINTS = 10_000  # t-SNE of CIFAR-10 embeddings on 2 CPU cores: 5,000 in 20 s, 10,000 in 40 s, 20,000 in 109 s


def map_sample(count: int, max_points: int | None = None, seed: int = 0) -> np.ndarray:
    """The rows a map draws: all ``count`` of them, or a seeded random ``max_points`` of them (sorted) when there are
    more (``None``: :data:`MAP_POINTS`; 0: all). t-SNE's time grows faster than the count (50,000 embeddings took
    minutes and a photo library's million hours), and a scatter of that many points is a blot.

    Example:
        >>> map_sample(5, max_points=10).tolist(), len(map_sample(50_000, max_points=10))
        ([0, 1, 2, 3, 4], 10)
    """
    max_points = MAP_POINTS if max_points is None else max_points
    if not max_points or count <= max_points:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, max_points, replace=False))


def embedding_map(embeddings: np.ndarray, method: str = "tsne", seed: int = 0) -> np.ndarray:
    """``(N, 2)`` coordinates of the embeddings: scikit-learn's t-SNE (cosine) or PCA."""
    if len(embeddings) < 3:
        raise ValueError(f"A 2-D map needs at least 3 embeddings; the folder has {len(embeddings)}. Embed more images.")
    if method == "pca":
        from sklearn.decomposition import PCA

        return PCA(n_components=2, random_state=seed).fit_transform(embeddings)
    if method != "tsne":
        raise ValueError(f"Unknown map method {method!r}; use tsne or pca.")
    from sklearn.manifold import TSNE

    perplexity = min(30.0, max(2.0, (len(embeddings) - 1) / 3))  # t-SNE needs perplexity < N
    return TSNE(n_components=2, metric="cosine", init="pca", perplexity=perplexity,
                random_state=seed).fit_transform(embeddings)


def save_map(xy: np.ndarray, out: str, labels: np.ndarray | None = None, classes: list[str] | None = None,
             title: str = "") -> str:
    """A scatter plot PNG of the 2-D map, coloured by class with a legend when labels are given."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure  # no pyplot: the caller's backend (a notebook's inline one) is left alone

    fig = Figure(figsize=(7, 7), dpi=100)
    ax = fig.subplots()
    if labels is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=4, alpha=0.7)
    else:
        cmap = colormaps["tab20" if len(classes) > 10 else "tab10"]
        for c, name in enumerate(classes):
            sel = labels == c
            ax.scatter(xy[sel, 0], xy[sel, 1], s=4, alpha=0.7, color=cmap(c % cmap.N), label=name)
        if len(classes) <= 20:
            ax.legend(markerscale=3, fontsize=8, loc="best")
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out)
    return out


MAX_SPRITES = 8192  # TensorBoard's sprite sheet is at most 8192 px square: 8192 thumbnails of 32 px fit with room


def write_projector(logdir: str, embeddings: np.ndarray, paths: list[str], labels: np.ndarray | None = None,
                    classes: list[str] | None = None, thumbnail: int = 32) -> bool:
    """The TensorBoard embedding projector for these embeddings, with image sprites when there are at most
    ``MAX_SPRITES`` images; returns whether sprites were written."""
    from torch.utils.tensorboard import SummaryWriter

    meta = [[os.path.basename(p), classes[int(y)]] for p, y in zip(paths, labels)] if labels is not None else \
        [os.path.basename(p) for p in paths]
    sprites = None
    if len(paths) <= MAX_SPRITES:
        images, keep, _ = decode_images(paths, thumbnail, 0, "skip", "the projector")
        if len(keep) == len(paths):
            sprites = images.float() / 255
    with SummaryWriter(logdir) as writer:
        writer.add_embedding(torch.from_numpy(embeddings), metadata=meta, label_img=sprites,
                             metadata_header=["file", "class"] if labels is not None else None, tag="embeddings")
    return sprites is not None
