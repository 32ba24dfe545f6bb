"""The message-passing network of the QM9 multi-task benchmark, on padded molecules."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtlkit.nn._base import MultiTaskModel, check_tasks, positive_int

#: Columns of one atom's row in a packed molecule ``(max_atoms, ATOM_COLUMNS + max_atoms)``:
#: 11 atom features (PyG QM9's ``x``), 3 coordinates, 1 presence flag, then the bond type to
#: every atom slot (0: none, 1-4: PyG's single, double, triple, aromatic).
NODE_FEATURES, POSITION, PRESENT = slice(0, 11), slice(11, 14), 14
ATOM_COLUMNS = 15


class MPNN(MultiTaskModel):
    """NNConv + GRU message passing with Set2Set readout and one linear head per task.

    The QM9 network of the Nash-MTL and FAMO experiments (Navon et al., ICML 2022,
    arXiv:2202.01017; Liu et al., NeurIPS 2023, arXiv:2306.03792), itself PyTorch Geometric's
    NNConv example after Gilmer et al. (ICML 2017, arXiv:1704.01212): ``h = ReLU(lin0(x))``;
    three times ``m = ReLU(NNConv(h))`` (edge network ``Linear(5, 128) - ReLU - Linear(128,
    dim * dim)``, mean over the other atoms, root weight and bias) and ``h = GRU(m, h)``;
    Set2Set with 3 steps; ``ReLU(lin1)`` to ``dim`` (the shared features); a ``Linear(dim, 1)``
    head per task. Every pair of atoms is an edge (their ``Complete`` transform), with the bond
    one-hot (zeros if unbonded) and the distance as its 5 attributes.

    Inputs are packed molecules ``(N, A, 15 + A)`` (see :data:`ATOM_COLUMNS`;
    :func:`mtlkit.data.qm9` writes them), so batching needs no graph library.

    Args:
        tasks: the task names (one scalar output each).
        num_features: atom features (11).
        dim: hidden size (64).

    ``features``: the ``(N, dim)`` molecule representation before the heads.

    Example:
        >>> import torch
        >>> from mtlkit.nn import MPNN
        >>> mol = torch.zeros(2, 3, 15 + 3)
        >>> mol[:, :2, 14] = 1.0          # two atoms present, the third slot empty
        >>> mol[:, 1, 11] = 1.2           # 1.2 apart
        >>> mol[:, 0, 15 + 1] = mol[:, 1, 15 + 0] = 1.0  # a single bond
        >>> out = MPNN(["mu", "alpha"], dim=8)(mol)
        >>> {t: tuple(y.shape) for t, y in out.items()}
        {'mu': (2, 1), 'alpha': (2, 1)}
    """

    def __init__(self, tasks: Sequence[str], num_features: int = 11, dim: int = 64) -> None:
        super().__init__(check_tasks(tasks))
        self.num_features = positive_int("num_features", num_features)
        self.dim = positive_int("dim", dim)
        self.lin0 = nn.Linear(num_features, dim)
        self.edge_net = nn.Sequential(nn.Linear(5, 128), nn.ReLU(), nn.Linear(128, dim * dim))
        self.root = nn.Linear(dim, dim)  # NNConv's root weight and bias
        self.gru = nn.GRU(dim, dim)
        self.set2set = nn.LSTM(2 * dim, dim)
        self.lin1 = nn.Linear(2 * dim, dim)
        self.heads = nn.ModuleDict({t: nn.Linear(dim, 1) for t in self.tasks})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        n, a = x.shape[0], x.shape[1]
        if x.dim() != 3 or x.shape[2] != ATOM_COLUMNS + a:
            raise ValueError(f"MPNN expects packed molecules (N, A, {ATOM_COLUMNS} + A), got "
                             f"{tuple(x.shape)}")
        present = x[..., PRESENT] > 0.5  # (N, A)
        pos = x[..., POSITION]
        bonds = x[..., ATOM_COLUMNS:].round().long()  # (N, A, A)
        pair = present[:, :, None] & present[:, None, :]
        pair &= ~torch.eye(a, dtype=torch.bool, device=x.device)
        mol, dst, src = pair.nonzero(as_tuple=True)  # edges src -> dst
        one_hot = F.one_hot(bonds[mol, src, dst].clamp(0, 4), 5)[:, 1:].to(x.dtype)
        dist = (pos[mol, src] - pos[mol, dst]).norm(dim=-1, keepdim=True)
        theta = self.edge_net(torch.cat([one_hot, dist], dim=1)).view(-1, self.dim, self.dim)
        degree = pair.sum(2).clamp_min(1).to(x.dtype)[present]  # (atoms,)
        # flatten the present atoms; index of each (molecule, slot) among them
        slot = torch.full((n, a), -1, dtype=torch.long, device=x.device)
        slot[present] = torch.arange(int(present.sum()), device=x.device)
        src_i, dst_i = slot[mol, src], slot[mol, dst]
        out = F.relu(self.lin0(x[..., NODE_FEATURES][present]))  # (atoms, dim)
        h = out.unsqueeze(0)
        for _ in range(3):
            msg = torch.bmm(out[src_i].unsqueeze(1), theta).squeeze(1)
            agg = out.new_zeros(out.shape).index_add_(0, dst_i, msg) / degree[:, None]
            m = F.relu(agg + self.root(out))
            o, h = self.gru(m.unsqueeze(0), h)
            out = o.squeeze(0)
        owner = present.nonzero(as_tuple=True)[0]  # molecule of each atom
        pooled = self._set2set(out, owner, n)
        features = F.relu(self.lin1(pooled))
        self.features = features
        return {t: self.heads[t](features) for t in self.tasks}

    def _set2set(self, x: Tensor, owner: Tensor, n: int, steps: int = 3) -> Tensor:
        """Set2Set (Vinyals et al., ICLR 2016, arXiv:1511.06391) over each molecule's atoms."""
        q_star = x.new_zeros(n, 2 * self.dim)
        state = (x.new_zeros(1, n, self.dim), x.new_zeros(1, n, self.dim))
        for _ in range(steps):
            q, state = self.set2set(q_star.unsqueeze(0), state)
            q = q.squeeze(0)
            e = (x * q[owner]).sum(-1)
            e_max = x.new_full((n,), -torch.inf).scatter_reduce(0, owner, e, "amax")
            w = (e - e_max[owner]).exp()
            w = w / x.new_zeros(n).index_add_(0, owner, w)[owner]
            r = x.new_zeros(n, self.dim).index_add_(0, owner, w[:, None] * x)
            q_star = torch.cat([q, r], dim=1)
        return q_star

    def _task_parameters(self, task: str) -> Iterable[nn.Parameter]:
        return self.heads[task].parameters()
