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
from mtlkit.balancers._bilevel import AutoLambda
from mtlkit.balancers._dynamic import (
    DynamicTaskPrioritization,
    DynamicWeightAverage,
    LossBalancedTaskWeighting,
    RandomLossWeighting,
)
from mtlkit.balancers._excess import ExcessMTL
from mtlkit.balancers._fairness import FairGrad
from mtlkit.balancers._famo import FAMO
from mtlkit.balancers._go4align import GO4Align
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
from mtlkit.balancers._imtl_l import IMTLL
from mtlkit.balancers._metabalance import MetaBalance
from mtlkit.balancers._mgda import MGDA
from mtlkit.balancers._projections import PCD, ConFIG, DualProj
from mtlkit.balancers._registry import available, create, get, hyperparameters, register
from mtlkit.balancers._robust import Krum, TrimmedMean
from mtlkit.balancers._scalarization import COSMOS, PBI, STCH
from mtlkit.balancers._scaling import (
    EqualWeighting,
    FixedWeighting,
    GeometricWeighting,
    InitialLossWeighting,
    PriorLossWeighting,
    prior_loss,
)
from mtlkit.balancers._smoothing import CRMOGM
from mtlkit.balancers._stochastic import MoCo, MoDo, SDMGrad
from mtlkit.balancers._surgery import GradDrop, GradVac, PCGrad
from mtlkit.balancers._torchjd import TorchJDWeighting
from mtlkit.balancers._uncertainty import UncertaintyWeighting

__all__ = [
    "COSMOS",
    "CRMOGM",
    "DBMTL",
    "FAMO",
    "IMTL",
    "IMTLL",
    "MGDA",
    "PBI",
    "PCD",
    "STCH",
    "AlignedMTL",
    "AutoLambda",
    "BalanceStep",
    "Balancer",
    "BargainingWarning",
    "BlockGramianWeighting",
    "CAGrad",
    "ConFIG",
    "DualProj",
    "DynamicTaskPrioritization",
    "DynamicWeightAverage",
    "EqualWeighting",
    "ExcessMTL",
    "FairGrad",
    "FixedWeighting",
    "GO4Align",
    "GeometricWeighting",
    "GradDrop",
    "GradNorm",
    "GradNormScaling",
    "GradVac",
    "GradientBalancer",
    "GramianWeighting",
    "InitialLossWeighting",
    "JacobianAggregator",
    "Krum",
    "LastLayerWeighting",
    "LossBalancedTaskWeighting",
    "LossWeighting",
    "MetaBalance",
    "MoCo",
    "MoDo",
    "NashMTL",
    "PCGrad",
    "PriorLossWeighting",
    "RandomLossWeighting",
    "SDMGrad",
    "TorchJDWeighting",
    "TrimmedMean",
    "UPGrad",
    "UncertaintyWeighting",
    "available",
    "create",
    "get",
    "hyperparameters",
    "prior_loss",
    "register",
]
