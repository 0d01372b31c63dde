"""Backpropagation: the reference every other rule is measured against."""

from fdfa.rules.base import LearningRule, StepOutput


class BP(LearningRule):
    def train_step(self, x, y) -> StepOutput:
        logits = self.model(x)
        loss = self.loss(logits, y)
        loss.backward()
        return StepOutput(loss.detach(), logits.detach())
