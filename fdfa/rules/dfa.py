"""Direct Feedback Alignment (Nøkland 2016): fixed random feedback B_l, kaiming-uniform init."""

from fdfa.rules.base import DirectFeedbackRule, StepOutput


class DFA(DirectFeedbackRule):
    def __init__(self, model):
        super().__init__(model, init="kaiming")

    def train_step(self, x, y) -> StepOutput:
        hs, logits = self.local_forward(x)
        loss = self.loss(logits, y)
        self.inject_and_backward(hs, logits, loss)
        return StepOutput(loss.detach(), logits.detach())
