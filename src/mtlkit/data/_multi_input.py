"""Multi-input data: each task has its own samples (Office-31, Office-Home)."""

from __future__ import annotations

from collections.abc import Mapping

from torch.utils.data import Dataset


class MultiInputDataset(Dataset):
    """One dataset per task: a task's batches come from its own samples.

    In a multi-input problem (LibMTL's term) the tasks do not label the same inputs: each
    domain of Office-31 is a task with its own images. The trainer draws one batch per task
    each step and runs the model on each; the balancer still sees K losses. Each task's
    dataset yields ``(x, {task: y})`` (or with a mask, as any mtlkit dataset).

    ``len()`` is the largest task's size; indexing is per task: ``ds.datasets[task][i]``.

    Args:
        datasets: task name -> that task's dataset.

    Example:
        >>> import torch
        >>> from mtlkit.data import MultiInputDataset, MultiTaskTensorDataset
        >>> a = MultiTaskTensorDataset(torch.zeros(3, 2), {"a": torch.tensor([0, 1, 0])})
        >>> b = MultiTaskTensorDataset(torch.ones(5, 2), {"b": torch.arange(5)})
        >>> ds = MultiInputDataset({"a": a, "b": b})
        >>> len(ds), ds.sizes
        (5, {'a': 3, 'b': 5})
    """

    def __init__(self, datasets: Mapping[str, Dataset]) -> None:
        if not isinstance(datasets, Mapping) or not datasets:
            raise ValueError("datasets must map at least one task name to its dataset")
        for t, d in datasets.items():
            if not isinstance(d, Dataset) or len(d) == 0:  # type: ignore[arg-type]
                raise ValueError(f"datasets[{t!r}] must be a non-empty Dataset")
        self.datasets = dict(datasets)

    @property
    def sizes(self) -> dict[str, int]:
        """Samples per task."""
        return {t: len(d) for t, d in self.datasets.items()}  # type: ignore[arg-type]

    def head(self, n: int) -> MultiInputDataset:
        """The first ``n`` samples of each task (``max_samples`` of an experiment)."""
        from torch.utils.data import Subset

        return MultiInputDataset({t: d if len(d) <= n else Subset(d, range(n))  # type: ignore[arg-type]
                                  for t, d in self.datasets.items()})

    def __len__(self) -> int:
        return max(self.sizes.values())

    def __getitem__(self, i: int):
        raise TypeError("a MultiInputDataset is read per task: ds.datasets[task][i]")
