"""Balancers: ways to combine task losses or task gradients into one update.

>>> import mtlkit
>>> b = mtlkit.balancers.create("dwa", tasks=["seg", "depth"], temperature=2.0)
>>> "uw" in mtlkit.balancers.available()
True
"""

from mtlkit.balancers._base import (
    Balancer,
    BalanceStep,
    BlockGramianWeighting,
    GradientBalancer,
    GramianWeighting,
    JacobianAggregator,
    LastLayerWeighting,
    LossWeighting,
)
from mtlkit.balancers._dynamic import (
    DynamicTaskPrioritization,
    DynamicWeightAverage,
    LossBalancedTaskWeighting,
    RandomLossWeighting,
)
from mtlkit.balancers._famo import FAMO
from mtlkit.balancers._gradnorm import GradNorm, GradNormScaling
from mtlkit.balancers._gramian import (
    DBMTL,
    IMTL,
    AlignedMTL,
    BargainingWarning,
    CAGrad,
    NashMTL,
    UPGrad,
)
from mtlkit.balancers._mgda import MGDA
from mtlkit.balancers._registry import available, create, get, hyperparameters, register
from mtlkit.balancers._scaling import (
    EqualWeighting,
    FixedWeighting,
    GeometricWeighting,
    InitialLossWeighting,
    PriorLossWeighting,
    prior_loss,
)
from mtlkit.balancers._surgery import GradDrop, GradVac, PCGrad
from mtlkit.balancers._torchjd import TorchJDWeighting
from mtlkit.balancers._uncertainty import UncertaintyWeighting

__all__ = [
    "DBMTL",
    "FAMO",
    "IMTL",
    "MGDA",
    "AlignedMTL",
    "BalanceStep",
    "Balancer",
    "BargainingWarning",
    "BlockGramianWeighting",
    "CAGrad",
    "DynamicTaskPrioritization",
    "DynamicWeightAverage",
    "EqualWeighting",
    "FixedWeighting",
    "GeometricWeighting",
    "GradDrop",
    "GradNorm",
    "GradNormScaling",
    "GradVac",
    "GradientBalancer",
    "GramianWeighting",
    "InitialLossWeighting",
    "JacobianAggregator",
    "LastLayerWeighting",
    "LossBalancedTaskWeighting",
    "LossWeighting",
    "NashMTL",
    "PCGrad",
    "PriorLossWeighting",
    "RandomLossWeighting",
    "TorchJDWeighting",
    "UPGrad",
    "UncertaintyWeighting",
    "available",
    "create",
    "get",
    "hyperparameters",
    "prior_loss",
    "register",
]
