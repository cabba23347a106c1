"""lightly's losses, numerically identical, with explicit state.

Every class keeps lightly's constructor and `forward`; see the README for the few
deliberate differences. `registry.LOSSES` describes each loss for generic code.
"""

from ._state import NonFiniteStateError, StatefulLoss, state_transaction
from .barlow_twins_loss import BarlowTwinsLoss
from .co2_regularizer import CO2Regularizer
from .dcl_loss import DCLLoss, DCLWLoss
from .dino_loss import DINOLoss
from .hypersphere_loss import HypersphereLoss
from .ibot_loss import IBOTPatchLoss
from .koleo_loss import KoLeoLoss
from .memory_bank import MemoryBankModule
from .mmcr_loss import MMCRLoss
from .msn_loss import MSNLoss
from .negative_cosine_similarity import NegativeCosineSimilarity
from .ntx_ent_loss import NTXentLoss
from .pmsn_loss import PMSNCustomLoss, PMSNLoss
from .registry import LOSSES
from .swav_loss import SwaVLoss
from .sym_neg_cos_sim_loss import SymNegCosineSimilarityLoss
from .tico_loss import TiCoLoss
from .vicreg_loss import VICRegLoss
from .vicregl_loss import VICRegLLoss

__all__ = [
    "LOSSES",
    "BarlowTwinsLoss",
    "CO2Regularizer",
    "DCLLoss",
    "DCLWLoss",
    "DINOLoss",
    "HypersphereLoss",
    "IBOTPatchLoss",
    "KoLeoLoss",
    "MMCRLoss",
    "MSNLoss",
    "MemoryBankModule",
    "NTXentLoss",
    "NegativeCosineSimilarity",
    "NonFiniteStateError",
    "PMSNCustomLoss",
    "PMSNLoss",
    "StatefulLoss",
    "SwaVLoss",
    "SymNegCosineSimilarityLoss",
    "TiCoLoss",
    "VICRegLLoss",
    "VICRegLoss",
    "state_transaction",
]
