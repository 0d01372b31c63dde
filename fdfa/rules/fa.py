"""Feedback alignment, FA (Lillicrap et al. 2016, "Random synaptic feedback weights support error
backpropagation for deep learning").

Backprop in which every weight layer passes dL/dx = B_l^T dL/dz down instead of W_l^T dL/dz
(fdfa.rules.backward_path), with B_l a fixed random tensor of W_l's shape, drawn once as PyTorch
draws W_l: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (biotorch's FA draws B as it draws W, too). The
weight and bias gradients are the usual ones from the signal that arrives; BatchNorm, ReLU and
pooling backpropagate exactly. The first layer's B is never used (nothing below it learns).
"""

from fdfa.rules.backward_path import BackwardPathRule, random_like_init


class FA(BackwardPathRule):
    def __init__(self, model):
        super().__init__(model)
        self.feedback_weights = random_like_init(self.layers)

    def feedback_matrices(self):
        return list(self.feedback_weights)
