"""Label embeddings E_c (one m_c x W matrix per class and member, from the class name's token embeddings) and their means ē_c."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from hisf.model.backbone import Backbone


class LabelEmbeddings(nn.Module):
    """E for the current class set and every member, stored flat as `table` [K, sum_c m_c, W] (row offsets per class).

    A class set change keeps what was learned: rows of a class seen before come back from a name-keyed
    store; classes never trained on start from their names' token embeddings and are used as is (docs/method.md).
    """

    def __init__(self, backbone: Backbone, members: int = 1, learnable: bool = True):
        super().__init__()
        self.backbone = [backbone]  # a list: not a submodule, the PromptModel owns the CLIP model
        self.members = members
        self.learnable = learnable
        self.classnames: tuple[str, ...] = ()
        self.lengths: tuple[int, ...] = ()
        self.table = nn.Parameter(torch.zeros(members, 0, backbone.text_width), requires_grad=learnable)
        # Row -> class, row -> offset within its class name, tokens per class: fixed per class set, built on
        # the host once so means()/place() have no data-dependent shapes (no sync, no graph break).
        self.register_buffer("row_class", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("row_offset", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("counts", torch.zeros(0, dtype=torch.long), persistent=False)
        self._store: dict[str, torch.Tensor] = {}  # class name -> [K, m_c, W]

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
                e = bb.token_embeddings(bb.bpe(name)).unsqueeze(0).expand(self.members, -1, -1)
            rows.append(e.to(self.table.device))
            lengths.append(e.shape[1])
        self.classnames, self.lengths = names, tuple(lengths)
        self.table = nn.Parameter(torch.cat(rows, dim=1).float().contiguous(), requires_grad=self.learnable)
        counts = torch.tensor(lengths, dtype=torch.long)
        row_class = torch.repeat_interleave(torch.arange(len(lengths)), counts)
        starts = torch.cumsum(counts, 0) - counts
        device = self.table.device
        self.counts, self.row_class = counts.to(device), row_class.to(device)
        self.row_offset = (torch.arange(row_class.shape[0]) - starts[row_class]).to(device)

    @torch.no_grad()
    def remember(self) -> None:
        """Keep the current rows by class name (called before the class set changes)."""
        for name, e in zip(self.classnames, self.per_class()):
            self._store[name] = e.detach().clone()

    def per_class(self) -> list[torch.Tensor]:
        """[K, m_c, W] per class."""
        return list(torch.split(self.table, list(self.lengths), dim=1))

    def keep_members(self, index: torch.Tensor) -> None:
        """Keep the members at `index` (a fused group re-packs when members leave)."""
        self.members = int(index.numel())
        self._store = {k: v[index.to(v.device)] for k, v in self._store.items()}

    def means(self) -> torch.Tensor:
        """Ē [K, C, W]: ē_c = mean over the m_c tokens of E_c, per member."""
        k, _, w = self.table.shape
        sums = torch.zeros(k, len(self.lengths), w, device=self.table.device, dtype=self.table.dtype)
        sums = sums.index_add(1, self.row_class, self.table)
        return sums / self.counts.to(self.table.dtype)[None, :, None]

    def place(self, token_embeds: torch.Tensor, name_start: int) -> torch.Tensor:
        """Token embeddings [C, L, W] -> [K, C, L, W], each class's name positions holding member k's E_c."""
        k = self.table.shape[0]
        x = token_embeds.unsqueeze(0).expand(k, *token_embeds.shape)
        members = torch.arange(k, device=token_embeds.device)[:, None]
        return x.index_put((members, self.row_class[None, :], (name_start + self.row_offset)[None, :]),
                           self.table.to(token_embeds.dtype))
