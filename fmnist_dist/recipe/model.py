"""The PyTorch quickstart's MLP, unchanged so that state_dicts move freely between the two, and its weights."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn

if TYPE_CHECKING:  # the model's users (evaluate, predict, plot) need not load Accelerate
    from accelerate import Accelerator

NUM_CLASSES = 10
IMAGE_SIZE = 28
# Class names in label order, as in the quickstart.
CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


class NeuralNetwork(nn.Module):
    """Flatten, then Linear 784→512, ReLU, Linear 512→512, ReLU, Linear 512→10 (the quickstart's model)."""

    def __init__(self) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.linear_relu_stack = nn.Sequential(
            nn.Linear(IMAGE_SIZE * IMAGE_SIZE, 512),
            nn.ReLU(),
            nn.Linear(512, 512),
            nn.ReLU(),
            nn.Linear(512, NUM_CLASSES),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.flatten(x)
        logits = self.linear_relu_stack(x)
        return logits


def plain_state_dict(accelerator: Accelerator, model: nn.Module) -> dict[str, Tensor]:
    """The weights as the quickstart saves them (`model.state_dict()`): unwrapped from DDP and torch.compile,
    on the CPU, so that a plain `NeuralNetwork` on any device loads them."""
    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    return {key: tensor.detach().cpu() for key, tensor in unwrapped.state_dict().items()}
