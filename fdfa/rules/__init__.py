"""Learning rules: one module each, all behind ``LearningRule.train_step``."""

from fdfa.rules.base import LearningRule, StepOutput
from fdfa.rules.bp import BP
from fdfa.rules.dfa import DFA
from fdfa.rules.dkp import DKP
from fdfa.rules.fdfa import FDFA
from fdfa.rules.fg_a import FGA
from fdfa.rules.fg_w import FGW

__all__ = ["BP", "DFA", "DKP", "FDFA", "FGA", "FGW", "LearningRule", "StepOutput"]
