"""Reading image datasets without stopping at an unreadable file.

An image dataset (:class:`~manifold_fm.data.image_folder.ImageFolderDataset`) raises
:class:`~manifold_fm.data.image_folder.ImageReadError` for a corrupt or unreadable file. Latent extraction, latent
statistics and decoder finetuning leave such items out and carry on; the helpers here do that in one place:
:func:`load_image_batch` in the calling process, :class:`GuardedItems` with :func:`collate_guarded` inside DataLoader
worker processes (an exception there would end the whole loader, so each error travels back as a record instead).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .image_folder import ImageReadError


class GuardedItems(Dataset):
    """The items of ``dataset`` at ``indices``, each an ``(image or None, label, index, error)`` tuple.

    Item ``k`` reads ``dataset[indices[k]]``: a readable image gives ``(image, label, index, "")``, an unreadable one
    (:class:`~manifold_fm.data.image_folder.ImageReadError`) gives ``(None, -1, index, message)``. Other exceptions
    propagate. Batch with :func:`collate_guarded`.
    """

    def __init__(self, dataset: Dataset, indices: Sequence[int]) -> None:
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> tuple[Tensor | None, int, int, str]:
        i = self.indices[k]
        try:
            image, label = self.dataset[i]
        except ImageReadError as exc:
            return None, -1, i, str(exc)
        return image, int(label), i, ""


def collate_guarded(items: list) -> tuple[list[Tensor], list[int], list[int], list[tuple[int, str]]]:
    """A DataLoader ``collate_fn`` for :class:`GuardedItems`.

    Returns ``(images, labels, indices, unreadable)``: the images (unstacked), labels and source indices of the
    readable items, in batch order, and ``(index, error message)`` for each unreadable one.
    """
    good = [it for it in items if it[0] is not None]
    bad = [(it[2], it[3]) for it in items if it[0] is None]
    return [it[0] for it in good], [it[1] for it in good], [it[2] for it in good], bad


def load_image_batch(dataset: Dataset, indices: list[int]) -> Tensor:
    """The images of ``indices`` stacked into one ``(N, 3, H, W)`` tensor, unreadable ones left out.

    A dataset with a ``render(indices)`` method (:class:`~manifold_fm.data.builtin_images.BuiltinImages`) renders
    the whole batch at once. Otherwise items whose read raises
    :class:`~manifold_fm.data.image_folder.ImageReadError` are dropped, so ``N`` may be below ``len(indices)``;
    ``ValueError`` if none is readable.
    """
    render = getattr(dataset, "render", None)
    if callable(render):
        return render(indices)[0]
    images = []
    for i in indices:
        try:
            images.append(dataset[i][0])
        except ImageReadError:
            continue
    if not images:
        raise ValueError(f"none of the images {indices[:4]}... could be read; check the dataset")
    return torch.stack(images)
