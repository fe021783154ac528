"""Label embeddings E_c (one m_c x W matrix per class, from the class name's token embeddings) and their means ē_c."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from hisf.backbone import Backbone


class LabelEmbeddings(nn.Module):
    """E for the current class set, stored flat as `table` [sum_c m_c, W] (row offsets per class).

    A class set change keeps what was learned: rows of a class seen before come back from a name-keyed
    store; classes never trained on start from their names' token embeddings and are used as is (method.md).
    """

    def __init__(self, backbone: Backbone, learnable: bool = True):
        super().__init__()
        self.backbone = [backbone]  # a list: not a submodule, the PromptModel owns the CLIP model
        self.learnable = learnable
        self.classnames: tuple[str, ...] = ()
        self.lengths: tuple[int, ...] = ()
        self.table = nn.Parameter(torch.zeros(0, backbone.text_width), requires_grad=learnable)
        self._store: dict[str, torch.Tensor] = {}

    def set_classnames(self, names: Sequence[str]) -> None:
        names = tuple(names)
        if names == self.classnames:
            return
        self.remember()
        bb = self.backbone[0]
        rows, lengths = [], []
        for name in names:
            e = self._store.get(name)
            if e is None:
                e = bb.token_embeddings(bb.bpe(name))
            rows.append(e.to(self.table.device))
            lengths.append(e.shape[0])
        self.classnames, self.lengths = names, tuple(lengths)
        self.table = nn.Parameter(torch.cat(rows).float(), requires_grad=self.learnable)

    @torch.no_grad()
    def remember(self) -> None:
        """Keep the current rows by class name (called before the class set changes)."""
        for name, e in zip(self.classnames, self.per_class()):
            self._store[name] = e.detach().clone()

    def per_class(self) -> list[torch.Tensor]:
        return list(torch.split(self.table, list(self.lengths)))

    def means(self) -> torch.Tensor:
        """Ē [C, W]: ē_c = mean over the m_c tokens of E_c."""
        index = torch.repeat_interleave(
            torch.arange(len(self.lengths), device=self.table.device),
            torch.tensor(self.lengths, device=self.table.device),
        )
        sums = torch.zeros(len(self.lengths), self.table.shape[1], device=self.table.device, dtype=self.table.dtype)
        sums = sums.index_add(0, index, self.table)
        return sums / torch.tensor(self.lengths, device=self.table.device, dtype=self.table.dtype)[:, None]

    def place(self, token_embeds: torch.Tensor, name_start: int) -> torch.Tensor:
        """Token embeddings [C, L, W] with each class's name positions replaced by E_c."""
        lengths = torch.tensor(self.lengths, device=token_embeds.device)
        cls = torch.repeat_interleave(torch.arange(len(self.lengths), device=token_embeds.device), lengths)
        starts = torch.cumsum(lengths, 0) - lengths
        pos = name_start + torch.arange(cls.shape[0], device=token_embeds.device) - starts[cls]
        return token_embeds.index_put((cls, pos), self.table.to(token_embeds.dtype))
