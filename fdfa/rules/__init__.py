"""Learning rules: one module each, all behind ``LearningRule.train_step``."""

from fdfa.rules.base import LearningRule, StepOutput
from fdfa.rules.bp import BP
from fdfa.rules.dfa import DFA
from fdfa.rules.dkp import DKP
from fdfa.rules.drtp import DRTP
from fdfa.rules.fa import FA
from fdfa.rules.fdfa import FDFA
from fdfa.rules.fg_a import FGA
from fdfa.rules.fg_w import FGW
from fdfa.rules.kp import KP
from fdfa.rules.sign_symmetry import BRSF, FRSF, USF

__all__ = [
    "BP",
    "BRSF",
    "DFA",
    "DKP",
    "DRTP",
    "FA",
    "FDFA",
    "FGA",
    "FGW",
    "FRSF",
    "KP",
    "USF",
    "LearningRule",
    "StepOutput",
]
